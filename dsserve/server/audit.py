"""The audit log: one JSON line per request (`--audit-log FILE`), rotated by size.

A line says who asked (the API key's name, never the key; the client's address), what (route, model), and what came
of it (status, prompt and completion tokens, latency, finish reasons), under the request id the client saw in
`X-Request-Id`. Prompt and completion text are written only with `--audit-log-content`.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dsserve.errors import ConfigError


class AuditLog:
    def __init__(self, path: str | os.PathLike, max_bytes: int = 100 * 2**20, backup_count: int = 10,
                 content: bool = False):
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Created owner-only: the lines name keys and clients (and, with --audit-log-content, hold prompts).
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.close(fd)
        except OSError as e:
            raise ConfigError(f"--audit-log {path} cannot be written ({e.strerror}); give a writable file") from None
        self.content = content
        self.path = path
        self._logger = logging.Logger(f"dsserve.audit.{path}")  # not in the logging tree: never reaches stderr
        handler = _PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler = handler
        self._logger.addHandler(handler)

    def write(self, record: dict[str, Any]) -> None:
        line = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **record}
        if not self.content:
            line.pop("prompt", None)
            line.pop("completion", None)
        self._logger.info(json.dumps(line, ensure_ascii=False, default=str))

    def close(self) -> None:
        self._handler.close()


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Every file it opens, the fresh one after each rotation too, is created 0600 whatever the umask."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, self.mode, encoding=self.encoding, errors=self.errors)
