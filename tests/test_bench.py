"""The benchmark script runs end to end and reports both paths on the same inputs (no timing assertions)."""

from __future__ import annotations

import argparse

import pytest

from harness.bench import run


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
    from harness.bench_methods import run as run_methods

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
