"""`dsserve bench serve` against dsserve's own server: small and bounded."""

import json
import subprocess
import sys

import pytest


def test_online_run_against_dsserve(server, tmp_path):
    result_file, csv_file = tmp_path / "result.json", tmp_path / "mindie.csv"
    out = subprocess.run([sys.executable, "-m", "dsserve.cli", "bench", "serve", "--base-url", server.url,
                          "--num-prompts", "12", "--input-len", "16", "--output-len", "8", "--max-concurrency", "4",
                          "--request-rate", "50", "--goodput", "ttft:60000", "--goodput", "tpot:60000",
                          "--save-result", str(result_file), "--mindie-csv", str(csv_file)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Serving Benchmark Result" in out.stdout and "Mean TTFT (ms):" in out.stdout
    result = json.loads(result_file.read_text())
    assert result["successful_requests"] == 12 and result["failed_requests"] == 0
    assert result["total_output_tokens"] == 12 * 8 and result["total_input_tokens"] == 12 * 16
    assert result["goodput"] > 0 and result["ttft_ms"]["p99"] >= result["ttft_ms"]["median"] > 0
    assert result["args"]["model"] == "DeepSeek-R1"
    assert csv_file.read_text().splitlines()[1].startswith("DeepSeek-R1,4,16,8,")


def test_failures_are_counted(server):
    out = subprocess.run([sys.executable, "-m", "dsserve.cli", "bench", "serve", "--base-url", server.url,
                          "--model", "no-such-model", "--num-prompts", "2", "--input-len", "4", "--output-len", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "Failed requests:                         2" in out.stdout and "404" in out.stdout


def test_online_run_against_the_demo_model(demo_server, tmp_path):
    result_file = tmp_path / "demo.json"
    out = subprocess.run([sys.executable, "-m", "dsserve.cli", "bench", "serve", "--base-url", demo_server.url,
                          "--num-prompts", "16", "--input-len", "32", "--output-len", "16", "--max-concurrency", "8",
                          "--save-result", str(result_file)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(result_file.read_text())
    assert result["args"]["model"] == "dsserve-demo-r1"
    assert result["successful_requests"] == 16 and result["total_output_tokens"] == 16 * 16
    assert result["output_token_throughput"] > 0 and result["tpot_ms"]["mean"] > 0


def test_client_streams_over_kept_alive_connections(server):
    """The benchmark's own HTTP/1.1 client: token events are counted from the SSE stream (stored while requests
    run, read after) and a connection is reused for the next request once a response was read to its end."""
    import asyncio

    from dsserve.bench import serve as online

    async def go():
        client = online.Client(server.url)
        try:
            results = [online.read_stream(await online.send_request(client, "DeepSeek-R1", work))
                       for work in online.random_workload(3, 8, 5, 256, seed=1)]
        finally:
            await client.close()
        return results, client.connections_opened

    results, opened = asyncio.run(go())
    assert [(r.ok, r.output_len) for r in results] == [(True, 5)] * 3
    # A chunk per token, unless the server merged tokens its handler had not sent yet (the tiny model's steps can
    # be quicker than a stream's first chunk): 5 tokens in at most 5 events, so at most 4 gaps.
    assert all(len(r.itl_s) <= 4 for r in results)
    assert all(r.e2e_s >= r.ttft_s > 0 for r in results)
    assert opened == 1


def test_unreachable_server_and_bad_url_are_reported():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [sys.executable, "-m", "dsserve.cli", "bench", "serve", "--model", "m", "--num-prompts", "2",
            "--input-len", "4", "--output-len", "2"]
    out = subprocess.run(base + ["--base-url", f"http://127.0.0.1:{port}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "Failed requests:                         2" in out.stdout and "ConnectionRefusedError" in out.stdout
    import os

    out = subprocess.run(base + ["--base-url", "127.0.0.1:8000"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "300"})  # one line per message in rich's error box
    assert out.returncode == 2 and "expected http://HOST[:PORT]" in out.stdout + out.stderr


def test_stored_stream_is_read_into_timings_and_errors():
    """Events split across pieces are timed by the piece that completes them; an error event or a malformed one
    fails the request."""
    from dsserve.bench.serve import RequestResult, read_stream

    token = b'data: {"choices": [{"index": 0, "text": "a", "finish_reason": null}], "usage": null}\n\n'
    usage = b'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\ndata: [DONE]\n\n'
    r = RequestResult(ok=True, input_len=4, started=10.0, e2e_s=1.0,
                      stream=[(10.5, token), (10.7, token[:20]), (10.8, token[20:] + token), (10.9, usage)])
    read_stream(r)
    assert (r.ok, r.output_len, r.ttft_s) == (True, 3, 0.5)
    assert r.itl_s == pytest.approx([0.3, 0.0]) and r.stream == []
    bad = RequestResult(ok=True, input_len=4, stream=[(1.0, token), (1.1, b'data: {"error": {"message": "boom"}}\n\n')])
    assert (read_stream(bad).ok, bad.error) == (False, "boom")
    broken = RequestResult(ok=True, input_len=4, stream=[(1.0, b"data: {not json\n\n")])
    assert not read_stream(broken).ok and broken.error.startswith("ValueError")
