"""Reading the files the doctor checks, with the operator's fix in every failure."""

from __future__ import annotations

import os
import stat

Line = tuple[bool | None, str]


def read_bytes(path: str, label: str) -> tuple[bytes | None, Line | None]:
    """The file's bytes, or None and the FAIL line saying why not; `label` is the flag that named it."""
    if not os.path.exists(path):
        return None, (False, f"{label} {path} does not exist")
    if os.path.isdir(path):
        return None, (False, f"{label} {path} is a folder, not a file")
    try:
        with open(path, "rb") as f:
            return f.read(), None
    except OSError as e:
        return None, (False, f"{label} {path} is not readable ({e.strerror}); let the user running dsserve read it "
                             f"(chmod / chown)")


def secret_permissions(path: str, label: str, holds: str) -> Line | None:
    """An INFO warning when a file holding secrets is readable by its group or by everyone."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if mode & 0o044 == 0:
        return None
    who = " and ".join(w for bit, w in ((0o040, "its group"), (0o004, "every user")) if mode & bit)
    return None, (f"warning: {label} {path} holds {holds} and is readable by {who} (mode {mode:04o}); "
                  f"chmod 600 {path}")
