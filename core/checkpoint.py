"""What a local checkpoint directory must hold before the adapters load it.

Torch-free: the config schema checks it before torch is imported (``model.path``), and
:meth:`adapters.base.Adapter.load` checks it again for callers of the Python API.
"""

from __future__ import annotations

from pathlib import Path


def checkpoint_problem(path: Path) -> str | None:
    """``None`` when directory ``path`` holds safetensors weights and a config, else what is missing and what to do.

    Without ``config.json``, ``from_pretrained`` does not fail: it builds the model class's default configuration
    (for LLaVA a 7B-sized model: a 28 GB float32 allocation, killed for memory on a small machine) and fills it
    from weights of another shape.
    """
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) or sorted(p.name for p in path.iterdir())[:5]
        return (
            f"holds no *.safetensors weights (found: {', '.join(found) or 'nothing'}); this harness loads "
            "safetensors only: convert it, e.g. load it once and save_pretrained(..., safe_serialization=True)"
        )
    if not (path / "config.json").is_file():
        return (
            "holds no config.json: copy the one save_pretrained wrote beside the weights (without it transformers "
            "builds the model class's default configuration, for LLaVA a 7B model, instead of this checkpoint's)"
        )
    return None
