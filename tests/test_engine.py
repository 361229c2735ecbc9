"""Engine: parity with plain HF generate, batch-size invariance, resume, bad inputs, results file."""

from __future__ import annotations

import json
import shutil
from typing import ClassVar

import pytest
import torch

from harness.engine import RunSettings, evaluate
from methods.base import Method
from methods.none import NoMethod
from tasks.base import SampleError

LIMIT = 4  # per split → 12 samples


def _run(task, llava, out, method=None, config_hash="h0", **kw):
    settings = RunSettings(output_dir=out, config_hash=config_hash, progress=False, **kw)
    return evaluate(task, llava, method or NoMethod(), settings)


def _records(out, task="pope"):
    return [json.loads(x) for x in (out / f"samples_{task}.jsonl").read_text().splitlines()]


def test_none_equals_plain_hf_generate_loop(llava, pope_dir, tmp_path, make_task):
    task = make_task(pope_dir, limit=LIMIT)
    _run(task, llava, tmp_path, batch_size=1)
    recs = {r["sample_id"]: r for r in _records(tmp_path)}
    model, proc = llava.model, llava.processor
    for s in task.samples():
        prompt = proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.text}]}],
            add_generation_prompt=True,
        )
        inputs = proc(text=[prompt], images=s.images(), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        text = proc.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
        assert recs[s.sample_id]["prompt"] == prompt
        assert recs[s.sample_id]["raw_output"] == text, s.sample_id


def _ragged_copy(pope_dir, tmp_path):
    """The shapes set with questions of different token lengths, so that batches need padding."""
    d = tmp_path / "ragged"
    shutil.copytree(pope_dir, d)
    for split in ("random", "popular", "adversarial"):
        f = d / f"shapes_pope_{split}.json"
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        for i, row in enumerate(rows):
            row["text"] = row["text"].replace(" in the image?", " in the image" + " please" * (i % 3) + "?")
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_batch_size_1_and_4_identical_with_padding(llava, pope_dir, tmp_path, make_task):
    task = make_task(_ragged_copy(pope_dir, tmp_path), limit=LIMIT)
    r1 = _run(task, llava, tmp_path / "b1", batch_size=1)
    r4 = _run(task, llava, tmp_path / "b4", batch_size=4)
    a = {r["sample_id"]: (r["raw_output"], r["parsed"]) for r in _records(tmp_path / "b1")}
    b = {r["sample_id"]: (r["raw_output"], r["parsed"]) for r in _records(tmp_path / "b4")}
    assert a == b
    prompts = [r["prompt"] for r in _records(tmp_path / "b4")]
    n_tok = [len(llava.processor.tokenizer(p)["input_ids"]) for p in prompts]
    assert any(len(set(n_tok[i : i + 4])) > 1 for i in range(0, len(n_tok), 4)), "some batch must be padded"
    assert r1["results"] == r4["results"]


class _Interrupt(Method):
    """Raises after ``n`` generate calls, as a killed job would stop mid-run."""

    name: ClassVar[str] = "none"

    def __init__(self, n):
        super().__init__()
        self.n = n

    def install(self):
        calls = {"n": 0}
        original = self.adapter.generate

        def generate(inputs, **kw):
            if calls["n"] == self.n:
                raise KeyboardInterrupt
            calls["n"] += 1
            return original(inputs, **kw)

        self.adapter.generate = generate
        self.enter_context(_Restore(self.adapter))


class _Restore:
    def __init__(self, adapter):
        self.adapter = adapter

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        del self.adapter.generate


def test_resume_after_interruption_equals_uninterrupted(llava, pope_dir, tmp_path, make_task):
    task = make_task(pope_dir, limit=LIMIT)
    full = _run(task, llava, tmp_path / "full", batch_size=2)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        evaluate(
            task, llava, _Interrupt(3), RunSettings(output_dir=part, config_hash="h0", batch_size=2, progress=False)
        )
    assert len(_records(part)) == 6, "three finished batches of two are on disk"
    with (part / "samples_pope.jsonl").open("a") as f:  # a kill mid-write leaves a torn line
        f.write('{"sample_id": "random/9", "raw_out')
    resumed = _run(task, llava, part, batch_size=2)
    ids = [r["sample_id"] for r in _records(part)]
    assert len(ids) == len(set(ids)) == 3 * LIMIT, "nothing lost, nothing duplicated"
    assert resumed["resumed"]["skipped"] == 6 and resumed["resumed"]["generated"] == 6
    assert resumed["results"] == full["results"]
    again = _run(task, llava, part, batch_size=2)
    assert again["resumed"]["generated"] == 0 and again["results"] == full["results"]


def _broken_copy(pope_dir, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(pope_dir, d)
    lines = (d / "shapes_pope_random.json").read_text().splitlines()
    first = json.loads(lines[0])
    (d / "images" / first["image"]).unlink()  # missing image → both questions on it fail
    second_img = json.loads(lines[6])["image"]
    (d / "images" / second_img).write_bytes(b"not a png at all")  # corrupt image
    lines[2] = '{"question_id": 3, "image": "x.png", "text": "Is there'  # malformed line
    (d / "shapes_pope_random.json").write_text("\n".join(lines) + "\n")
    return d, first["image"], second_img


def test_bad_inputs_become_error_records(llava, pope_dir, tmp_path, make_task):
    d, missing, corrupt = _broken_copy(pope_dir, tmp_path)
    task = make_task(d, splits=["random"])
    res = _run(task, llava, tmp_path / "out", batch_size=4)
    errs = {r["sample_id"]: r for r in _records(tmp_path / "out") if r["error"]}
    n_missing = sum(1 for s in task.samples() if s.doc.get("image") == missing)
    n_corrupt = sum(1 for s in task.samples() if s.doc.get("image") == corrupt)
    assert res["errors"]["count"] == len(errs) == n_missing + n_corrupt + 1
    reasons = " ".join(r["error"] for r in errs.values())
    assert "shapes_pope_random.json:3" in " ".join(r["source"] for r in errs.values())
    assert missing in reasons and corrupt in reasons
    n = res["n-samples"]["pope"]
    assert n["effective"] + n["errors"] == n["original"]
    assert res["results"]["pope_random"]["sample_len"] == n["effective"]


def test_strict_stops_at_first_bad_input_with_file_and_line(llava, pope_dir, tmp_path, make_task):
    d, _, _ = _broken_copy(pope_dir, tmp_path)
    with pytest.raises(SampleError, match=r"shapes_pope_random.json:[13]"):
        task = make_task(d, splits=["random"], strict=True)
        _run(task, llava, tmp_path / "out", batch_size=4, strict=True)


def test_a_run_reports_its_own_peak_memory_not_the_process_peak(llava, pope_dir, tmp_path, make_task):
    """A multirun's jobs share one process: each run's peak counts from its own start (Linux: VmHWM is reset)."""
    from harness.provenance import peak_memory

    ballast = torch.ones(512 * 2**20 // 4)  # 512 MiB written, so resident: the peak of a "previous run"
    del ballast
    before = peak_memory()["max_rss_mb"]
    _run(make_task(pope_dir, limit=1), llava, tmp_path, batch_size=3)
    during = json.loads((tmp_path / "results.json").read_text())["peak_memory"]["max_rss_mb"]
    assert during < before - 256, (before, during)


def test_results_file_contents(llava, pope_dir, tmp_path, make_task):
    task = make_task(pope_dir, limit=2)
    _run(task, llava, tmp_path, batch_size=3, config={"seed": 0}, config_hash="cafe")
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"pope", "pope_random", "pope_popular", "pope_adversarial"} <= set(res["results"])
    head = res["results"]["pope"]
    for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert f"{metric},pope_official" in head and f"{metric}_stderr,pope_official" in head
    assert res["config_hash"] == "cafe" and res["config"] == {"seed": 0}
    build = res["environment"]["torch_build"]  # the version torch runs as, with its build tag (+cpu, +cu130)
    assert build["version"] == torch.__version__ and build["cuda"] == torch.version.cuda
    assert build["gpus"] == [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    assert torch.__version__.startswith(res["environment"]["packages"]["torch"].split("+")[0])
    assert "describe" in res["git"]
    assert res["timings"]["model_load_s"] is not None and res["timings"]["samples_per_s"] > 0
    assert res["peak_memory"]["max_rss_mb"] > 0
    assert res["model"]["model_class"] == "LlavaForConditionalGeneration"
    rec = _records(tmp_path)[0]
    for key in (
        "prompt",
        "raw_output",
        "parsed",
        "target",
        "sample_id",
        "image_id",
        "error",
        "doc_hash",
        "prompt_hash",
        "target_hash",
    ):
        assert key in rec
