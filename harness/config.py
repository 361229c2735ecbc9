"""Config helpers: OmegaConf resolvers, the one ``instantiate`` call site, and the run's config hash.

Resolvers (registered on import):
    ``${repo_path:assets/x}``  absolute path inside the repository (configs work from any working directory).
    ``${run_hash:}``           12-hex hash of the parts of the config that determine results (model, task,
                               method, seed); the default output directory ends with it, so rerunning the same
                               config lands in the same directory and resumes.
    ``${limit_tag:${limit}}``  ``""`` for ``limit=null``, else ``-limit<N>``: the default output directory of a
                               limited run differs from the full run's, so it never replaces its results.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate as _hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from core.errors import UserError, one_line

REPO_ROOT = Path(__file__).resolve().parent.parent

#: top-level keys whose values change what a run produces; everything else (batch size, limit, output
#: location, logger, strictness) only changes how or how much of it is produced.
RESULT_KEYS = ("model", "task", "method", "seed")


def config_hash(cfg: DictConfig | dict[str, Any]) -> str:
    """Stable 12-hex hash of the result-determining part of a config (see :data:`RESULT_KEYS`)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    part = {k: cfg.get(k) for k in RESULT_KEYS}
    blob = json.dumps(part, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def pair_hash(cfg: DictConfig | dict[str, Any]) -> str:
    """Hash of everything that determines results except the method: runs that share it are paired comparisons.

    A method run and a ``method=none`` run with the same pair hash evaluated the same model on the same task
    samples with the same seed (see :mod:`harness.paired`).
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return config_hash({**{k: cfg.get(k) for k in RESULT_KEYS}, "method": None})


def _repo_path(rel: str) -> str:
    return str((REPO_ROOT / rel).resolve())


def _run_hash(*, _root_: DictConfig) -> str:
    return config_hash(
        {
            k: OmegaConf.to_container(_root_[k], resolve=True) if isinstance(_root_[k], DictConfig) else _root_[k]
            for k in RESULT_KEYS
        }
    )


def limit_tag(limit: Any) -> str:
    """``""`` for no limit, ``"-limit<N>"`` otherwise (the suffix of a limited run's default directory)."""
    return "" if limit is None else f"-limit{limit}"


def register_resolvers() -> None:
    """Register this module's OmegaConf resolvers (idempotent)."""
    for name, fn in (("repo_path", _repo_path), ("run_hash", _run_hash), ("limit_tag", limit_tag)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def instantiate(node: DictConfig, *, drop: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """Build an object from a ``_target_`` node; the single call site (ready for Hydra 1.4's target whitelist).

    Args:
        node: Config node with ``_target_``; its other fields must match the target's signature (unknown
            fields fail loudly).
        drop: Fields that describe the node for the config only (e.g. ``name``, used in paths) and are not
            constructor arguments.
        **kwargs: Extra constructor arguments.
    """
    fields = OmegaConf.to_container(node, resolve=True)
    label = str(fields.get("_target_", "?")).rsplit(".", 1)[-1]
    for key in drop:
        fields.pop(key, None)
    try:
        return _hydra_instantiate(fields, _convert_="all", **kwargs)
    except InstantiationException as exc:
        # A constructor's ValueError is an option the schema could not judge alone (a parser name, duplicate
        # splits, an option pair): one line, like every other config mistake. Other exceptions stay bugs.
        cause = exc.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise UserError(f"{label}: {one_line(cause)}") from cause
        raise


#: model-config keys that choose and configure the generation backend, not the adapter (see :func:`build_adapter`)
BACKEND_KEYS = ("backend", "vllm")


def build_adapter(node: DictConfig) -> Any:
    """The (unloaded) adapter of a ``conf/model`` node; the backend keys stay with the engine."""
    return instantiate(node, drop=BACKEND_KEYS)


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The top-level config ``conf/config.yaml`` composed with Hydra ``overrides``, as ``run.py`` would see it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def calibration_target(option: str, path: str | None, out: str | None, filename: str, flag: str) -> tuple[Any, Path]:
    """A calibration CLI's (unloaded) adapter and output file.

    The adapter is ``conf/model/<option>.yaml`` with ``path`` overriding its checkpoint; the file is ``out``, else
    ``filename`` beside a local checkpoint (a hub id needs ``--out``, read back through ``method.<flag>``).
    """
    node = OmegaConf.load(REPO_ROOT / "conf" / "model" / f"{option}.yaml")
    if path:
        node.path = path
    adapter = build_adapter(node)
    if out:
        return adapter, Path(out)
    if not Path(adapter.path).is_dir():
        raise SystemExit(f"{adapter.path} is not a local directory: pass --out FILE (then method.{flag}=FILE)")
    return adapter, Path(adapter.path) / filename
