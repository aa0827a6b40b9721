"""`dsserve eval --task demo` in-process on the built-in demo model: >= 95% of its held-out problems."""

import json

from typer.testing import CliRunner

from dsserve.cli import app


def test_demo_model_scores_in_process(tmp_path):
    out = tmp_path / "demo.json"
    result = CliRunner().invoke(app, ["eval", "--task", "demo", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["total"] >= 500 and report["unparseable"] < report["total"] * 0.05
    assert report["accuracy"] >= 0.95, result.output
    assert {s["subject"] for s in report["subjects"]} == {"add", "sub", "compare", "count"}
