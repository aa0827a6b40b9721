"""`dsserve serve` with several ranks (gloo on CPU, local processes): -tp 2 and a two-"node" rank table on
127.0.0.x serve the same greedy text as one rank; a killed or stalled rank ends the deployment with an
error within the step timeout; a rank with another config.json is reported before any weights load."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from dsserve import LLM, SamplingParams

from conftest import Server

PROMPTS = ["2+2=", "The capital of", "数一数", "abc" * 5, "Hello, world! " * 3, "x"]


def _greedy_texts(path) -> list[str]:
    llm = LLM(path, num_kv_blocks=128, max_model_len=512)
    return [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0))]


@pytest.fixture(scope="module")
def expected(tiny_r1):
    return _greedy_texts(tiny_r1)


@pytest.fixture(scope="module")
def tiny_qwen2(model_dir, tiny_r1, tmp_path_factory):
    """transformers' tiny Qwen2 with the byte-level tokenizer (its 262 tokens fit the 320-token vocabulary)."""
    folder = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2"
    shutil.copytree(model_dir("qwen2_untied"), folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_r1 / name, folder / name)
    return folder


def _complete_all(server: Server) -> list[str]:
    """Every prompt at once (one mixed batch on the server), greedy."""
    client = server.client()
    results: list[str | None] = [None] * len(PROMPTS)

    def run(i):
        out = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPTS[i], max_tokens=24,
                                        temperature=0)
        results[i] = out.choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("extra", [(), ("--enable-expert-parallel",)])
