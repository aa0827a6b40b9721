"""A rank other than 0: load this rank's share of the model, then run rank 0's steps until told to stop.

Started by a node's first process (`python -m dsserve.runner.worker`, the resolved settings in
$DSSERVE_WORKER_CONFIG), or by `dsserve serve` itself on a rank that is not 0 (a rank table's other
nodes, torchrun's other ranks). Exits 0 on rank 0's stop, 1 on any failure, after saying why.
"""

from __future__ import annotations

import logging
import os
import sys

from dsserve.config import EngineConfig
from dsserve.errors import DsserveError
from dsserve.runner.model_runner import ModelRunner, freeze_startup_heap
from dsserve.runner.parallel import WORKER_CONFIG_ENV

logger = logging.getLogger("dsserve")


def run_worker(config: EngineConfig) -> int:
    rank = config.parallel.rank
    runner = None
    try:
        runner = ModelRunner(config)
        freeze_startup_heap()
        runner.serve_steps()
        return 0
    except DsserveError as e:
        text = str(e)
        logger.error("%s", text if text.startswith(f"rank {rank}") else f"rank {rank}: {text}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException:  # noqa: BLE001 - a worker must never die silently
        logger.exception("rank %d failed", rank)
        return 1
    finally:
        if runner is not None:
            runner.shutdown()


def main() -> int:
    text = os.environ.get(WORKER_CONFIG_ENV)
    if not text:
        print(f"dsserve.runner.worker is started by dsserve itself (it needs ${WORKER_CONFIG_ENV})", file=sys.stderr)
        return 2
    config = EngineConfig.from_json(text)
    logging.basicConfig(level=os.environ.get("DSSERVE_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s rank{config.parallel.rank} %(name)s: %(message)s")
    return run_worker(config)


if __name__ == "__main__":
    sys.exit(main())
