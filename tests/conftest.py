"""Shared fixtures: a tiny LLaVA and a small POPE set, built offline once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    from shapes.assets import tokenizer_corpus
    from shapes.tiny import LlavaSize, build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava", tokenizer_corpus(), LlavaSize(), seed=0)


@pytest.fixture(scope="session")
def pope_dir(tmp_path_factory) -> Path:
    from shapes.export import export_pope
    from shapes.scene import generate

    out = tmp_path_factory.mktemp("pope") / "shapes-pope"
    scenes = [s for s in generate(40, 7) if len(s.objects) >= 3][:6]
    export_pope(scenes, out, seed=7)
    return out


@pytest.fixture(scope="session")
def llava(tiny_llava_dir):
    from adapters.llava import LlavaAdapter

    adapter = LlavaAdapter(name="llava", path=str(tiny_llava_dir), device="cpu")
    adapter.load()
    return adapter


@pytest.fixture(scope="session")
def make_task():
    """Factory: a POPE task over a shapes-pope directory (short generations, few bootstrap draws)."""
    from tasks.pope import POPETask

    def make(pope_dir: Path, **kw):
        kw.setdefault("gen_kwargs", {"max_new_tokens": 12, "do_sample": False})
        kw.setdefault("n_boot", 200)
        return POPETask(questions=str(pope_dir / "shapes_pope_{split}.json"), image_root=str(pope_dir / "images"), **kw)

    return make


@pytest.fixture(scope="session")
def four_layer(tmp_path_factory, lazy_adapters):
    """Factory: ``get = four_layer(seed)``; ``get(key)`` is the loaded 4-layer random-init model (init 0.2, so
    attention is far from uniform) of ``key`` in llava, qwen_vl, qwen2_5_vl, internvl, built from ``seed`` on first
    use; for mechanism tests."""
    from shapes.assets import tokenizer_corpus
    from shapes.tiny import InternVLSize, LlavaSize, QwenVLSize, build_tiny

    sizes = {
        "llava": ("llava", LlavaSize(init_range=0.2, text_layers=4)),
        "qwen_vl": ("qwen_vl", QwenVLSize(init_range=0.2, text_layers=4)),
        "qwen2_5_vl": ("qwen_vl", QwenVLSize(variant="qwen2_5_vl", init_range=0.2, text_layers=4)),
        "internvl": ("internvl", InternVLSize(init_range=0.2, text_layers=4)),
    }
    corpus = tokenizer_corpus(80)

    def factory(seed: int):
        root = tmp_path_factory.mktemp(f"four-layer-{seed}")

        def make(key: str):
            family, size = sizes[key]
            return family, build_tiny(family, root / key, corpus, size, seed=seed)

        return lazy_adapters(make)

    return factory


@pytest.fixture(scope="session")
def lazy_adapters():
    """Factory: ``get = lazy_adapters(make)``; ``get(key)`` is the adapter of ``make(key) -> (family, checkpoint
    dir)``, built and loaded on first use and then reused."""
    from adapters.base import ADAPTERS

    def factory(make):
        cache = {}

        def get(key: str):
            if key not in cache:
                family, path = make(key)
                cache[key] = ADAPTERS.get(family)(name=key, path=str(path), device="cpu")
                cache[key].load()
            return cache[key]

        return get

    return factory
