"""API keys and their limits: who is asking (a key's name, never the key), and whether they may ask now.

Keys come from `--api-key` (repeatable; named api-key-1, api-key-2, ...) and `--api-key-file` (TOML):

    [[keys]]
    name = "team-a"
    key = "sk-..."
    requests_per_minute = 60   # optional: a token bucket of 60 that refills at one a second
    max_concurrent = 4         # optional: requests in flight at once

A request over a limit gets 429 with `Retry-After` (OpenAI's `rate_limit_exceeded`); the other keys are unaffected.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time

from dsserve.config import ApiKey, read_api_keys
from dsserve.errors import ConfigError


def load_keys(cli_keys: list[str] | tuple[str, ...] | str | None,
              key_file: str | os.PathLike | None) -> tuple[ApiKey, ...]:
    """The keys of `--api-key` (repeatable) and `--api-key-file`; any problem stops the start (config.read_api_keys,
    the rules `dsserve doctor` checks too)."""
    keys, problems = read_api_keys(cli_keys, key_file)
    if problems:
        raise ConfigError("; ".join(problems))
    return keys


class KeyRing:
    """Looks a bearer token up in constant time per key, and keeps each key's rate and concurrency state (event loop
    only: no locks)."""

    def __init__(self, keys: tuple[ApiKey, ...], clock=time.monotonic):
        self.keys = keys
        self._digests = [(hashlib.sha256(k.key.encode()).digest(), k) for k in keys]
        self._buckets: dict[str, list[float]] = {}  # name -> [tokens, last refill time]
        self._in_flight: dict[str, int] = {}
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def find(self, token: str) -> ApiKey | None:
        """The key this token is, or None. Compares digests of equal length so that timing tells nothing."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for candidate, key in self._digests:
            if hmac.compare_digest(candidate, digest):
                found = key
        return found

    def acquire(self, key: ApiKey) -> float | None:
        """Take one request for `key`: None when allowed (then `release` it when done), else the seconds to wait."""
        if key.max_concurrent is not None and self._in_flight.get(key.name, 0) >= key.max_concurrent:
            return 1.0
        if key.requests_per_minute is not None:
            rate = key.requests_per_minute / 60.0  # tokens per second; the bucket holds a minute's worth
            now = self._clock()
            tokens, last = self._buckets.get(key.name, (float(key.requests_per_minute), now))
            tokens = min(float(key.requests_per_minute), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[key.name] = [tokens, now]
                return (1.0 - tokens) / rate
            self._buckets[key.name] = [tokens - 1.0, now]
        self._in_flight[key.name] = self._in_flight.get(key.name, 0) + 1
        return None

    def release(self, key: ApiKey) -> None:
        self._in_flight[key.name] -= 1

    def describe_limit(self, key: ApiKey, wait_s: float) -> str:
        if key.max_concurrent is not None and self._in_flight.get(key.name, 0) >= key.max_concurrent:
            limit = f"{key.max_concurrent} concurrent requests"
        else:
            limit = f"{key.requests_per_minute} requests per minute"
        return (f"Rate limit reached for API key '{key.name}': {limit}. Please try again in "
                f"{retry_after(wait_s)}s.")


def retry_after(wait_s: float) -> int:
    """Whole seconds for a Retry-After header (at least 1)."""
    return max(1, math.ceil(wait_s))

