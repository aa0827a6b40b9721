"""A server an operator can expose: one request cannot hurt another, caps, keys with limits, audit log, request ids,
drain, liveness and TLS, each driven through a real `dsserve serve` on 127.0.0.1 (demo model)."""

import datetime
import ipaddress
import json
import os
import signal
import threading
import time

import httpx
import pytest

from conftest import Server

MODEL = "dsserve-demo-r1"
KEYS = {"team-a": "sk-team-a-0123456789", "team-b": "sk-team-b-0123456789", "team-c": "sk-team-c-0123456789"}


def _chat(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Which is larger, 9.11 or 9.8?"}], "max_tokens": 8,
            **fields}


@pytest.fixture(scope="module")
def exposed(tmp_path_factory):
    """Keys with limits, an audit log, a small per-request budget and raised message caps (20k messages)."""
    folder = tmp_path_factory.mktemp("exposed")
    key_file = folder / "keys.toml"
    key_file.write_text(
        f'[[keys]]\nname = "team-a"\nkey = "{KEYS["team-a"]}"\nrequests_per_minute = 2\n\n'
        f'[[keys]]\nname = "team-b"\nkey = "{KEYS["team-b"]}"\nmax_concurrent = 1\n\n'
        f'[[keys]]\nname = "team-c"\nkey = "{KEYS["team-c"]}"\n')
    audit = folder / "audit.jsonl"
    server = Server(None, "--api-key-file", str(key_file), "--audit-log", str(audit), "--max-request-tokens", "1000",
                    "--max-messages", "30000", "--max-prompt-chars", "5000000", log_dir=folder / "logs")
    server.audit = audit
    yield server
    server.stop()


def _post(server, body, key="team-c", path="/v1/chat/completions", **kwargs):
    headers = {"Authorization": f"Bearer {KEYS[key]}", **kwargs.pop("headers", {})}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kwargs)


# ---- one request cannot hurt another ----------------------------------------------------------------------------


