"""bench.scale: the 7B shapes are the real checkpoints', and the tiny CPU run produces every figure."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.scale import METHOD_SETTINGS, PRUNING_SETTINGS, SCALES, _instantiate, main
from shapes.assets import tokenizer_corpus
from shapes.tiny import TINY

#: parameter counts of the real checkpoints (LLaVA-1.5-7B: 7.06 B, Qwen2-VL-7B-Instruct: 8.29 B, InternVL3-8B: 7.94 B)
PUBLISHED = {"llava": 7.06e9, "qwen_vl": 8.29e9, "internvl": 7.94e9}


@pytest.mark.parametrize("family", sorted(SCALES))
def test_7b_shapes_match_the_real_checkpoints(family):
    scale = SCALES[family]["7b"]
    model, _ = TINY[family][1](tokenizer_corpus(40), scale.size, build=_instantiate(scale, torch.device("meta"),
                                                                                   torch.bfloat16))  # fmt: skip
    text = model.config.text_config
    assert (text.hidden_size, text.intermediate_size) == ((4096, 11008) if family == "llava" else (3584, 18944))
    assert text.num_key_value_heads == (32 if family == "llava" else 4)
    params = sum(p.numel() for p in model.parameters())
    assert math.isclose(params, PUBLISHED[family], rel_tol=0.01), params


def test_tiny_cpu_run_writes_every_figure(tmp_path):
    """Every part on the tiny LLaVA, smaller batches than the defaults (CI runs the defaults: .ci/run)."""
    out = tmp_path / "llava.json"
    small = ["--overhead-batches", "1", "4", "--batch-sizes", "1", "4", "--min-samples", "4", "--methods-batch", "4",
             "--max-new-tokens", "4", "--prefill-batch", "2"]  # fmt: skip
    main(["--family", "llava", "--size", "tiny", "--device", "cpu", "--json", str(out), *small])
    r = json.loads(out.read_text())
    assert set(r["overhead"]) == {"1", "4"} and set(r["throughput"]) == {"1", "4"}
    assert all(r["overhead"][b][k] > 0 for b in r["overhead"] for k in ("ratio", "inline_ratio"))
    assert all(t["samples_per_s"] > 0 for t in r["throughput"].values())
    for b in ("1", "4"):  # the parts of a batch, each present and positive; they are medians of separate repeats,
        t = r["breakdown"][b]  # so on a loaded machine their sum can exceed the batch's own median (seen: 1.6x)
        assert min(t["batch_s"], t["inputs_s"], t["prefill_s"], t["decode_step_s"]) > 0, t
        assert t["generate_s"] > t["prefill_s"], t  # generate = prefill + 3 decoding steps
    assert set(r["methods"]) == set(METHOD_SETTINGS) and set(r["pruning"]) == set(PRUNING_SETTINGS)
    none = r["methods"]["none"]
    assert none["ratio"] == 1.0 and none["ops_per_step"] > 100
    for name, m in r["methods"].items():
        assert len(m["seconds"]) == 5 and m["ratio"] > 0 and m["calls"] >= 4, name
        assert 0.3 < m["peak_memory_ratio"] < 3, (name, m["peak_memory_ratio"])  # the allocator peak, one call
        assert m["extra_syncs_per_step"] <= 0, (name, m["sync_sites"])
    assert r["methods"]["carve"]["calls"] > none["calls"]  # its recording passes are counted
    for name, p in r["pruning"].items():
        assert p["speedup"] > 0 and p["peak_memory_ratio"] <= 1.1, (name, p)  # the allocator peak: deterministic
    assert r["model"]["visual_tokens"] == 64 and r["model"]["lm_layers"] == 6


def test_fewer_than_five_repeats_is_refused():
    with pytest.raises(SystemExit, match="repeats must be >= 5"):
        main(["--family", "llava", "--size", "tiny", "--device", "cpu", "--repeats", "3", "--parts", "pruning"])


SMALL = ["--family", "llava", "--size", "tiny", "--device", "cpu", "--methods-batch", "2", "--max-new-tokens", "2",
         "--count-batch", "2", "--count-tokens", "2", "--prefill-batch", "2"]  # fmt: skip


def test_a_failing_part_keeps_the_figures_of_the_others(tmp_path, monkeypatch, capsys):
    """A part that dies (on a GPU: an out-of-memory, a device bug) costs its own figures, not the run's; what the
    earlier parts measured is on disk before the next part starts (a time limit that kills the run keeps it)."""
    import bench.scale as scale

    out = tmp_path / "r.json"
    on_disk = []

    def dies(*_args):
        on_disk.append(json.loads(out.read_text()))
        raise RuntimeError("planted failure")

    monkeypatch.setitem(scale.PARTS, "engine", dies)
    with pytest.raises(SystemExit, match=r"engine \(RuntimeError: planted failure\)"):
        main([*SMALL, "--parts", "pruning", "engine", "--json", str(out)])
    assert on_disk[0]["parts_done"] == ["pruning"] and on_disk[0]["pruning"]["none"]["speedup"] == 1.0
    r = json.loads(out.read_text())
    assert r["parts_done"] == ["pruning"] and r["errors"] == {"engine": "RuntimeError: planted failure"}
    assert "engine_s" in r and "overhead" not in r
    printed = capsys.readouterr()
    assert "| setting | prefill speed-up |" in printed.out and "planted failure" in printed.err  # the traceback


def test_a_method_that_fails_is_reported_and_the_others_are_measured(tmp_path, monkeypatch):
    """VAR given a sink dimension beyond the hidden size fails when it installs: its row says why, CCA is timed."""
    monkeypatch.setitem(METHOD_SETTINGS, "var", ("var", {"sink_dims": [10**6], "tau": 3.0}))
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit, match=r"methods\.var \(UnsupportedError: VAR: sink dims \[1000000\] out of range"):
        main([*SMALL, "--parts", "methods", "--methods", "var", "cca", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["methods"]["var"]["error"].startswith("UnsupportedError: VAR: sink dims [1000000] out of range")
    assert r["methods"]["cca"]["ratio"] > 0 and len(r["methods"]["cca"]["seconds"]) == 5
    assert r["parts_done"] == ["methods"]