def test_tp2_server_serves_the_same_tokens(tiny_r1, expected, extra):
    server = Server(tiny_r1, "-tp", "2", "--step-timeout", "30", *extra)
    try:
        assert any("tensor parallel: 2 ranks" in line for line in server.log)
        assert _complete_all(server) == expected
        chat = server.client().chat.completions.create(
            model="tiny-r1", messages=[{"role": "user", "content": "hi"}], max_tokens=16, temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length")
        workers = _children(server.proc.pid)
        assert len(workers) == 1
    finally:
        server.stop()
    assert server.proc.returncode == 0
    for pid in workers:  # rank 1 was told to stop and is gone
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_tp2_server_on_qwen2(tiny_qwen2):
    expected = _greedy_texts(tiny_qwen2)
    server = Server(tiny_qwen2, "-tp", "2", "--step-timeout", "30")
    try:
        assert _complete_all(server) == expected
    finally:
        server.stop()
    assert server.proc.returncode == 0


def test_two_nodes_from_a_generated_rank_table(tiny_r1, expected, tmp_path):
    table = tmp_path / "rank_table.json"
    subprocess.run([sys.executable, "-m", "dsserve.cli", "ranktable", "generate", "--nodes", "127.0.0.1,127.0.0.2",
                    "--devices-per-node", "1", "-o", str(table)], check=True)
    port = _free_port()
    node1 = _start_node(tiny_r1, table, 1, port, tmp_path / "node1.log")
    try:
        server = Server(tiny_r1, "--rank-table", str(table), "--node-rank", "0", "--master-port", str(port),
                        "--step-timeout", "30")
        try:
            chat = server.client().chat.completions.create(
                model="tiny-r1", messages=[{"role": "user", "content": "1+1?"}], max_tokens=16, temperature=0)
            assert chat.choices[0].message.content is not None or chat.choices[0].message.reasoning_content
            assert _complete_all(server) == expected
        finally:
            server.stop()
        assert server.proc.returncode == 0
        assert node1.wait(30) == 0, (tmp_path / "node1.log").read_text()
        log = (tmp_path / "node1.log").read_text()
        assert "rank 1 of 2 (node 1): compute only" in log and "stop received" in log
    finally:
        if node1.poll() is None:
            node1.kill()


def test_torchrun_starts_every_rank(tiny_r1, expected, tmp_path):
    """`torchrun --nproc-per-node 2 -m dsserve.cli serve MODEL`: rank 0 serves HTTP, rank 1 computes."""
    port = _free_port()
    env = {**os.environ, "DSSERVE_PARENT_PID": str(os.getpid()), "DSSERVE_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "-m", "dsserve.cli", "serve", str(tiny_r1), "--port", str(port), "--kv-cache-memory", "64MiB",
         "--max-model-len", "512"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, start_new_session=True)
    try:
        log = []
        for line in proc.stdout:
            log.append(line)
            if line.startswith("dsserve ready at"):
                break
        else:
            pytest.fail("torchrun deployment did not start:\n" + "".join(log))
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                         json={"model": "tiny-r1", "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0}).json()
        assert out["choices"][0]["text"] == expected[1]
        assert any("rank 1 of 2" in line for line in log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_a_rank_lost_while_idle_ends_the_deployment(tiny_r1):
    """No request running: the heartbeat notices, and the master exits non-zero instead of waiting for traffic."""
    timeout = 4
    server = Server(tiny_r1, "-tp", "2", "--step-timeout", str(timeout))
    (worker,) = _children(server.proc.pid)
    try:
        os.kill(worker, signal.SIGKILL)
        assert server.proc.wait(timeout + 15) != 0
        assert "exited with code -9" in server.proc.stdout.read()
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["kill", "stall"])
def test_a_lost_rank_ends_the_deployment_within_the_timeout(tiny_r1, how):
    timeout = 4
    server = Server(tiny_r1, "-tp", "2", "--step-timeout", str(timeout), "--max-model-len", "512")
    (worker,) = _children(server.proc.pid)
    try:
        client = server.client(timeout=60)
        stream = client.chat.completions.create(
            model="tiny-r1", messages=[{"role": "user", "content": "count to a thousand"}], max_tokens=480,
            temperature=0.6, stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        assert first.choices
        os.kill(worker, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        lost_at = time.monotonic()
        with pytest.raises(Exception) as failure:
            for _ in stream:
                pass
        assert "lost the other ranks" in str(failure.value) or "stopped after an internal error" in str(failure.value)
        code = server.proc.wait(timeout + 20)
        elapsed = time.monotonic() - lost_at
        assert code != 0
        assert elapsed < timeout + 15
        rest = server.proc.stdout.read()
        assert "lost the other ranks" in rest
        if how == "kill":
            assert "exited with code -9" in rest
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.stop()


def test_a_rank_with_another_config_is_reported_before_weights_load(tiny_r1, tmp_path):
    other = tmp_path / "other-r1"
    shutil.copytree(tiny_r1, other)
    config = (other / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')
    assert config != (other / "config.json").read_text()
    (other / "config.json").write_text(config)
    table = tmp_path / "rank_table.json"
    subprocess.run([sys.executable, "-m", "dsserve.cli", "ranktable", "generate", "--nodes", "127.0.0.1,127.0.0.2",
                    "--devices-per-node", "1", "-o", str(table)], check=True)
    port = _free_port()
    node1 = _start_node(other, table, 1, port, tmp_path / "node1.log")
    with pytest.raises(RuntimeError, match="server did not start") as failure:
        Server(tiny_r1, "--rank-table", str(table), "--node-rank", "0", "--master-port", str(port))
    message = " ".join(str(failure.value).split())  # the CLI wraps long error lines
    assert "rank 1 on node 1" in message and "config_hash" in message and str(other) in message
    assert "loaded" not in message  # no rank read a weight
    assert node1.wait(30) == 1
    log = (tmp_path / "node1.log").read_text()
    assert "rank 1 on node 1" in log and "loaded" not in log


def test_a_rank_that_fails_to_load_fails_every_rank(tiny_r1, tmp_path):
    """Same config, but node 1's weights are truncated: node 1 says which file, and node 0 stops with that
    message instead of waiting for a rank that will never be ready."""
    broken = tmp_path / "broken-r1"
    shutil.copytree(tiny_r1, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    table = tmp_path / "rank_table.json"
    subprocess.run([sys.executable, "-m", "dsserve.cli", "ranktable", "generate", "--nodes", "127.0.0.1,127.0.0.2",
                    "--devices-per-node", "1", "-o", str(table)], check=True)
    port = _free_port()
    node1 = _start_node(broken, table, 1, port, tmp_path / "node1.log")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="server did not start") as failure:
        Server(tiny_r1, "--rank-table", str(table), "--node-rank", "0", "--master-port", str(port))
    assert time.monotonic() - started < 60
    message = " ".join(str(failure.value).split())  # the CLI wraps long error lines
    assert "rank 1 on node 1 failed" in message and "model.safetensors" in message, message
    assert node1.wait(30) == 1


def _start_node(model: Path, table: Path, node: int, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "DSSERVE_PARENT_PID": str(os.getpid()), "DSSERVE_LOG_DIR": str(log.parent / "logs")}
    return subprocess.Popen(
        [sys.executable, "-m", "dsserve.cli", "serve", str(model), "--rank-table", str(table), "--node-rank", str(node),
         "--master-port", str(port), "--kv-cache-memory", "64MiB", "--max-model-len", "512", "--step-timeout", "30",
         "--connect-timeout", "60"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
