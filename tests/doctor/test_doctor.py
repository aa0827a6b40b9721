import datetime
import json
import socket

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (BestAvailableEncryption, Encoding, NoEncryption,
                                                          PrivateFormat)
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from dsserve.cli import app
from dsserve.doctor.access import check_access
from dsserve.doctor.checks import run_checks
from dsserve.doctor.tls import check_tls


def test_healthy_setup_passes(tiny_r1, tmp_path, monkeypatch):
    monkeypatch.setenv("DSSERVE_LOG_DIR", str(tmp_path / "logs"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    result = CliRunner().invoke(app, ["doctor", "--model", str(tiny_r1), "--port", str(free_port)])
    assert result.exit_code == 0, result.output
    assert "model folder" in result.output and "the model fits" in result.output


def test_failures_say_what_to_do(tiny_r1, tmp_path, monkeypatch):
    monkeypatch.setenv("DSSERVE_LOG_DIR", "/proc/dsserve-cannot-write-here")
    table = tmp_path / "rank_table.json"
    table.write_text(json.dumps({"server_count": "1", "status": "completed", "version": "1.0",
                                 "server_list": [{"server_id": "10.0.0.1", "device": [
                                     {"device_id": "0", "device_ip": "10.1.0.1", "rank_id": "1"}]}]}))
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        lines = run_checks(str(broken), None, busy.getsockname()[1], str(table))
    failures = [m for ok, m in lines if ok is False]
    assert any("'gpt2' is not supported" in m for m in failures)
    assert any("is taken" in m and "--port" in m for m in failures)
    assert any("rank table" in m and "missing [0]" in m for m in failures)
    assert any("not writable" in m and "DSSERVE_LOG_DIR" in m for m in failures)


def test_cpu_kernels_line_names_what_is_missing(monkeypatch):
    import torch

    import dsserve.backends.cpu.kernels as cpu_kernels_module
    from dsserve.doctor.checks import _cpu_kernels
    from dsserve.backends.cpu import kernels as attention_kernel

    ok, text = _cpu_kernels()
    assert "float32 (oneDNN)" in text
    if attention_kernel.linear_f16_usable():  # a machine with a C compiler and AVX2, as CI
        assert ok is True and "float16 (dsserve kernel)" in text and "small-op kernels built" in text
        assert "attention: C kernel paged_attention.c" in text and "float16 C kernel linear_f16.c" in text
        assert "decode: every layer in one C call" in text
    assert ("bfloat16 (dsserve AMX kernel)" in text) == attention_kernel.linear_bf16_usable()
    monkeypatch.setattr(cpu_kernels_module, "packed_weights_unavailable",
                        lambda dtype: "no fp16 kernel in this build" if dtype == torch.float16 else None)
    ok, text = _cpu_kernels()
    assert ok is None
    assert "packed weights float32 (oneDNN)" in text and "(float16 (" in text and "no fp16 kernel in this build" in text
    monkeypatch.setattr(attention_kernel, "_state", {})
    monkeypatch.setattr(attention_kernel, "_compiler", lambda: None)
    monkeypatch.setattr(cpu_kernels_module, "packed_weights_unavailable", lambda dtype: None)
    ok, text = _cpu_kernels()
    assert "float16 (FBGEMM)" in text  # no library: fp16 weights take FBGEMM's GEMM
    assert ok is None and "kernels (decode attention, fp16 linear, small ops) unavailable (no C compiler" in text
    assert "apt install gcc" in text
    assert "attention: torch" in text and "decode: per-layer torch modules" in text  # which path runs instead


# ---- TLS files and network exposure ----------------------------------------------------------------------

NOW = datetime.datetime.now(datetime.timezone.utc)
SECRET = "sk-never-print-this-0123456789"


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject_key, name, issuer_key=None, issuer_name=None, days=(-1, 365), is_ca=False):
    """A certificate for `subject_key` valid from NOW + days[0] to NOW + days[1]; self-signed without an issuer."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
               .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW + datetime.timedelta(days=days[0]))
               .not_valid_after(NOW + datetime.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if not is_ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(issuer_key or subject_key, hashes.SHA256())


def _write(path, data, mode=0o600):
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


def _pem(cert):
    return cert.public_bytes(Encoding.PEM)


def _key_pem(key, password=None):
    encryption = BestAvailableEncryption(password) if password else NoEncryption()
    return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)


@pytest.fixture
def tls(tmp_path):
    """A CA, a server key and the certificate the CA issued for it, plus spoilt variants, as file paths."""
    ca_key, server_key = _key(), _key()
    ca = _cert(ca_key, "dsserve test CA", is_ca=True)
    issue = dict(issuer_key=ca_key, issuer_name=ca.subject)
    return {
        "cert": _write(tmp_path / "server.pem", _pem(_cert(server_key, "llm.example.com", **issue))),
        "key": _write(tmp_path / "server.key", _key_pem(server_key)),
        "ca": _write(tmp_path / "ca.pem", _pem(ca)),
        "other_key": _write(tmp_path / "other.key", _key_pem(_key())),
        "expired": _write(tmp_path / "expired.pem", _pem(_cert(server_key, "old", days=(-400, -35), **issue))),
        "future": _write(tmp_path / "future.pem", _pem(_cert(server_key, "new", days=(2, 30), **issue))),
        "expiring": _write(tmp_path / "expiring.pem", _pem(_cert(server_key, "soon", days=(-300, 10), **issue))),
        "self_signed": _write(tmp_path / "self.pem", _pem(_cert(server_key, "self"))),
        "encrypted": _write(tmp_path / "encrypted.key", _key_pem(server_key, b"hunter2")),
        "open_key": _write(tmp_path / "open.key", _key_pem(server_key), mode=0o644),
        "missing": str(tmp_path / "nowhere.pem"),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_good_tls_config_passes(tls, tmp_path, monkeypatch):
    monkeypatch.setenv("DSSERVE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("DSSERVE_API_KEY", raising=False)
    config = tmp_path / "serve.toml"
    config.write_text(f'ssl_certfile = "{tls["cert"]}"\nssl_keyfile = "{tls["other_key"]}"\n'
                      f'ssl_ca_certs = "{tls["ca"]}"\nssl_cert_reqs = 2\nport = {_free_port()}\n')
    # the flag overrides the config's (wrong) key, as serve's flags do
    result = CliRunner().invoke(app, ["doctor", "--config", str(config), "--ssl-keyfile", tls["key"]])
    assert result.exit_code == 0, result.output
    assert "certificate for llm.example.com" in result.output and "expires in 364 day(s)" in result.output
    assert f"the private key in {tls['key']} matches the certificate" in result.output
    assert "chains to CN=dsserve test CA" in result.output and "client certificate required" in result.output


@pytest.mark.parametrize("options, expected", [
    pytest.param({"ssl_certfile": "cert", "ssl_keyfile": "other_key"}, "does not match the certificate",
                 id="mismatched-key"),
    pytest.param({"ssl_certfile": "expired", "ssl_keyfile": "key"}, "expired on", id="expired"),
    pytest.param({"ssl_certfile": "future", "ssl_keyfile": "key"}, "is not valid until", id="not-yet-valid"),
    pytest.param({"ssl_certfile": "missing", "ssl_keyfile": "key"}, "nowhere.pem does not exist", id="missing-cert"),
    pytest.param({"ssl_certfile": "cert", "ssl_keyfile": "missing"}, "nowhere.pem does not exist", id="missing-key"),
    pytest.param({"ssl_certfile": "cert"}, "--ssl-certfile is set without --ssl-keyfile", id="cert-only"),
    pytest.param({"ssl_keyfile": "key"}, "--ssl-keyfile is set without --ssl-certfile", id="key-only"),
    pytest.param({"ssl_certfile": "cert", "ssl_keyfile": "encrypted"}, "is encrypted: uvicorn would need its password",
                 id="encrypted-key"),
    pytest.param({"ssl_certfile": "key", "ssl_keyfile": "cert"}, "are --ssl-keyfile and --ssl-certfile swapped?",
                 id="swapped"),
    pytest.param({"ssl_certfile": "cert", "ssl_keyfile": "key", "ssl_cert_reqs": 2}, "every client would be refused",
                 id="client-certs-without-ca"),
    pytest.param({"ssl_certfile": "cert", "ssl_keyfile": "key", "ssl_cert_reqs": 3}, "ssl_cert_reqs must be 0",
                 id="bad-cert-reqs"),
    pytest.param({"ssl_ca_certs": "ca"}, "TLS is off", id="ca-without-tls"),
])
def test_tls_failures(tls, options, expected):
    options = {k: tls.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    failures = [m for ok, m in check_tls(options) if ok is False]
    assert any(expected in m for m in failures), failures


def test_tls_warnings_do_not_fail(tls):
    lines = check_tls({"ssl_certfile": tls["expiring"], "ssl_keyfile": tls["open_key"], "ssl_ca_certs": tls["ca"]})
    assert not [m for ok, m in lines if ok is False], lines
    infos = [m for ok, m in lines if ok is None]
    assert any("expires in 9 day(s)" in m for m in infos)
    assert any("readable by its group and every user (mode 0644); chmod 600" in m for m in infos)
    assert any("ssl_cert_reqs is 0" in m for m in infos)  # a CA file that no client is asked to match
    lines = check_tls({"ssl_certfile": tls["self_signed"], "ssl_keyfile": tls["key"], "ssl_ca_certs": tls["ca"]})
    assert any(ok is None and "does not chain to a CA" in m for ok, m in lines)  # the CA file is for clients


def _keys_file(tmp_path, text, mode=0o600):
    return _write(tmp_path / "keys.toml", text.encode(), mode)


@pytest.mark.parametrize("host, exposed", [
    ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False), ("[::1]", False), ("localhost", False),
    ("0.0.0.0", True), ("::", True), ("", True), ("10.0.0.5", True), ("llm.internal", True),
])
def test_exposure_without_key(host, exposed):
    failures = [m for ok, m in check_access({"host": host}, env={}) if ok is False]
    assert bool(failures) == exposed
    if exposed:
        assert "without an API key: set --api-key / --api-key-file, or bind 127.0.0.1" in failures[0]


def test_exposure_with_key_recommends_tls(tls):
    lines = check_access({"host": "0.0.0.0", "api_key": SECRET}, env={})
    assert not [m for ok, m in lines if ok is False]
    assert any(ok is None and "TLS-terminating proxy" in m for ok, m in lines)
    lines = check_access({"host": "0.0.0.0", "ssl_certfile": tls["cert"], "ssl_keyfile": tls["key"]},
                         env={"DSSERVE_API_KEY": SECRET})
    assert [ok for ok, _ in lines] == [True, True]


@pytest.mark.parametrize("text, expected", [
    pytest.param('[[keys]]\nname = "team-a"\nkey = "sk-a"\n[[keys]]\nname = "team-a"\nkey = "sk-b"\n',
                 "name 'team-a' is given 2 times (--api-key-file entry 1, --api-key-file entry 2)",
                 id="duplicate-name"),
    pytest.param(f'[[keys]]\nname = "team-a"\nkey = "{SECRET}"\n[[keys]]\nname = "team-b"\nkey = "{SECRET}"\n',
                 "'team-a' (--api-key-file entry 1) and 'team-b' (--api-key-file entry 2) are the same key",
                 id="duplicate-key"),
    pytest.param('[[keys]]\nname = "api-key-1"\nkey = "sk-c"\n',
                 "name 'api-key-1' is given 2 times (api_key, --api-key-file entry 1)", id="name-of-a-flag-key"),
    pytest.param('[[keys]]\nname = ""\nkey = "sk-a"\n', "entry 1 needs a non-empty `name`", id="empty-name"),
    pytest.param('[[keys]]\nname = "team-a"\n', "entry 1 ('team-a') needs a non-empty `key`", id="no-key"),
    pytest.param('[[keys]]\nname = "a"\nkey = "sk-a"\nrequests_per_minute = 0\n', "must be a whole number >= 1",
                 id="zero-limit"),
    pytest.param('[[keys]]\nname = "a"\nkey = "sk-a"\nmax_concurrent = "4"\n', "must be a whole number >= 1",
                 id="string-limit"),
    pytest.param('[[keys]]\nname = "a"\nkey = "sk-a"\nrequest_per_minute = 5\n', "unknown field(s) request_per_minute",
                 id="typo-field"),
    pytest.param('name = "a"\n', "must hold [[keys]] tables", id="no-tables"),
    pytest.param(f'[[keys]]\nname = "a"\nkey = "{SECRET}\n', "is not valid TOML", id="bad-toml"),
])
def test_keys_file_failures(tmp_path, text, expected):
    options = {"host": "0.0.0.0", "api_key": "sk-b", "api_key_file": _keys_file(tmp_path, text)}
    lines = check_access(options, env={})
    failures = [m for ok, m in lines if ok is False]
    assert any(expected in m for m in failures), failures
    assert not any(SECRET in m or "sk-a" in m or "sk-b" in m for _, m in lines)


def test_keys_file_passes_and_warns_on_permissions(tmp_path):
    path = _keys_file(tmp_path, '[[keys]]\nname = "team-a"\nkey = "sk-a"\nrequests_per_minute = 60\n'
                                '[[keys]]\nname = "team-b"\nkey = "sk-b"\nmax_concurrent = 4\n', mode=0o640)
    lines = check_access({"host": "10.0.0.5", "api_key_file": path}, env={})
    assert not [m for ok, m in lines if ok is False], lines
    assert any(ok and "2 API key(s): team-a, team-b" in m for ok, m in lines)
    assert any(ok is None and "readable by its group (mode 0640)" in m for ok, m in lines)


def test_doctor_never_prints_a_key(tmp_path, monkeypatch):
    monkeypatch.setenv("DSSERVE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("DSSERVE_API_KEY", raising=False)
    keys = _keys_file(tmp_path, f'[[keys]]\nname = "team-a"\nkey = "{SECRET}"\nmax_concurrent = -1\n'
                                f'[[keys]]\nname = "team-a"\nkey = "{SECRET}"\n', mode=0o644)
    config = tmp_path / "serve.toml"
    config.write_text(f'host = "0.0.0.0"\nport = {_free_port()}\napi_key = ["{SECRET}", ""]\n'
                      f'api_key_file = "{keys}"\n')
    result = CliRunner().invoke(app, ["doctor", "--config", str(config)])
    assert result.exit_code == 1
    assert "is given 2 times" in result.output and "api_key entry 2 must be a non-empty string" in result.output
    assert SECRET not in result.output
