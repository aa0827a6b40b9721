from typer.testing import CliRunner

from dsserve.cli import app


def test_generate_runs_on_a_given_model(tiny_r1):
    result = CliRunner().invoke(app, ["generate", "Hi", "--model", str(tiny_r1), "--max-tokens", "5",
                                      "--temperature", "0", "--kv-cache-memory", "16MiB"])
    assert result.exit_code == 0, result.output
    assert "finish_reason=" in result.output


def test_generate_without_model_uses_the_demo_model():
    result = CliRunner().invoke(app, ["generate", "What is 57 + 68?", "--temperature", "0", "--kv-cache-memory", "16MiB"])
    assert result.exit_code == 0, result.output
    assert "carry 1 in front: 125\n</think>\n\n125\n" in result.output and "finish_reason=stop" in result.output


def test_bench_throughput_prints_tokens_per_second(tiny_r1):
    result = CliRunner().invoke(app, ["bench", "throughput", "--model", str(tiny_r1), "--num-prompts", "4",
                                      "--input-len", "8", "--output-len", "8"])
    assert result.exit_code == 0, result.output
    assert "output tokens/s" in result.output


def test_bad_model_path_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["generate", "Hi", "--model", str(tmp_path / "missing")])
    assert result.exit_code != 0
    assert "does not exist" in str(result.exception)
