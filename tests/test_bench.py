"""The benchmark script runs end to end and reports both paths on the same inputs (no timing assertions)."""

from __future__ import annotations

import argparse

import pytest

from bench.overhead import run


def test_bench_smoke():
    args = argparse.Namespace(
        tiny=True,
        n_samples=6,
        max_new_tokens=4,
        batch_size=4,
        batch_sizes=[1, 4],
        repeats=1,
        device="cpu",
        dtype="float32",
    )
    report = run(args)
    o = report["overhead"]
    assert report["n_samples"] == 6 and report["model"]["visual_tokens"] == 64
    assert o["harness_s_per_sample"] > 0 and o["plain_s_per_sample"] > 0
    assert o["ratio"] == pytest.approx(o["harness_s_per_sample"] / o["plain_s_per_sample"])
    assert set(report["throughput"]) == {1, 4}


def test_bench_methods_smoke():
    from bench.methods import run as run_methods

    args = argparse.Namespace(
        tiny=True, methods=["var", "cca", "mma", "iri"], batch_size=2, max_new_tokens=3, layers=4, repeats=1,
        device="cpu", dtype="float32", shipped=False, batches=1,
    )  # fmt: skip
    report = run_methods(args)
    assert set(report["methods"]) == {"none", "var", "cca", "mma", "iri"}
    assert report["methods"]["none"]["ratio"] == 1.0
    for t in report["methods"].values():
        assert t["s_per_sample"] > 0 and len(t["runs_s"]) == 1
    shipped = run_methods(argparse.Namespace(**{**vars(args), "shipped": True, "methods": ["carve"]}))
    assert shipped["samples"] == 2 and shipped["model"]["name"] == "shipped shapes-llava"
    assert shipped["methods"]["carve"]["ratio"] > 1  # two extra passes cannot be free


def test_selection_stats_against_planted_objects():
    import torch

    from bench.pruning import selection_stats

    objects = torch.zeros(2, 10, dtype=torch.bool)
    objects[0, [0, 1, 2]] = True  # a large object
    objects[1, 7] = True  # a small one
    gen = torch.Generator().manual_seed(0)
    on_large = torch.tensor([5.0, 4, 3] + [0] * 7)  # scores concentrate on the large object
    s = selection_stats(on_large, objects, 2, gen)
    assert s["precision_top"] == 1.0 and s["coverage_top"] == 0.5  # precise, yet one object of two missed
    spread = torch.zeros(10)
    spread[[0, 7]] = 1.0
    s = selection_stats(spread, objects, 2, gen)
    assert s["precision_top"] == 1.0 and s["coverage_top"] == 1.0
    assert 0.0 <= s["precision_random"] <= 1.0 and 0.0 <= s["coverage_random"] <= 1.0


def test_fastervlm_selection_coverage_on_the_shipped_llava():
    import argparse

    from bench.pruning import coverage

    r = coverage(argparse.Namespace(device="cpu", coverage_images=3, accuracy_models=["llava"]))["llava"]
    assert list(r) == ["fastervlm R=50%", "fastervlm R=75%", "fastervlm R=90%"]
    assert [v["kept"] for v in r.values()] == [32, 16, 6] and all(v["images"] == 3 for v in r.values())
    assert all(0.0 <= v[k] <= 1.0 for v in r.values() for k in ("precision_top", "coverage_top"))


def test_object_oracle_scores_take_every_object_before_any_second_token():
    import torch

    from bench.pruning import object_oracle_scores

    overlaps = torch.zeros(3, 12, dtype=torch.float64)
    overlaps[0, [0, 1, 2, 3]] = torch.tensor([1.0, 0.9, 0.8, 0.7], dtype=torch.float64)  # a large object
    overlaps[1, [3, 4]] = torch.tensor([0.2, 0.6], dtype=torch.float64)  # shares token 3 with the large one
    overlaps[2, 9] = 0.3  # a small one
    s = object_oracle_scores(overlaps)
    top3 = set(torch.topk(s, 3).indices.tolist())
    assert top3 == {0, 4, 9}, "each object's best-covered token first"
    assert torch.topk(s, 5).indices.tolist()[3:] == [1, 3], "then the second-best tokens, in object order"
    assert (s[[5, 6, 7, 8, 10, 11]] == 0).all() and (s[[0, 1, 2, 3, 4, 9]] > 0).all()


def test_object_oracle_feeds_fastervlm_the_objects_and_restores_the_adapter():
    import torch
    from PIL import Image

    from bench.pruning import _pope_scenes, _shipped, object_oracle_scores, object_overlaps, replaced_scores
    from methods.fastervlm import FasterVLM

    world, scenes = _pope_scenes()
    adapter = _shipped("llava", "cpu")
    path = sorted((world / "pope" / "images").glob("shapes_*.png"))[0]
    inputs = adapter.build_inputs([adapter.format_prompt("Is there a star?")], [[Image.open(path).convert("RGB")]])
    overlaps = object_overlaps(adapter, inputs, scenes[int(path.stem.split("_")[1])])  # [objects, 64]
    cls = adapter.vision_cls_attention(inputs)
    method = FasterVLM(ratio=0.9)
    with replaced_scores(adapter, world, scenes, "objects"), method.bind(adapter):
        keep = method._select(inputs)  # [1, prompt]
    kept = keep[0][adapter.image_token_mask(inputs)[0]]  # [64] over the visual tokens
    assert int(kept.sum()) == 6
    assert kept[overlaps.argmax(1)].all(), "every object's best-covered token is kept"
    assert set(kept.nonzero().flatten().tolist()) == set(torch.topk(object_oracle_scores(overlaps), 6).indices.tolist())
    assert not set(torch.topk(cls[0], 6).indices.tolist()) >= set(overlaps.argmax(1).tolist()), "[CLS] alone differs"
    assert all(map(torch.equal, adapter.vision_cls_attention(inputs), cls)), "the [CLS] scores are back after the block"
