"""Doctor checks of who can reach `dsserve serve`: the bind address, API keys, the keys file. Never prints a key."""

from __future__ import annotations

import os
from typing import Any, Mapping

from dsserve.config import is_loopback, read_api_keys
from dsserve.doctor.files import Line, secret_permissions


def check_access(options: dict[str, Any], env: Mapping[str, str] = os.environ) -> list[Line]:
    """The API keys given, the keys file, then whether the bind address exposes the server without them."""
    host = str(options.get("host", "127.0.0.1"))
    keys_file = options.get("api_key_file")
    cli_keys = env.get("DSSERVE_API_KEY") or options.get("api_key")  # serve: the flag (or its env) beats the config
    keys, problems = read_api_keys(cli_keys, keys_file, "DSSERVE_API_KEY" if env.get("DSSERVE_API_KEY") else "api_key")
    lines: list[Line] = [(False, problem) for problem in problems]
    if keys_file:
        warning = secret_permissions(str(keys_file), "--api-key-file", "API keys")
        if warning:
            lines.insert(0, warning)
    if keys and not problems:
        lines.append((True, f"{len(keys)} API key(s): {', '.join(k.name for k in keys)}"))
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