def test_top_k_past_int64_beside_a_normal_request(exposed):
    """top_k 2^63 must not overflow the sampler's int64 column (which would end the engine and every request in the
    batch): it is clamped to the vocabulary, and the request beside it is answered."""
    results = {}

    def send(name, body):
        results[name] = _post(exposed, body)

    threads = [threading.Thread(target=send, args=("huge", _chat(top_k=2**63, temperature=1.0, max_tokens=16))),
               threading.Thread(target=send, args=("normal", _chat(max_tokens=16)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["huge"].status_code == 200, results["huge"].text  # clamped to the vocabulary, as vLLM
    assert results["normal"].status_code == 200
    assert _post(exposed, _chat()).status_code == 200 and httpx.get(exposed.url + "/health").status_code == 200


@pytest.mark.parametrize("fields, param", [
    pytest.param({"seed": 2**64}, "seed", id="seed-2^64"),
    pytest.param({"seed": 2**63}, "seed", id="seed-2^63"),
    pytest.param({"seed": -1}, "seed", id="seed-negative"),
    pytest.param({"top_k": -2}, "top_k", id="top_k-below-minus-one"),
    pytest.param({"max_tokens": 0}, "max_tokens", id="max_tokens-0"),
    pytest.param({"max_tokens": 10**30}, "max_tokens", id="max_tokens-past-context"),
    pytest.param({"n": 129}, "n", id="n-129"),
    pytest.param({"logprobs": True, "top_logprobs": 21}, "top_logprobs", id="top_logprobs-21"),
    pytest.param({"presence_penalty": 2.5}, "presence_penalty", id="presence-penalty"),
    pytest.param({"logit_bias": {"5": 101}}, "logit_bias", id="logit_bias-value"),
    pytest.param({"logit_bias": {"999999": 1}}, "logit_bias", id="logit_bias-token-out-of-vocab"),
    pytest.param({"logit_bias": {"abc": 1}}, "logit_bias", id="logit_bias-key-not-a-token"),
    pytest.param({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", id="logit_bias-301-entries"),
    pytest.param({"stop": ["x"] * 10_000}, "stop", id="10k-stop-strings"),
    pytest.param({"stop": ["x" * 257]}, "stop[0]", id="stop-too-long"),
    pytest.param({"n": 4, "max_tokens": 300}, "max_tokens", id="n-x-max_tokens-past-budget"),
])
def test_bad_values_are_400_naming_the_field(exposed, fields, param):
    r = _post(exposed, _chat(**fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_10k_stop_strings_beside_a_normal_request(exposed):
    """10,000 stop strings would slow every engine step for everyone: refused at once, the next request unaffected."""
    started = time.monotonic()
    assert _post(exposed, _chat(stop=[f"s{i}" for i in range(10_000)])).status_code == 400
    assert _post(exposed, _chat()).status_code == 200
    assert time.monotonic() - started < 10


def test_logit_bias_forces_and_bans(exposed):
    forced = _post(exposed, _chat(logit_bias={"65": 100}, temperature=0, max_tokens=6)).json()
    assert forced["usage"]["completion_tokens"] == 6
    text = (forced["choices"][0]["message"].get("reasoning_content") or "") + (forced["choices"][0]["message"]["content"] or "")
    free = _post(exposed, _chat(temperature=0, max_tokens=6)).json()
    assert len(set(text)) == 1 and text != ((free["choices"][0]["message"].get("reasoning_content") or "")
                                            + (free["choices"][0]["message"]["content"] or ""))


def test_without_max_tokens_n_shares_the_request_budget(exposed):
    """No max_tokens: each of the n sequences gets its share of --max-request-tokens (1000), not the whole context."""
    body = {k: v for k, v in _chat(n=4, temperature=1.0, seed=3, ignore_eos=True).items() if k != "max_tokens"}
    r = _post(exposed, body)
    assert r.status_code == 200, r.text
    assert all(c["finish_reason"] == "length" for c in r.json()["choices"])
    assert r.json()["usage"]["completion_tokens"] == 4 * 250


def test_20k_messages_while_another_client_is_served(exposed):
    """Templating and tokenizing 20,000 messages runs off the event loop: streams and health checks go on."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} " * 4}
                for i in range(20_000)]
    heavy = {}

    def send_heavy():
        heavy["response"] = _post(exposed, {"model": MODEL, "messages": messages, "max_tokens": 4})

    thread = threading.Thread(target=send_heavy)
    thread.start()
    served = []
    while thread.is_alive() or not served:
        started = time.monotonic()
        assert httpx.get(exposed.url + "/health", timeout=10).status_code == 200
        assert _post(exposed, _chat(max_tokens=2)).status_code == 200
        served.append(time.monotonic() - started)
    thread.join()
    assert max(served) < 10, served
    assert heavy["response"].status_code == 400  # past the 512-token context, said after templating
    assert heavy["response"].json()["error"]["code"] == "context_length_exceeded"
    too_many = _post(exposed, {"model": MODEL, "messages": messages + messages, "max_tokens": 4})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "messages"


# ---- request ids ----------------------------------------------------------------------------------------------


def test_request_id_echoed_or_made(exposed):
    r = _post(exposed, _chat(), headers={"X-Request-Id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42" and r.json()["id"].startswith("chatcmpl-trace-42-")
    with httpx.stream("POST", exposed.url + "/v1/chat/completions", json=_chat(stream=True), timeout=60,
                      headers={"Authorization": f"Bearer {KEYS['team-c']}", "X-Request-Id": "trace-43"}) as s:
        assert s.headers["x-request-id"] == "trace-43"
        assert list(s.iter_lines())[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in s.read().decode()
    made = _post(exposed, _chat()).headers["x-request-id"]
    assert len(made) == 32
    refused = _post(exposed, _chat(), headers={"X-Request-Id": "bad id with spaces"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "X-Request-Id"
    assert httpx.get(exposed.url + "/health").headers["x-request-id"]
    unauthorized = httpx.get(exposed.url + "/v1/models", headers={"X-Request-Id": "trace-44"})
    assert unauthorized.status_code == 401 and unauthorized.headers["x-request-id"] == "trace-44"


# ---- keys, limits, audit ----------------------------------------------------------------------------------------


def test_keys_limits_429_to_that_key_only(exposed):
    assert httpx.post(exposed.url + "/v1/chat/completions", json=_chat()).status_code == 401
    wrong = _post(exposed, _chat(), headers={"Authorization": "Bearer sk-team-a-wrong"})
    assert wrong.status_code == 401 and "sk-team-a-wrong" not in wrong.text
    # team-a: 2 requests per minute
    assert [_post(exposed, _chat(), key="team-a").status_code for _ in range(2)] == [200, 200]
    limited = _post(exposed, _chat(), key="team-a")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    error = limited.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded" and KEYS["team-a"] not in limited.text
    assert _post(exposed, _chat(), key="team-c").status_code == 200  # the others go on
    # team-b: one request at a time
    body = _chat(stream=True, max_tokens=300, ignore_eos=True)
    with httpx.stream("POST", exposed.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEYS['team-b']}"}) as stream:
        lines = stream.iter_lines()
        next(lines)
        second = _post(exposed, _chat(), key="team-b")
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert _post(exposed, _chat(), key="team-c").status_code == 200
        rest = list(lines)
    assert "data: [DONE]" in rest
    assert _post(exposed, _chat(), key="team-b").status_code == 200  # its slot is free again
    metrics = httpx.get(exposed.url + "/metrics", headers={"Authorization": f"Bearer {KEYS['team-c']}"}).text
    assert 'dsserve:rate_limited_requests_total{key_name="team-a"}' in metrics
    assert 'key_name="team-b",route="/v1/chat/completions",status="429"' in metrics
    assert not any(key in metrics for key in KEYS.values())


def test_audit_lines_name_the_key_never_hold_it_nor_the_prompt(exposed):
    marker = "zebra-marker-7781"
    r = _post(exposed, {**_chat(), "messages": [{"role": "user", "content": marker}]}, key="team-c",
              headers={"X-Request-Id": "audit-1"})
    assert r.status_code == 200
    time.sleep(0.2)
    text = exposed.audit.read_text()
    assert not any(key in text for key in KEYS.values()) and marker not in text
    line = next(json.loads(s) for s in text.splitlines() if json.loads(s)["request_id"] == "audit-1")
    assert line["key"] == "team-c" and line["status"] == 200 and line["route"] == "/v1/chat/completions"
    assert line["model"] == MODEL and line["prompt_tokens"] > 0 and line["completion_tokens"] == 8
    assert line["finish_reason"] == ["length"] and line["latency_s"] > 0 and line["client"].startswith("127.0.0.1:")
    assert oct(exposed.audit.stat().st_mode & 0o777) == "0o600"


# ---- drain --------------------------------------------------------------------------------------------------------


def _stream_lines(server, body):
    """Open a stream and return (response context, line iterator) after its first chunk."""
    ctx = httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60)
    response = ctx.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    first = next(lines)
    assert first.startswith("data: ")
    return ctx, lines


def test_sigterm_drains_streams_then_exits_0(tmp_path):
    # 50 ms per step: a 100-token stream runs for about 5 s, well inside the 30 s default timeout
    server = Server(None, log_dir=tmp_path, env={"DSSERVE_FAULT_STEP_DELAY_S": "0.05"})
    try:
        ctx, lines = _stream_lines(server, _chat(stream=True, max_tokens=100, ignore_eos=True))
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        during = httpx.post(server.url + "/v1/chat/completions", json=_chat(), timeout=10)
        assert during.status_code == 503 and during.headers["retry-after"]
        assert during.json()["error"]["code"] == "server_shutting_down"
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        rest = list(lines)
        ctx.__exit__(None, None, None)
        assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
        events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length" and not any("error" in e for e in events)
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_shutdown_timeout_0_ends_streams_with_an_error_and_done(tmp_path):
    server = Server(None, "--shutdown-timeout", "0", log_dir=tmp_path, env={"DSSERVE_FAULT_STEP_DELAY_S": "0.05"})
    try:
        ctx, lines = _stream_lines(server, _chat(stream=True, max_tokens=200, ignore_eos=True))
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rest = [x for x in lines if x]
        ctx.__exit__(None, None, None)
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2][6:])["error"]
        assert error["code"] == "server_shutting_down" and "shutdown timeout" in error["message"]
        assert server.proc.wait(15) == 0 and time.monotonic() - started < 15
    finally:
        server.stop()


# ---- liveness -------------------------------------------------------------------------------------------------------


def test_health_fails_when_the_engine_is_stuck_in_a_step(tmp_path):
    server = Server(None, "--step-timeout", "1", log_dir=tmp_path, env={"DSSERVE_FAULT_STEP_DELAY_S": "3"})
    try:
        assert httpx.get(server.url + "/health").status_code == 200  # idle: the loop goes round
        thread = threading.Thread(target=lambda: httpx.post(server.url + "/v1/chat/completions",
                                                            json=_chat(max_tokens=1), timeout=30))
        thread.start()
        time.sleep(2.0)
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and "no progress" in health.json()["reason"]
        assert server.metrics()["dsserve:seconds_since_last_step"] > 1
        thread.join()
    finally:
        server.stop()


# ---- TLS ------------------------------------------------------------------------------------------------------------


def test_tls_with_a_self_signed_certificate_through_the_openai_client(tmp_path):
    import openai
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsserve test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    os.chmod(tmp_path / "key.pem", 0o600)
    server = Server(None, "--ssl-keyfile", str(tmp_path / "key.pem"), "--ssl-certfile", str(tmp_path / "cert.pem"),
                    log_dir=tmp_path / "logs")
    try:
        url = server.url.replace("http://", "https://")
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                               http_client=httpx.Client(verify=str(tmp_path / "ca.pem")))
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "9.11 or 9.8?"}],
                                               max_tokens=8)
        assert reply.usage.completion_tokens == 8
        with pytest.raises(httpx.ConnectError):  # a client without the CA refuses the certificate
            httpx.get(url + "/health")
        with pytest.raises(httpx.RemoteProtocolError):  # and plain HTTP is not served
            httpx.get(server.url + "/health")
    finally:
        server.stop()


def test_two_requests_with_the_same_request_id_both_finish(exposed):
    """A retry or a proxy may send one X-Request-Id twice at once: the engine's ids stay distinct."""
    results = []

    def stream():
        with httpx.stream("POST", exposed.url + "/v1/chat/completions", json=_chat(stream=True, max_tokens=16),
                          timeout=60, headers={"Authorization": f"Bearer {KEYS['team-c']}",
                                               "X-Request-Id": "same-id"}) as s:
            results.append((s.status_code, s.headers["x-request-id"], [x for x in s.iter_lines() if x][-1]))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [(200, "same-id", "data: [DONE]")] * 2
