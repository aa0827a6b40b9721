import pytest

from dsserve.options import load_toml
from dsserve.errors import ConfigError


def test_toml_keys_accept_dashes_and_reject_unknown(tmp_path):
    f = tmp_path / "serve.toml"
    f.write_text('max-model-len = 4096\nblock_size = 128\nserved_model_name = "DeepSeek-R1"\n')
    assert load_toml(f) == {"max_model_len": 4096, "block_size": 128, "served_model_name": "DeepSeek-R1"}
    f.write_text("max_model_lenn = 1\n")
    with pytest.raises(ConfigError, match="unknown key\\(s\\) max_model_lenn"):
        load_toml(f)
    f.write_text("max_model_len = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(f)


def test_serve_config_file_and_flag_override(tiny_r1, tmp_path, monkeypatch):
    """The CLI merges the file under the flags and hands the result to the launcher."""
    from typer.testing import CliRunner

    import dsserve.server.launch as launch
    from dsserve.cli import app

    seen = {}

    def fake_serve(model, server, options):
        seen.update(model=model, server=server, options=options)
        return 0

    monkeypatch.setattr(launch, "serve", fake_serve)
    f = tmp_path / "serve.toml"
    f.write_text(f'model = "{tiny_r1}"\nmax_model_len = 1024\nblock_size = 128\nport = 9000\napi_key = "k"\n')
    result = CliRunner().invoke(app, ["serve", "--config", str(f), "--max-model-len", "512"])
    assert result.exit_code == 0, result.output
    assert seen["options"] == {"max_model_len": 512, "block_size": 128}
    assert seen["model"] == str(tiny_r1) and seen["server"].port == 9000 and seen["server"].api_key == "k"


def test_stream_interval_from_flag_or_file_and_refused_below_one(tiny_r1, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import dsserve.server.launch as launch
    from dsserve.cli import app

    seen = {}
    monkeypatch.setattr(launch, "serve", lambda model, server, options: seen.update(server=server))
    f = tmp_path / "serve.toml"
    f.write_text(f'model = "{tiny_r1}"\nstream-interval = 3\n')
    assert CliRunner().invoke(app, ["serve", "--config", str(f)]).exit_code == 0
    assert seen["server"].stream_interval == 3
    assert CliRunner().invoke(app, ["serve", "--config", str(f), "--stream-interval", "5"]).exit_code == 0
    assert seen["server"].stream_interval == 5
    for bad in ("0", "2.5", '"4"'):
        f.write_text(f'model = "{tiny_r1}"\nstream_interval = {bad}\n')
        result = CliRunner().invoke(app, ["serve", "--config", str(f)])
        assert result.exit_code != 0 and "must be a whole number of at least 1" in result.output, bad
