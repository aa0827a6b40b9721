"""API keys: the keys file, lookups, and each key's rate and concurrency limits (a fake clock)."""

import pytest

from dsserve.errors import ConfigError
from dsserve.server.keys import ApiKey, KeyRing, load_keys


def test_keys_file_and_flags(tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text('[[keys]]\nname = "team-a"\nkey = "sk-a"\nrequests_per_minute = 60\nmax_concurrent = 4\n')
    keys = load_keys(["sk-cli"], f)
    assert [k.name for k in keys] == ["api-key-1", "team-a"] and keys[1].requests_per_minute == 60
    assert "sk-a" not in repr(keys) and "sk-cli" not in repr(keys)


@pytest.mark.parametrize("text, message", [
    pytest.param('[[keys]]\nname = "a"\nkey = "k"\n[[keys]]\nname = "a"\nkey = "j"\n', "is given 2 times", id="dup-name"),
    pytest.param('[[keys]]\nname = "a"\nkey = "k"\n[[keys]]\nname = "b"\nkey = "k"\n', "same key", id="dup-key"),
    pytest.param('[[keys]]\nname = "a"\nkey = ""\n', "non-empty `key`", id="empty-key"),
    pytest.param('[[keys]]\nkey = "k"\n', "non-empty `name`", id="no-name"),
    pytest.param('[[keys]]\nname = "a"\nkey = "k"\nrequests_per_minute = 0\n', "requests_per_minute", id="rpm-0"),
    pytest.param('[[keys]]\nname = "a"\nkey = "k"\nrpm = 5\n', "unknown field", id="unknown-field"),
    pytest.param('keys = 1\n', "[[keys]] tables", id="not-tables"),
    pytest.param('[[keys]\n', "not valid TOML", id="bad-toml"),
])
def test_bad_keys_files_are_refused_without_showing_keys(tmp_path, text, message):
    f = tmp_path / "keys.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        load_keys(None, f)
    assert '"k"' not in str(e.value)


def test_rate_and_concurrency_limits():
    now = [0.0]
    rate = ApiKey("rate", "sk-r", requests_per_minute=2)
    pair = ApiKey("pair", "sk-p", max_concurrent=2)
    ring = KeyRing((rate, pair), clock=lambda: now[0])
    assert ring.find("sk-r") is rate and ring.find("sk-x") is None and ring.find("") is None
    assert ring.acquire(rate) is None and ring.acquire(rate) is None
    wait = ring.acquire(rate)
    assert wait == pytest.approx(30.0)  # one token a half-minute
    now[0] = 31.0
    assert ring.acquire(rate) is None
    ring.release(rate), ring.release(rate), ring.release(rate)
    assert ring.acquire(pair) is None and ring.acquire(pair) is None
    assert ring.acquire(pair) == 1.0 and "2 concurrent requests" in ring.describe_limit(pair, 1.0)
    ring.release(pair)
    assert ring.acquire(pair) is None


def test_audit_log_files_stay_private_across_rotation(tmp_path):
    import os

    from dsserve.server.audit import AuditLog

    old = os.umask(0o022)
    try:
        log = AuditLog(tmp_path / "audit.jsonl", max_bytes=200, content=False)
        for i in range(20):
            log.write({"request_id": str(i), "key": "team-a", "prompt": "secret text"})
        log.close()
    finally:
        os.umask(old)
    files = sorted(tmp_path.glob("audit.jsonl*"))
    assert len(files) > 2 and all(oct(f.stat().st_mode & 0o777) == "0o600" for f in files)
    assert not any("secret text" in f.read_text() for f in files)
