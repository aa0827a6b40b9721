"""options.EngineArgs / ServerArgs declare each option once: every CLI-visible one is a flag of `dsserve serve`,
every one is a TOML key and (engine options) an `LLM` keyword; unknown names are errors that list the known ones;
the resolved EngineConfig is frozen with nothing replaced later."""

import dataclasses

import pytest
import typer.main

from dsserve.cli import app
from dsserve.config import EngineConfig, resolve_backend
from dsserve.engine.engine import LLMEngine, build_engine_config
from dsserve.errors import ConfigError
from dsserve.options import EngineArgs, ServerArgs, cli_fields, load_toml, names


def _serve_flags() -> set[str]:
    serve = typer.main.get_command(app).commands["serve"]
    return {opt for param in serve.params for opt in (*param.opts, *param.secondary_opts)}


@pytest.mark.parametrize("cls", [EngineArgs, ServerArgs])
def test_every_cli_visible_field_is_a_serve_flag(cls):
    flags = _serve_flags()
    for f, kind in cli_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags, f"{cls.__name__}.{f.name} has no --{flag} on `dsserve serve`"
        if kind is bool:
            assert "--no-" + flag[2:] in flags


@pytest.mark.parametrize("cls", [EngineArgs, ServerArgs])
def test_every_option_is_a_toml_key(cls, tmp_path):
    config = tmp_path / "serve.toml"
    keys = names(cls)
    config.write_text("".join(f"{name.replace('_', '-')} = 1\n" for name in keys))
    assert set(load_toml(config)) == set(keys)


def test_every_engine_option_is_an_llm_keyword(tiny_r1):
    """Each field's default, passed by name, is what leaving it out gives."""
    given = {f.name: f.default for f in dataclasses.fields(EngineArgs)}
    assert build_engine_config(tiny_r1, **given) == build_engine_config(tiny_r1)


@pytest.mark.parametrize("where", ["llm", "toml"])
def test_an_unknown_option_is_named_with_the_known_ones(tiny_r1, tmp_path, where):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) max_model_lenn; known keys: .*max_model_len") as e:
        if where == "llm":
            build_engine_config(tiny_r1, max_model_lenn=64)
        else:
            (tmp_path / "serve.toml").write_text("max_model_lenn = 64\n")
            load_toml(tmp_path / "serve.toml")
    assert "block_size" in str(e.value) and "backend" in str(e.value)


def test_engine_config_holds_only_resolved_fields(tiny_r1):
    config = build_engine_config(tiny_r1, max_model_len=64)
    assert "extra" not in {f.name for f in dataclasses.fields(EngineConfig)}
    assert config.backend == "cpu" and config.scheduler.fit_max_model_len is False
    assert EngineConfig.from_json(config.to_json()) == config


def test_a_fitted_max_model_len_is_the_one_every_part_holds(tiny_r1):
    """A default max_model_len (the model's 2048) is lowered to what 4 blocks of 16 hold; the engine's config, the
    scheduler's and the config handed to other ranks (to_json) all say 64."""
    engine = LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=4, block_size=16))
    try:
        assert engine.config.scheduler.max_model_len == 64
        assert engine.scheduler.config is engine.config.scheduler
        assert EngineConfig.from_json(engine.config.to_json()).scheduler.max_model_len == 64
    finally:
        engine.shutdown()
    with pytest.raises(ConfigError, match="does not fit the KV cache"):
        LLMEngine(build_engine_config(tiny_r1, num_kv_blocks=4, block_size=16, max_model_len=128))


@pytest.mark.parametrize("requested,device,resolved", [
    pytest.param("auto", "cpu", "cpu", id="auto-cpu"),
    pytest.param("auto", "cuda", "torch", id="auto-cuda"),
    pytest.param("torch", "cpu", "torch", id="torch-cpu"),
    pytest.param("cpu", "cpu", "cpu", id="cpu-cpu"),
])
def test_backend_resolves(requested, device, resolved):
    assert resolve_backend(requested, device) == resolved


def test_backend_cpu_on_cuda_and_unknown_backends_are_errors():
    with pytest.raises(ConfigError, match="--backend cpu"):
        resolve_backend("cpu", "cuda")
    with pytest.raises(ConfigError, match="auto, cpu, torch"):
        EngineArgs(backend="triton")


@pytest.mark.parametrize("options,message", [
    pytest.param({"stream_interval": 0}, "--stream-interval must be a whole number", id="stream-interval"),
    pytest.param({"max_stop": True}, "--max-stop must be a whole number", id="bool-cap"),
    pytest.param({"reasoning_parser": "r2"}, "--reasoning-parser must be one of", id="parser"),
    pytest.param({"node_rank": 1}, "--node-rank needs --rank-table", id="node-rank"),
    pytest.param({"shutdown_timeout": -1}, "--shutdown-timeout must be >= 0", id="shutdown"),
])
def test_server_args_are_checked_when_made(options, message):
    with pytest.raises(ConfigError, match=message):
        ServerArgs.from_options(options)
