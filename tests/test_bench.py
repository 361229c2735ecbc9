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
