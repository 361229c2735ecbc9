"""The embedded default in assets/ is exactly what `python -m harness.assets` builds (deterministic)."""

from __future__ import annotations

from safetensors.torch import load_file

from adapters.tiny import LlavaSize, build_tiny_llava
from harness.assets import build_pope_set, tokenizer_corpus
from harness.config import REPO_ROOT

ASSETS = REPO_ROOT / "assets"


def test_shipped_pope_set_is_reproducible(tmp_path):
    rebuilt = build_pope_set(tmp_path / "shapes-pope")
    shipped = ASSETS / "shapes-pope"
    for split in ("random", "popular", "adversarial"):
        name = f"shapes_pope_{split}.json"
        assert (rebuilt / name).read_bytes() == (shipped / name).read_bytes(), name
    names = sorted(p.name for p in (shipped / "images").iterdir())
    assert names == sorted(p.name for p in (rebuilt / "images").iterdir())
    for n in names:
        assert (rebuilt / "images" / n).read_bytes() == (shipped / "images" / n).read_bytes(), n


def test_shipped_tiny_llava_is_reproducible(tmp_path):
    rebuilt = build_tiny_llava(tmp_path / "tiny-llava", tokenizer_corpus(), LlavaSize(), seed=0)
    shipped = ASSETS / "tiny-llava"
    a, b = load_file(rebuilt / "model.safetensors"), load_file(shipped / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert (rebuilt / "tokenizer.json").read_text() == (shipped / "tokenizer.json").read_text()
