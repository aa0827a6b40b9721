"""`dsserve config import-mindie` on the service config the seed deployment guide edits by hand."""

import json

from typer.testing import CliRunner

from dsserve.cli import app
from dsserve.config import import_mindie, load_toml

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
