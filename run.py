"""Entry point: compose the Hydra config, build task + adapter + method + logger, hand them to the engine.

python run.py                                   # embedded tiny LLaVA on the embedded POPE set
python run.py method=none model=llava task=pope limit=20
python run.py -m method=none seed=0,1           # multirun
torchrun --nproc_per_node 2 run.py task=pope    # data-parallel: samples sharded over 2 processes
"""

from __future__ import annotations

import os

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import adapters  # noqa: F401  (registers adapters)
import methods  # noqa: F401  (registers methods)
import tasks  # noqa: F401  (registers tasks)
from harness.config import instantiate
from harness.engine import evaluate, from_config
from harness.loggers import NoLogger


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one evaluation job."""
    task, adapter, method, settings = from_config(cfg)
    ranks = settings.ranks
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # (a multi-task submitit job runs one configuration: fine)
    if torchrun and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise SystemExit(
            "torchrun with -m is not supported: start one torchrun per configuration, or sweep with "
            "hydra/launcher=submitit_slurm (see README, Scaling up)"
        )
    logger = instantiate(cfg.logger) if ranks.main else NoLogger()  # rank 0 mirrors the merged run
    try:
        logger.start(settings.config, settings.output_dir)
        evaluate(task, adapter, method, settings, logger)
    finally:
        logger.finish()
        ranks.close()


if __name__ == "__main__":
    main()
