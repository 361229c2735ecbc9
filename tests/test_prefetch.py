"""The engine decodes the next batch's images on a background thread while the model answers the current batch.

What must hold: the overlap happens (the next batch's images are decoded before the current batch's generation
ends), and nothing else changes: the same records, the same per-sample errors, the same strict stop after the same
earlier batches, no thread left behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading

import pytest
import torch

from core.errors import UserError
from harness.engine import RunSettings, evaluate
from harness.prefetch import load_media, prefetched
from methods.none import NoMethod
from tasks.base import Sample, SampleError

BATCH = 4


class _Loads:
    """Wraps each sample's image loader: records which thread decoded which sample, and when batch 1 began."""

    def __init__(self) -> None:
        self.threads: dict[str, str] = {}
        self.order: list[str] = []
        self.batch1 = threading.Event()
        self.lock = threading.Lock()

    def wrap(self, samples: list[Sample]) -> list[Sample]:
        out = []
        for i, s in enumerate(samples):
            if s.images is not None:
                s = dataclasses.replace(s, images=self._loader(s.sample_id, s.images, i // BATCH == 1))
            out.append(s)
        return out

    def _loader(self, sid, images, in_batch1):
        def load():
            with self.lock:
                self.threads[sid] = threading.current_thread().name
                self.order.append(sid)
            if in_batch1:
                self.batch1.set()
            return images()

        return load


def _instrumented(task, loads):
    samples = loads.wrap(task.samples())
    task.samples = lambda: list(samples)
    return task


def _run(task, llava, out, **kw):
    settings = RunSettings(output_dir=out, config_hash="h0", progress=False, report=False, batch_size=BATCH, **kw)
    return evaluate(task, llava, NoMethod(), settings)


def _records(out):
    recs = [json.loads(x) for x in (out / "samples_pope.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("wall_s", "cached")} for r in recs]


def _media_threads():
    return [t for t in threading.enumerate() if t.name.startswith("harness-media")]


def test_the_next_batch_decodes_while_the_model_answers(llava, pope_dir, tmp_path, make_task, monkeypatch):
    loads = _Loads()
    task = _instrumented(make_task(pope_dir, limit=4), loads)
    generate, seen = llava.generate, []

    def answering(inputs, **kw):  # batch 0's generation waits (up to 20 s) for a batch-1 image to be decoded
        seen.append(loads.batch1.wait(timeout=20) if not seen else None)
        return generate(inputs, **kw)

    monkeypatch.setattr(llava, "generate", answering)
    _run(task, llava, tmp_path, prefetch=1)
    assert seen[0] is True, "batch 1's images were not decoded while batch 0 was being answered"
    assert set(loads.threads.values()) == {"harness-media_0"}
    assert loads.order == [s.sample_id for s in task.samples()]  # one worker, batch order
    assert not _media_threads()


def test_prefetch_0_decodes_in_line(llava, pope_dir, tmp_path, make_task, monkeypatch):
    loads = _Loads()
    task = _instrumented(make_task(pope_dir, limit=4), loads)
    generate, seen = llava.generate, []

    def answering(inputs, **kw):
        seen.append(loads.batch1.is_set())
        return generate(inputs, **kw)

    monkeypatch.setattr(llava, "generate", answering)
    _run(task, llava, tmp_path, prefetch=0)
    assert seen[0] is False and set(loads.threads.values()) == {threading.main_thread().name}


def _broken_copy(pope_dir, tmp_path, strict=False):
    """The random split (6 questions per image) with bad inputs in several batches of 4.

    Default: image 0 missing (batches 0, 1), line 9 malformed (batch 2), image 2 corrupt (batches 3, 4). ``strict``:
    only image 1 corrupt (batches 1, 2), so that a strict run writes batch 0 and stops at batch 1.
    """
    d = tmp_path / "broken"
    shutil.copytree(pope_dir, d)
    f = d / "shapes_pope_random.json"
    lines = f.read_text().splitlines()
    images = d / "images"
    if strict:
        (images / json.loads(lines[6])["image"]).write_bytes(b"not a png at all")
        return d
    (images / json.loads(lines[0])["image"]).unlink()
    lines[9] = '{"question_id": 10, "image": "x.png", "text": "Is there'
    (images / json.loads(lines[12])["image"]).write_bytes(b"not a png at all")
    f.write_text("\n".join(lines) + "\n")
    return d


@pytest.mark.parametrize("depth", [1, 3])
def test_records_and_errors_are_those_of_the_in_line_loader(depth, llava, pope_dir, tmp_path, make_task):
    d = _broken_copy(pope_dir, tmp_path)
    runs = {}
    for p in (0, depth):
        res = _run(make_task(d, splits=["random"], limit=20), llava, tmp_path / f"p{p}", prefetch=p)
        runs[p] = (_records(tmp_path / f"p{p}"), res["results"], res["errors"]["count"])
    assert runs[depth] == runs[0]
    recs, _, n_errors = runs[0]
    assert n_errors >= 3 and len(recs) == len({r["sample_id"] for r in recs})
    assert any("cannot decode image" in (r["error"] or "") for r in recs)


def test_strict_stops_at_the_same_sample_after_the_same_batches(llava, pope_dir, tmp_path, make_task):
    d = _broken_copy(pope_dir, tmp_path, strict=True)
    stops = {}
    for p in (0, 1):
        task = make_task(d, splits=["random"], limit=12, strict=True)
        with pytest.raises(SampleError) as exc:
            _run(task, llava, tmp_path / f"p{p}", prefetch=p, strict=True)
        written = tmp_path / f"p{p}" / "samples_pope.jsonl"
        stops[p] = (str(exc.value), [r["sample_id"] for r in _records(tmp_path / f"p{p}")] if written.exists() else [])
    assert stops[1] == stops[0]
    message, written = stops[0]
    assert "cannot decode image" in message and len(written) == BATCH  # batch 0's records, then the stop
    assert not _media_threads()


def test_a_failing_batch_leaves_no_worker_behind(llava, pope_dir, tmp_path, make_task, monkeypatch):
    def broken(inputs, **kw):
        raise RuntimeError("device lost")

    monkeypatch.setattr(llava, "generate", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        _run(make_task(pope_dir, limit=4), llava, tmp_path, prefetch=2)
    assert not _media_threads()


def test_prefetched_keeps_order_and_depth(pope_dir, make_task):
    samples = make_task(pope_dir, limit=4).samples()
    batches = [samples[i : i + 3] for i in range(0, len(samples), 3)]
    for depth in (0, 1, 2, 10):
        with prefetched(batches, strict=False, depth=depth) as media:
            got = list(media)
        assert [[im[0].tobytes() for im, _ in m] for m in got] == [
            [im[0].tobytes() for im, _ in load_media(b, False)] for b in batches
        ]
    with pytest.raises(ValueError, match="prefetch depth"), prefetched(batches, False, -1):
        pass


@pytest.mark.parametrize("bad", [-1, True, 1.5, "yes"])
def test_a_bad_prefetch_setting_is_one_clear_error(bad, tmp_path):
    with pytest.raises(UserError, match=r"prefetch=.*must be an int >= 0 or 'auto'"):
        RunSettings(output_dir=tmp_path, config_hash="h", prefetch=bad)


def test_auto_prefetches_on_an_accelerator_only(tmp_path):
    auto = RunSettings(output_dir=tmp_path, config_hash="h")
    assert auto.prefetch == "auto"
    assert auto.prefetch_depth(torch.device("cpu")) == 0
    assert auto.prefetch_depth(torch.device("cuda", 1)) == auto.prefetch_depth(torch.device("meta")) == 1
    assert RunSettings(output_dir=tmp_path, config_hash="h", prefetch=3).prefetch_depth(torch.device("cpu")) == 3
