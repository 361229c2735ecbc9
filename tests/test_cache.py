"""Response cache: an identical rerun in a new output directory reuses every answer; any key part change misses."""

from __future__ import annotations

import json
import os

import pytest

from adapters.base import Adapter
from harness.cache import ResponseCache, scope
from harness.calls import AdapterCalls
from harness.config import compose_config
from harness.engine import evaluate, from_config


def run(tmp_path, out, *overrides):
    common = [f"cache={tmp_path / 'responses.sqlite'}", "limit=2", "progress=false", "task.gen_kwargs.max_new_tokens=6"]
    cfg = compose_config([*common, *overrides])
    task, adapter, method, settings = from_config(cfg, output_dir=tmp_path / out)
    settings.report = False
    results = evaluate(task, adapter, method, settings)
    records = [json.loads(line) for line in (tmp_path / out / results["samples_file"]).read_text().splitlines()]
    return results, records


def test_identical_rerun_in_a_new_directory_reuses_every_answer(tmp_path, monkeypatch):
    first, rec1 = run(tmp_path, "a")
    assert first["cache"]["hits"] == 0 and first["cache"]["misses"] == 6 and not any(r["cached"] for r in rec1)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was called although every answer is cached")

    monkeypatch.setattr(AdapterCalls, "generate", no_model)
    monkeypatch.setattr(Adapter, "load", no_model)  # nothing to generate: the weights are not even loaded
    second, rec2 = run(tmp_path, "b")
    assert second["cache"]["hits"] == 6 and second["cache"]["misses"] == 0
    assert second["timings"]["model_load_s"] is None
    assert all(r["cached"] and r["wall_s"] is None for r in rec2)
    for key in ("sample_id", "prompt", "raw_output", "parsed", "correct"):
        assert [r[key] for r in rec1] == [r[key] for r in rec2], key
    assert second["results"] == first["results"]


def test_a_changed_method_setting_misses(tmp_path):
    run(tmp_path, "a", "method=fastv")
    other, _ = run(tmp_path, "b", "method=fastv", "method.ratio=0.75")
    assert other["cache"]["hits"] == 0 and other["cache"]["misses"] == 6


def test_sampling_is_never_cached(tmp_path, capsys):
    res, _ = run(tmp_path, "a", "task.gen_kwargs.do_sample=true")
    assert "cache" not in res and "response cache off" in capsys.readouterr().out


MODEL = {"name": "llava", "path": "org/model", "revision": None, "dtype": "float32", "device": "auto"}
METHOD = {"_target_": "methods.var.VAR", "name": "var", "p": 0.4}
TASK = {"name": "pope", "prompt_suffix": "\nAnswer.", "gen_kwargs": {"max_new_tokens": 8}, "n_boot": 1000,
        "parser": "pope_official"}  # fmt: skip


@pytest.mark.parametrize(
    ("part", "change"),
    [
        ("model", {"revision": "abc123"}),
        ("model", {"path": "org/other"}),
        ("model", {"dtype": "bfloat16"}),
        ("method", {"p": 0.6}),
        ("task", {"prompt_suffix": "\nAnswer yes or no."}),
        ("task", {"gen_kwargs": {"max_new_tokens": 16}}),
    ],
)
def test_every_key_part_changes_the_key(part, change, tmp_path):
    parts = {"model": MODEL, "method": METHOD, "task": TASK}
    changed = {**parts, part: {**parts[part], **change}}
    base = ResponseCache(tmp_path / "c.sqlite", scope(*parts.values()))
    other = ResponseCache(tmp_path / "c.sqlite", scope(*changed.values()))
    assert base.key("random/1", "d") != other.key("random/1", "d")


def test_sample_and_document_are_key_parts_and_scoring_options_are_not(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite", scope(MODEL, METHOD, TASK))
    assert len({cache.key("random/1", "d"), cache.key("random/2", "d"), cache.key("random/1", "e")}) == 3
    rescored = {**TASK, "n_boot": 10, "parser": "opera"}
    assert scope(MODEL, METHOD, rescored) == scope(MODEL, METHOD, TASK)
    assert scope({**MODEL, "device": "cuda"}, METHOD, TASK) == scope(MODEL, METHOD, TASK)
    cache.put_many({cache.key("random/1", "d"): {"prompt": "p", "raw_output": "Yes", "fields": {}}})
    assert cache.get_many([cache.key("random/1", "d"), cache.key("random/2", "d")]) == {
        cache.key("random/1", "d"): {"prompt": "p", "raw_output": "Yes", "fields": {}}
    }
    assert (cache.hits, cache.misses) == (1, 1)


def test_a_checkpoint_retrained_in_place_is_another_model(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    local = {**MODEL, "path": str(ckpt)}
    before = scope(local, METHOD, TASK)
    os.utime(ckpt / "model.safetensors", ns=(1, 1))
    assert scope(local, METHOD, TASK) != before
