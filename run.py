"""Entry point: compose the Hydra config, validate it, build task + adapter + method + logger, hand them to the engine.

python run.py                                   # embedded tiny LLaVA on the embedded POPE set
python run.py method=none model=llava task=pope limit=20
python run.py -m method=none seed=0,1           # multirun
torchrun --nproc_per_node 2 run.py task=pope    # data-parallel: samples sharded over 2 processes

Mistakes (an unknown option, a wrong type or range, a missing file, an unsupported method/model pair) print one
line, ``run.py: error: <what is wrong>; <what to do>``, and exit with status 2, before torch is imported where the
config alone tells; ``debug=true`` or ``HARNESS_DEBUG=1`` shows the traceback instead. In a multirun a job with a
user error is reported and skipped, the others run, and the exit status is 2.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import harness.config  # noqa: F401  (registers the ${repo_path:} / ${run_hash:} resolvers)
from core.errors import UserError, debug_enabled, report
from harness.cli import check_overrides
from harness.schema import validate

#: jobs of this process that stopped on a user error (a multirun goes on with the next one)
FAILED: list[str] = []


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one evaluation job; a user error is printed as one line (a traceback with ``debug=true``)."""
    try:
        validate(cfg)  # types and ranges, before torch is imported
        _run(cfg)
    except UserError as exc:
        if debug_enabled(cfg):
            raise
        report(exc)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise SystemExit(2) from None
        FAILED.append(str(exc))


def _run(cfg: DictConfig) -> None:
    import adapters  # noqa: F401  (registers adapters)
    import methods  # noqa: F401  (registers methods)
    import tasks  # noqa: F401  (registers tasks)
    from core.loggers import NoLogger
    from harness.config import instantiate
    from harness.engine import evaluate, from_config

    task, adapter, method, settings = from_config(cfg)
    ranks = settings.ranks
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # (a multi-task submitit job runs one configuration: fine)
    if torchrun and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise UserError(
            "torchrun with -m is not supported: start one torchrun per configuration, or sweep with "
            "hydra/launcher=submitit_slurm (see README, Scaling up)"
        )
    logger = instantiate(cfg.logger) if ranks.main else NoLogger()  # rank 0 mirrors the merged run
    try:
        logger.start(settings.config, settings.output_dir)
        results = evaluate(task, adapter, method, settings, logger)
    finally:
        logger.finish()
        ranks.close()
    n = next(iter(results.get("n-samples", {}).values()), None)
    if n is not None and n["effective"] == 0:
        raise UserError(
            f"none of the {n['original']} samples could be scored ({n['errors']} errors, reasons in "
            f"{settings.output_dir}/results.json under errors); fix the inputs and rerun (finished samples are kept)"
        )


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])
    except UserError as exc:
        if debug_enabled():
            raise
        report(exc)
        raise SystemExit(2) from None
    main()
    if FAILED:
        raise SystemExit(2)
