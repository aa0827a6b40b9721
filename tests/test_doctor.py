import json
import socket

from typer.testing import CliRunner

from dsserve.cli import app
from dsserve.doctor.checks import run_checks


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

    import dsserve.kernels.cpu as cpu_kernels_module
    from dsserve.doctor.checks import _cpu_kernels
    from dsserve.kernels import cpu as attention_kernel

    ok, text = _cpu_kernels()
    assert "float32 (oneDNN)" in text
    if attention_kernel.linear_f16_usable():  # a machine with a C compiler and AVX2, as CI
        assert ok is True and "float16 (dsserve kernel)" in text and "small-op kernels built" in text
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
