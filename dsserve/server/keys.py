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
from dataclasses import dataclass
from pathlib import Path

from dsserve.errors import ConfigError


@dataclass(frozen=True)
class ApiKey:
    name: str  # what logs, metrics and the audit log show
    key: str = ""  # the secret; never logged
    requests_per_minute: int | None = None
    max_concurrent: int | None = None

    def __repr__(self) -> str:  # a config printed or logged must not show the secret
        return (f"ApiKey(name={self.name!r}, requests_per_minute={self.requests_per_minute}, "
                f"max_concurrent={self.max_concurrent})")


def load_keys(cli_keys: list[str] | tuple[str, ...] | str | None, key_file: str | os.PathLike | None) -> tuple[ApiKey, ...]:
    """The keys of `--api-key` (repeatable) and `--api-key-file`, checked: non-empty, unique names and keys."""
    if isinstance(cli_keys, str):
        cli_keys = [cli_keys]
    keys = [ApiKey(f"api-key-{i}", k) for i, k in enumerate(cli_keys or (), 1)]
    if key_file is not None:
        keys.extend(_read_key_file(Path(key_file)))
    names, secrets = set(), set()
    for k in keys:
        if not k.key:
            raise ConfigError(f"API key {k.name!r} is empty; give a non-empty key")
        if k.name in names:
            raise ConfigError(f"API key name {k.name!r} appears twice; names must be unique (they label metrics and "
                              "audit lines)")
        if k.key in secrets:
            raise ConfigError(f"API key {k.name!r} has the same key as another entry; give each its own key")
        names.add(k.name)
        secrets.add(k.key)
    return tuple(keys)


def _read_key_file(path: Path) -> list[ApiKey]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--api-key-file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--api-key-file {path} is not valid TOML: {e}") from None
    entries = data.get("keys")
    unknown = sorted(set(data) - {"keys"})
    if unknown or not isinstance(entries, list) or not entries:
        raise ConfigError(f"--api-key-file {path} must hold [[keys]] tables (name, key, optional requests_per_minute "
                          f"and max_concurrent){'; unknown key(s): ' + ', '.join(unknown) if unknown else ''}")
    out = []
    for i, entry in enumerate(entries):
        where = f"--api-key-file {path}, [[keys]] entry {i + 1}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not a table")
        extra = sorted(set(entry) - {"name", "key", "requests_per_minute", "max_concurrent"})
        if extra:
            raise ConfigError(f"{where} has unknown field(s) {', '.join(extra)}; known: name, key, "
                              "requests_per_minute, max_concurrent")
        name, key = entry.get("name"), entry.get("key")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where} needs a non-empty `name` (it labels metrics and audit lines)")
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where} ({name!r}) needs a non-empty `key`")
        limits = {}
        for field in ("requests_per_minute", "max_concurrent"):
            value = entry.get(field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{where} ({name!r}): {field} must be a whole number >= 1, got {value!r}")
            limits[field] = value
        out.append(ApiKey(name.strip(), key, **limits))
    return out


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

