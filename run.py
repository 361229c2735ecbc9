"""Entry point: compose the Hydra config, build task + adapter + method + logger, hand them to the engine.

python run.py                                   # embedded tiny LLaVA on the embedded POPE set
python run.py method=none model=llava task=pope limit=20
python run.py -m method=none seed=0,1           # multirun
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import adapters  # noqa: F401  (registers adapters)
import methods  # noqa: F401  (registers methods)
import tasks  # noqa: F401  (registers tasks)
from harness.config import instantiate
from harness.engine import evaluate, from_config


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one evaluation job."""
    task, adapter, method, settings = from_config(cfg)
    logger = instantiate(cfg.logger)
    try:
        logger.start(settings.config, settings.output_dir)
        evaluate(task, adapter, method, settings, logger)
    finally:
        logger.finish()


if __name__ == "__main__":
    main()
