"""Entry point: compose the Hydra config, build task + adapter + method + logger, hand them to the engine.

python run.py                                   # embedded tiny LLaVA on the embedded POPE set
python run.py method=none model=llava task=pope limit=20
python run.py -m method=none seed=0,1           # multirun
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import adapters  # noqa: F401  (registers adapters)
import methods  # noqa: F401  (registers methods)
import tasks  # noqa: F401  (registers tasks)
from harness.config import config_hash, instantiate
from harness.engine import RunSettings, evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one evaluation job."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    settings = RunSettings(
        output_dir=cfg.output_dir,
        config_hash=config_hash(cfg),
        batch_size=cfg.batch_size,
        strict=cfg.strict,
        seed=cfg.seed,
        config=resolved,
        progress=cfg.progress,
    )
    task = instantiate(cfg.task, drop=("name",), strict=cfg.strict, limit=cfg.limit)
    method = instantiate(cfg.method, drop=("name",))
    adapter = instantiate(cfg.model)
    logger = instantiate(cfg.logger)
    try:
        logger.start(resolved, Path(settings.output_dir))
        evaluate(task, adapter, method, settings, logger)
    finally:
        logger.finish()


if __name__ == "__main__":
    main()
