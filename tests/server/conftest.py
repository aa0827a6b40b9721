"""A real `dsserve serve` subprocess on 127.0.0.1, driven by the official openai client; it stops with the tests."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


class Server:
    def __init__(self, model, *args: str, env: dict | None = None, log_dir=None):
        """`model` None: serve the built-in demo model (no model argument)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DSSERVE_PARENT_PID": str(os.getpid()), "DSSERVE_LOG_DIR": str(log_dir or model.parent / "logs"),
               **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsserve.cli", "serve", *([str(model)] if model else []), "--host", "127.0.0.1", "--port", str(self.port),
             "--kv-cache-memory", "64MiB", "--max-model-len", "512", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
        )
        deadline = time.time() + 120
        self.log = []
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log.append(line)
            if line.startswith("dsserve ready at"):
                return
        self.stop()
        raise RuntimeError("server did not start:\n" + "".join(self.log))

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = float(value)
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def server(tiny_r1):
    s = Server(tiny_r1, "--served-model-name", "DeepSeek-R1")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory):
    """`dsserve serve` with no model: the built-in demo model under its demo name."""
    s = Server(None, "--max-num-seqs", "64", log_dir=tmp_path_factory.mktemp("demo-logs"))
    yield s
    s.stop()
