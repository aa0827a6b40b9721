"""DSSERVE_PROFILE=1: the server logs where its engine steps' time went when it stops."""

from conftest import Server


def test_profile_is_logged_at_exit(tiny_r1, tmp_path):
    server = Server(tiny_r1, env={"DSSERVE_PROFILE": "1"}, log_dir=tmp_path / "logs")
    try:
        out = server.client().completions.create(model="tiny-r1", prompt="hello", max_tokens=8, temperature=0)
        assert out.usage.completion_tokens == 8
    finally:
        server.stop()
    log = server.proc.stdout.read()
    assert "profile of" in log and "model forward" in log and "of which attention" in log and "whole decode step" in log
