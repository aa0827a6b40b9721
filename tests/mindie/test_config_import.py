"""`dsserve config import-mindie` on the service config the seed deployment guide edits by hand, and its HTTPS
fields (httpsEnabled, true by default, and the tls* paths)."""

import json

import pytest
from typer.testing import CliRunner

from dsserve.cli import app
from dsserve.mindie.config_import import import_mindie
from dsserve.options import load_toml
from dsserve.errors import ConfigError

# The fields and defaults the guide lists (ServerConfig, BackendConfig with ModelDeployConfig and
# ScheduleConfig nested as MindIE nests them, LogConfig).
SEED_CONFIG = {
    "Version": "1.0.0",
    "LogConfig": {"logLevel": "Info", "logFileSize": 20, "logFileNum": 20, "logPath": "logs/mindie-server.log"},
    "ServerConfig": {
        "ipAddress": "127.0.0.1", "managementIpAddress": "127.0.0.2", "port": 1025, "managementPort": 1026,
        "metricsPort": 1027, "maxLinkNum": 300, "httpsEnabled": False, "tlsCaPath": "security/ca/",
        "tlsCaFile": ["ca.pem"], "tlsCert": "security/certs/server.pem", "tlsPk": "security/keys/server.key.pem",
        "tlsCrl": "security/certs/server_crl.pem", "openAiSupport": "vllm",
    },
    "BackendConfig": {
        "backendName": "mindieservice_llm_engine", "modelInstanceNumber": 1,
        "npuDeviceIds": [[0, 1, 2, 3, 4, 5, 6, 7]], "tokenizerProcessNumber": 8, "multiNodesInferEnabled": True,
        "multiNodesInferPort": 1120, "interNodeTLSEnabled": False,
        "ModelDeployConfig": {
            "maxSeqLen": 10000, "maxInputTokenLen": 2048, "truncation": True,
            "ModelConfig": [{"modelInstanceType": "Standard", "modelName": "DeepSeek-R1",
                             "modelWeightPath": "/data/DeepSeek-R1-W8A8", "worldSize": 8, "cpuMemSize": 5,
                             "npuMemSize": -1, "backendType": "atb", "trustRemoteCode": False}],
        },
        "ScheduleConfig": {
            "templateType": "Standard", "templateName": "Standard_LLM", "cacheBlockSize": 128,
            "maxPrefillBatchSize": 8, "maxPrefillTokens": 2048, "prefillTimeMsPerReq": 150, "prefillPolicyType": 0,
            "decodeTimeMsPerReq": 50, "decodePolicyType": 0, "maxBatchSize": 8, "maxIterTimes": 1024,
            "maxPreemptCount": 0, "supportSelectBatch": False, "maxQueueDelayMicroseconds": 5000,
        },
    },
}


def test_seed_config_maps_and_lists_the_rest():
    options, notes = import_mindie(SEED_CONFIG)
    assert options == {
        "host": "127.0.0.1", "port": 1025, "max_queued_requests": 600, "served_model_name": "DeepSeek-R1",
        "model": "/data/DeepSeek-R1-W8A8", "max_model_len": 10000, "max_input_len": 2048, "truncate_input": True,
        "block_size": 128, "max_num_seqs": 8, "max_num_batched_tokens": 2048, "log_level": "INFO",
        "master_port": 1120,  # multiNodesInferEnabled: the rank table gives the size, this port the rendezvous
    }
    why = dict(notes)
    for field in ("managementPort", "metricsPort", "httpsEnabled", "npuDeviceIds", "worldSize", "maxIterTimes",
                  "prefillTimeMsPerReq", "logPath", "trustRemoteCode"):
        assert field in why and why[field], field


def test_single_node_world_size_is_the_tensor_parallel_size():
    single = json.loads(json.dumps(SEED_CONFIG))
    single["BackendConfig"]["multiNodesInferEnabled"] = False
    options, notes = import_mindie(single)
    assert options["tensor_parallel_size"] == 8 and "master_port" not in options
    assert "worldSize" not in dict(notes)


def test_cli_writes_a_toml_serve_reads(tmp_path):
    src = tmp_path / "config.json"
    src.write_text(json.dumps(SEED_CONFIG))
    result = CliRunner().invoke(app, ["config", "import-mindie", str(src)])
    assert result.exit_code == 0, result.output
    toml = tmp_path / "dsserve.toml"
    toml.write_text(result.output)
    assert load_toml(toml)["max_model_len"] == 10000
    assert "# MindIE fields with no dsserve equivalent:" in result.output
    bad = tmp_path / "not_mindie.json"
    bad.write_text("{}")
    assert CliRunner().invoke(app, ["config", "import-mindie", str(bad)]).exit_code != 0


