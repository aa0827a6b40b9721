"""The benchmark timing core and MindIE's performance CSV."""

import pytest
from typer.testing import CliRunner

from dsserve.bench.timing import time_batch
from dsserve.mindie.perf_csv import MINDIE_COLUMNS, MindieRow, mindie_csv
from dsserve.cli import app

HEADER = ("Model,Batchsize,In_seq,Out_seq,Total time(s),First token time(ms),Non-first token time(ms),"
          "Non-first token Throughput(Tokens/s),E2E Throughput(Tokens/s),Non-first token Throughput Average(Tokens/s),"
          "E2E Throughput Average(Tokens/s)")


def test_reproduces_the_published_mindie_row():
    """DeepSeek-R1 W8A8 on 2 x 8 Ascend 910B: batch 16, 256/256, 18.6202795506 s total, 71.03 ms per token."""
    row = MindieRow("DeepSeek-R1", 16, 256, 256, 18.6202795506, 478.0, 71.03)
    assert row.decode_throughput == pytest.approx(225.26, abs=0.005)
    assert row.e2e_throughput == pytest.approx(219.98, abs=0.005)
    lines = mindie_csv([row]).splitlines()
    assert lines[0] == HEADER == ",".join(MINDIE_COLUMNS)
    assert lines[1].split(",")[-4:] == ["225.26", "219.98", "225.26", "219.98"]


def test_averages_only_on_the_last_row():
    rows = [MindieRow("m", 1, 8, 8, 1.0, 5.0, 10.0), MindieRow("m", 4, 8, 8, 2.0, 5.0, 20.0)]
    lines = mindie_csv(rows).splitlines()
    assert lines[1].endswith(",,")
    assert lines[2].split(",")[-2:] == [f"{(100 + 200) / 2:.2f}", f"{(8 + 16) / 2:.2f}"]


def test_time_batch_counts_exact_tokens(tiny_llm):
    t = time_batch(tiny_llm.engine, 3, 10, 6)
    assert len(t.decode_steps_s) == 5  # the first token comes with the prefill, then 5 decode steps
    assert t.total_s >= t.first_token_s + sum(t.decode_steps_s) * 0.99


def test_perf_cli_writes_the_csv(tiny_r1, tmp_path):
    out = tmp_path / "perf.csv"
    result = CliRunner().invoke(app, ["bench", "perf", "--model", str(tiny_r1), "--cases", "[[8,4],[16,4]]",
                                      "--batch-sizes", "1,2", "--output", str(out), "--kv-cache-memory", "16MiB"])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == HEADER and len(lines) == 5
    latency = CliRunner().invoke(app, ["bench", "latency", "--model", str(tiny_r1), "--batch-size", "2",
                                       "--input-len", "8", "--output-len", "4"])
    assert latency.exit_code == 0 and "decode step mean" in latency.output


def test_latency_profile_breaks_the_decode_step_down(tiny_r1):
    from dsserve.profiling import profile_rows
    from dsserve.profiling import PROFILER

    result = CliRunner().invoke(app, ["bench", "latency", "--model", str(tiny_r1), "--batch-size", "4",
                                      "--input-len", "16", "--output-len", "12", "--profile"])
    assert result.exit_code == 0, result.output
    for label in ("model forward", "of which attention", "LM head", "sampling", "scheduling", "detokenizing",
                  "whole decode step"):
        assert label in result.output, label
    assert not PROFILER.enabled  # off again after the run: no cost on the serving path
    rows = {label.strip(): ms for label, ms, _ in profile_rows()}
    assert PROFILER.steps == 11  # the decode steps only (the first token comes from the prefill)
    assert 0 < rows["of which attention"] < rows["model forward"] < rows["whole decode step"]
    parts = sum(ms for label, ms, _ in profile_rows()[:-1] if not label.startswith("  "))
    assert parts == pytest.approx(rows["whole decode step"], rel=1e-6)
