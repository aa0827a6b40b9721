"""Doctor checks of who can reach `dsserve serve`: the bind address, API keys, the keys file. Never prints a key."""

from __future__ import annotations

import ipaddress
import os
from collections import defaultdict
from typing import Any, Mapping

from dsserve.doctor.files import Line, read_toml, secret_permissions

KEY_FIELDS = ("name", "key", "requests_per_minute", "max_concurrent")
LIMIT_FIELDS = ("requests_per_minute", "max_concurrent")


def check_access(options: dict[str, Any], env: Mapping[str, str] = os.environ) -> list[Line]:
    """The API keys given, the keys file, then whether the bind address exposes the server without them."""
    host = str(options.get("host", "127.0.0.1"))
    keys_file = options.get("api_key_file")
    cli_keys = env.get("DSSERVE_API_KEY") or options.get("api_key")  # serve: the flag (or its env) beats the config
    lines, keys = _cli_keys(cli_keys, "DSSERVE_API_KEY" if env.get("DSSERVE_API_KEY") else "api_key")
    if keys_file:
        file_lines, file_keys = _keys_file(str(keys_file))
        lines += file_lines
        keys += file_keys
    lines += _unique(keys)
    if keys and not any(ok is False for ok, _ in lines):
        lines.append((True, f"{len(keys)} API key(s): {', '.join(name for name, _, _ in keys)}"))
    has_tls = bool(options.get("ssl_certfile") or options.get("ssl_keyfile"))
    if is_loopback(host):
        lines.append((True, f"host {host} is loopback: only this machine can connect"))
        if not has_tls:
            lines.append((None, "TLS off: serving plain HTTP; for clients on the network set --ssl-certfile and "
                                "--ssl-keyfile, or terminate TLS in a proxy in front of dsserve"))
        return lines
    if cli_keys or keys_file:
        lines.append((True, f"host {host} accepts clients from the network; they must send an API key"))
    else:
        lines.append((False, f"host {host}: the server would accept requests from the network without an API key: "
                             f"set --api-key / --api-key-file, or bind 127.0.0.1"))
    if not has_tls:
        lines.append((None, f"warning: host {host} without TLS sends API keys, prompts and completions over the "
                            f"network unencrypted; set --ssl-certfile and --ssl-keyfile, or put a TLS-terminating "
                            f"proxy in front (and bind 127.0.0.1)"))
    return lines


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost; anything else (0.0.0.0, "", a name, a LAN address) reaches the network."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# A key as the doctor holds it: (name, secret, where it is given). The secret is only compared, never shown.
Key = tuple[str, str, str]


def _cli_keys(value: Any, source: str) -> tuple[list[Line], list[Key]]:
    """api_key (a string or a list of strings), named api-key-1, api-key-2, ... as serve names them."""
    if value is None:
        return [], []
    values = value if isinstance(value, list) else [value]
    bad = [i for i, v in enumerate(values, 1) if not isinstance(v, str) or not v]
    if not values or bad:
        where = source if not isinstance(value, list) else f"{source} entry {', '.join(map(str, bad)) or '(none)'}"
        return [(False, f"{where} must be a non-empty string (or a list of them): an empty key asks clients for "
                        f"nothing")], []
    return [], [(f"api-key-{i}", v, source if len(values) == 1 else f"{source} entry {i}")
                for i, v in enumerate(values, 1)]


def _keys_file(path: str) -> tuple[list[Line], list[Key]]:
    """`[[keys]]` tables, each with a name and key and optional positive limits, nothing else (serve's rules)."""
    label = f"--api-key-file {path}"
    data, failure = read_toml(path, "--api-key-file")
    if data is None:
        return [failure], []
    lines: list[Line] = []
    warning = secret_permissions(path, "--api-key-file", "API keys")
    if warning:
        lines.append(warning)
    entries, unknown = data.get("keys"), sorted(set(data) - {"keys"})
    if unknown or not isinstance(entries, list) or not entries:
        return lines + [(False, f"{label} must hold [[keys]] tables (name = \"...\", key = \"...\", optional "
                                f"requests_per_minute and max_concurrent)"
                                + (f"; unknown top-level key(s): {', '.join(unknown)}" if unknown else ""))], []
    keys: list[Key] = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            lines.append((False, f"{label}: entry {i} is not a table"))
            continue
        name, key = entry.get("name"), entry.get("key")
        has_name = isinstance(name, str) and bool(name.strip())
        where = f"{label}: entry {i}" + (f" ({name.strip()!r})" if has_name else "")
        if not has_name:
            lines.append((False, f"{where} needs a non-empty `name` (it labels metrics and audit lines)"))
        if not isinstance(key, str) or not key:
            lines.append((False, f"{where} needs a non-empty `key`"))
        elif has_name:
            keys.append((name.strip(), key, f"--api-key-file entry {i}"))
        for field in LIMIT_FIELDS:
            limit = entry.get(field)
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                lines.append((False, f"{where}: {field} must be a whole number >= 1, got {limit!r}"))
        extra = sorted(set(entry) - set(KEY_FIELDS))
        if extra:
            lines.append((False, f"{where} has unknown field(s) {', '.join(extra)}; known: {', '.join(KEY_FIELDS)}"))
    return lines, keys


def _unique(keys: list[Key]) -> list[Line]:
    """Names label metrics and audit lines, so they must differ; so must keys. Only names are ever shown."""
    lines: list[Line] = []
    by_name: dict[str, list[str]] = defaultdict(list)
    by_secret: dict[str, list[str]] = defaultdict(list)
    for name, secret, where in keys:
        by_name[name].append(where)
        by_secret[secret].append(f"{name!r} ({where})")
    for name, wheres in by_name.items():
        if len(wheres) > 1:
            lines.append((False, f"API key name {name!r} is given {len(wheres)} times ({', '.join(wheres)}); names "
                                 f"must be unique"))
    for named in by_secret.values():
        if len(named) > 1:
            lines.append((False, f"API keys {' and '.join(named)} are the same key; give each its own"))
    return lines