def _https(**server) -> dict:
    """The seed config with HTTPS on (MindIE's default) and ServerConfig fields replaced; None removes one."""
    config = json.loads(json.dumps(SEED_CONFIG))
    config["ServerConfig"].update(httpsEnabled=True, tlsCrlPath="security/certs/", tlsCrlFiles=["server_crl.pem"])
    config["ServerConfig"].update(server)
    config["ServerConfig"] = {k: v for k, v in config["ServerConfig"].items() if v is not None}
    return config


def test_https_in_the_install_folder_maps_to_mutual_tls(tmp_path):
    """MindIE reads relative TLS paths from its install folder (conf/config.json's parent); a CA means client
    certificates are required (ssl_cert_reqs 2 = ssl.CERT_REQUIRED)."""
    install = tmp_path / "mindie-service"
    (install / "conf").mkdir(parents=True)
    src = install / "conf" / "config.json"
    src.write_text(json.dumps(_https(ipAddress="10.0.0.5")))
    result = CliRunner().invoke(app, ["config", "import-mindie", str(src)])
    assert result.exit_code == 0, result.output
    toml = tmp_path / "dsserve.toml"
    toml.write_text(result.output)
    options = load_toml(toml)
    assert options["host"] == "10.0.0.5"
    assert options["ssl_certfile"] == str(install / "security/certs/server.pem")
    assert options["ssl_keyfile"] == str(install / "security/keys/server.key.pem")
    assert options["ssl_ca_certs"] == str(install / "security/ca/ca.pem") and options["ssl_cert_reqs"] == 2
    assert "tlsCrlFiles: revocation lists are not checked" in result.output


def test_absolute_tls_paths_map_wherever_the_config_is():
    options, notes = import_mindie(_https(ipAddress="0.0.0.0", tlsCaPath="/pki/ca", tlsCaFile=["a.pem", "b.pem"],
                                          tlsCert="/pki/server.pem", tlsPk="/pki/server.key"))
    assert options["ssl_certfile"] == "/pki/server.pem" and options["ssl_keyfile"] == "/pki/server.key"
    assert options["ssl_ca_certs"] == "/pki/ca/a.pem" and options["ssl_cert_reqs"] == 2
    assert "concatenate a.pem, b.pem into one PEM bundle" in dict(notes)["tlsCaFile"]
    assert not any(field in dict(notes) for field in ("tlsCert", "tlsPk", "httpsEnabled"))


@pytest.mark.parametrize("server,problem", [
    pytest.param({"tlsPkPwd": "security/pass/key_pwd.txt"}, "the private key is encrypted", id="encrypted-key"),
    pytest.param({"tlsCert": None, "tlsPk": None}, "tlsCert and tlsPk are not both set", id="no-cert"),
    pytest.param({"httpsEnabled": None, "tlsCert": None}, "tlsCert and tlsPk are not both set", id="https-by-default"),
    pytest.param({}, "are relative to MindIE's install folder", id="relative-elsewhere"),
])
@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::", "node1.example"])
def test_https_that_cannot_carry_over_never_becomes_plain_http_on_a_network_address(server, problem, host):
    with pytest.raises(ConfigError, match="will not turn it into plain HTTP") as error:
        import_mindie(_https(ipAddress=host, **server))
    assert problem in str(error.value) and host in str(error.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", None])
def test_https_that_cannot_carry_over_stays_on_loopback_with_a_note(host):
    options, notes = import_mindie(_https(ipAddress=host, tlsPkPwd="security/pass/key_pwd.txt"))
    assert not any(k.startswith("ssl_") for k in options) and options.get("host", "127.0.0.1") == (host or "127.0.0.1")
    why = dict(notes)
    assert "serves plain HTTP, on loopback" in why["httpsEnabled"] and "encrypted" in why["httpsEnabled"]
    assert why["tlsCert"] == "not carried over (see httpsEnabled)"


def test_cli_names_the_tls_problem(tmp_path):
    src = tmp_path / "config.json"
    src.write_text(json.dumps(_https(ipAddress="0.0.0.0", tlsCert="/pki/s.pem", tlsPk="/pki/s.key",
                                     tlsPkPwd="security/pass/key_pwd.txt")))
    result = CliRunner().invoke(app, ["config", "import-mindie", str(src)])
    assert result.exit_code != 0 and "ssl_" not in result.output  # no TOML printed
    assert isinstance(result.exception, ConfigError)  # main() prints it as an error line
    assert "tlsPkPwd" in str(result.exception) and "set ipAddress to 127.0.0.1" in str(result.exception)
