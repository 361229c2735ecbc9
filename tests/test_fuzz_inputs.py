"""Fuzzing the input side: bad question files and odd images, generated from a fixed seed (deterministic).

A clean POPE set (4 questions per split) is evaluated once. Each case below writes a copy of it with bad rows
mixed in (truncated JSON Lines, wrong types, non-objects, non-UTF-8 bytes, duplicate question ids, very long
questions, ...), benign changes to the good rows (a byte-order mark, CRLF line ends, extra fields, blank lines) or
images of odd kinds (CMYK, 16-bit, palette, LA, 1-bit, truncated, empty, not an image). Each copy must either

* finish, with every bad row a per-sample error record, every good sample answered exactly as in the clean run
  (same id, same output) and, when nothing new can succeed, the very same metrics; or
* stop with a one-line :class:`core.errors.UserError` (an empty file, a broken JSON array).
"""

from __future__ import annotations

import io
import json
import random
import shutil

import pytest
from PIL import Image

from core.errors import UserError
from harness.engine import RunSettings, evaluate
from methods.none import NoMethod

SPLITS = ("random", "popular", "adversarial")
PER_SPLIT = 2
GEN = {"max_new_tokens": 3, "do_sample": False}


def _clean_set(pope_dir, root):
    d = root / "clean"
    shutil.copytree(pope_dir, d)
    for split in SPLITS:
        f = d / f"shapes_pope_{split}.json"
        f.write_text("".join(line + "\n" for line in f.read_text().splitlines()[:PER_SPLIT]))
    return d


def _evaluate(make_task, d, out, strict=False):
    task = make_task(d, gen_kwargs=GEN, n_boot=50, strict=strict)
    settings = RunSettings(output_dir=out, config_hash="fuzz", progress=False, report=False, batch_size=1)
    return evaluate(task, _evaluate.adapter, NoMethod(), settings)


def _records(out):
    return [json.loads(x) for x in (out / "samples_pope.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def clean(llava, pope_dir, tmp_path_factory, make_task):
    _evaluate.adapter = llava
    root = tmp_path_factory.mktemp("fuzz")
    d = _clean_set(pope_dir, root)
    res = _evaluate(make_task, d, root / "clean-out")
    good = {r["sample_id"]: r["raw_output"] for r in _records(root / "clean-out")}
    assert len(good) == 3 * PER_SPLIT and res["errors"]["count"] == 0
    return d, res, good


# ----------------------------------------------------------------------------------------------- bad rows
def _bad_rows(rng: random.Random, good_line: str) -> list[bytes]:
    """Rows that must each become one error record (new question ids, so they never shadow a good one)."""
    row = json.loads(good_line)
    qid = lambda: 10_000 + rng.randrange(10**6)  # noqa: E731

    def variant(**changes):
        new = {**row, "question_id": qid(), **changes}
        return json.dumps({k: v for k, v in new.items() if v is not _DROP}).encode()

    cut = rng.randrange(5, len(good_line) - 2)
    return [
        good_line[:cut].encode(),  # truncated JSON line
        variant(label="maybe"),
        variant(label=1),
        variant(text=12345),
        variant(text=None),
        variant(image=None),
        variant(image=["a.png"]),
        variant(image=f"missing_{rng.randrange(999)}.png"),
        variant(label=_DROP),
        variant(question_id=[1, 2]),
        variant(question_id=True),
        variant(question_id=""),
        b"[1, 2, 3]",
        b'"just a string"',
        b"null",
        b"{}",
        variant(text="x")[:-1] + b"\xff\xfe}",  # non-UTF-8 bytes
        b"\xef\xbb\xbf" + b"{not json",  # BOM then garbage
    ]


_DROP = object()


def _mutate(clean_dir, dst, rng: random.Random, *, bad: bool, benign: bool):
    shutil.copytree(clean_dir, dst)
    for split in SPLITS:
        f = dst / f"shapes_pope_{split}.json"
        lines = f.read_text().splitlines()
        rows: list[bytes] = []
        for line in lines:
            b = line.encode()
            if benign:
                obj = json.loads(line)
                if rng.random() < 0.5:
                    obj["extra_field"] = {"nested": [1, 2]}
                b = json.dumps(obj, indent=None, separators=(", ", ": ") if rng.random() < 0.5 else (",", ":")).encode()
                b = (b"\xef\xbb\xbf" if rng.random() < 0.3 else b"") + b"  " * rng.randrange(2) + b
            rows.append(b)
        if bad:
            extra = rng.sample(_bad_rows(rng, lines[0]), k=6)
            if split == "random":
                extra.append(json.dumps({**json.loads(lines[1]), "question_id": 777_777}).encode())
                extra.append(json.dumps({**json.loads(lines[1]), "question_id": 777_777}).encode())  # duplicate id
            for row in extra:
                rows.insert(rng.randrange(len(rows) + 1), row)
        if benign:
            rows.insert(rng.randrange(len(rows) + 1), b"   ")
        eol = b"\r\n" if benign and rng.random() < 0.5 else b"\n"
        f.write_bytes(eol.join(rows) + eol)
    return dst


def _check_finished(res, out, good, clean_res, *, same_metrics: bool):
    recs = _records(out)
    ids = [r["sample_id"] for r in recs]
    assert len(ids) == len(set(ids)), "nothing recorded twice"
    ok = {r["sample_id"]: r["raw_output"] for r in recs if not r["error"]}
    assert {sid: ok.get(sid) for sid in good} == good, "every good sample answered as in the clean run"
    for r in recs:
        if r["error"]:
            assert "\n" not in r["error"] and r["error"].strip()
    n = res["n-samples"]["pope"]
    assert n["effective"] + n["errors"] == n["original"] == len(recs)
    if same_metrics:
        assert res["results"] == clean_res["results"]


@pytest.mark.parametrize("seed", range(4))
def test_bad_rows_become_error_records_and_good_metrics_stay(clean, tmp_path, make_task, seed):
    clean_dir, clean_res, good = clean
    d = _mutate(clean_dir, tmp_path / "data", random.Random(seed), bad=True, benign=seed % 2 == 1)
    res = _evaluate(make_task, d, tmp_path / "out")
    ok_ids = {r["sample_id"] for r in _records(tmp_path / "out") if not r["error"]}
    assert ok_ids - set(good) == {"random/777777"}, "the one new valid row; every other new row is an error"
    # metrics over the good samples are the clean run's (the extra valid row aside)
    _check_finished(res, tmp_path / "out", good, clean_res, same_metrics=False)
    assert res["errors"]["count"] == 3 * 6 + 1
    assert "duplicate question_id" in res["errors"]["by_reason"]
    assert all(len(kind) < 80 for kind in res["errors"]["by_reason"]), res["errors"]["by_reason"]


@pytest.mark.parametrize("seed", range(2))
def test_benign_changes_keep_every_sample_and_the_metrics(clean, tmp_path, make_task, seed):
    clean_dir, clean_res, good = clean
    d = _mutate(clean_dir, tmp_path / "data", random.Random(100 + seed), bad=False, benign=True)
    res = _evaluate(make_task, d, tmp_path / "out")
    _check_finished(res, tmp_path / "out", good, clean_res, same_metrics=True)
    assert res["errors"]["count"] == 0


def test_only_error_rows_added_keeps_the_metrics(clean, tmp_path, make_task):
    clean_dir, clean_res, good = clean
    d = tmp_path / "data"
    shutil.copytree(clean_dir, d)
    rng = random.Random(7)
    for split in SPLITS:
        f = d / f"shapes_pope_{split}.json"
        rows = f.read_bytes().splitlines()
        for row in rng.sample(_bad_rows(rng, rows[0].decode()), k=8):
            rows.insert(rng.randrange(len(rows) + 1), row)
        f.write_bytes(b"\n".join(rows) + b"\n")
    res = _evaluate(make_task, d, tmp_path / "out")
    _check_finished(res, tmp_path / "out", good, clean_res, same_metrics=True)
    assert res["errors"]["count"] == 3 * 8


def test_very_long_question_is_an_error_or_an_answer_never_a_crash(clean, tmp_path, make_task):
    clean_dir, clean_res, good = clean
    d = tmp_path / "data"
    shutil.copytree(clean_dir, d)
    f = d / "shapes_pope_random.json"
    rows = f.read_text().splitlines()
    long = {**json.loads(rows[0]), "question_id": 999_999, "text": "Is there a circle " * 2000 + "?"}
    f.write_text("\n".join([*rows, json.dumps(long)]) + "\n")
    res = _evaluate(make_task, d, tmp_path / "out")
    _check_finished(res, tmp_path / "out", good, clean_res, same_metrics=False)
    assert "random/999999" in {r["sample_id"] for r in _records(tmp_path / "out")}


# ----------------------------------------------------------------------------------------------- odd images
def _image_bytes(kind: str, base: Image.Image) -> bytes:
    buf = io.BytesIO()
    if kind == "cmyk_jpeg":
        base.convert("CMYK").save(buf, "JPEG")
    elif kind == "png16":
        base.convert("I").point(lambda v: v * 256).convert("I;16").save(buf, "PNG")
    elif kind == "palette":
        base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(buf, "PNG")
    elif kind == "la":
        base.convert("LA").save(buf, "PNG")
    elif kind == "one_bit":
        base.convert("1").save(buf, "PNG")
    elif kind == "rgba":
        base.convert("RGBA").save(buf, "PNG")
    elif kind == "truncated":
        base.save(buf, "PNG")
        return buf.getvalue()[: len(buf.getvalue()) // 2]
    elif kind == "empty":
        return b""
    elif kind == "text":
        return b"this is not an image\n"
    else:
        raise ValueError(kind)
    return buf.getvalue()


ODD = ("cmyk_jpeg", "png16", "palette", "la", "one_bit", "rgba", "truncated", "empty", "text")
DECODABLE = {"cmyk_jpeg", "png16", "palette", "la", "one_bit", "rgba"}


def test_images_of_odd_modes_are_answered_or_per_sample_errors(clean, tmp_path, make_task):
    clean_dir, clean_res, good = clean
    d = tmp_path / "data"
    shutil.copytree(clean_dir, d)
    f = d / "shapes_pope_random.json"
    rows = f.read_text().splitlines()
    first = json.loads(rows[0])
    base = Image.open(d / "images" / first["image"]).convert("RGB")
    extra = []
    for i, kind in enumerate(ODD):
        name = f"odd_{kind}.img"
        (d / "images" / name).write_bytes(_image_bytes(kind, base))
        extra.append(json.dumps({**first, "question_id": 500_000 + i, "image": name}))
    f.write_text("\n".join(rows + extra) + "\n")
    res = _evaluate(make_task, d, tmp_path / "out")
    _check_finished(res, tmp_path / "out", good, clean_res, same_metrics=False)
    by_id = {r["sample_id"]: r for r in _records(tmp_path / "out")}
    for i, kind in enumerate(ODD):
        rec = by_id[f"random/{500_000 + i}"]
        assert (rec["error"] is None) == (kind in DECODABLE), (kind, rec["error"])
    assert set(res["errors"]["by_reason"]) == {"cannot decode image"}


# ----------------------------------------------------------------------------------------------- whole-file failures
@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "has no questions"),
        (b"\n \r\n\t\n", "has no questions"),
        (b"\xef\xbb\xbf", "has no questions"),
        (b"[]", "has no questions"),
        (b'[{"question_id": 1, "image": "a.png"', "invalid JSON array"),
        (b'[{"question_id": 1}]\xff', "invalid JSON array"),
    ],
)
@pytest.mark.parametrize("strict", [False, True])
def test_unusable_file_stops_with_one_line(clean, tmp_path, make_task, content, needle, strict):
    clean_dir, _, _ = clean
    d = tmp_path / "data"
    shutil.copytree(clean_dir, d)
    (d / "shapes_pope_popular.json").write_bytes(content)
    with pytest.raises(UserError, match=needle) as info:
        _evaluate(make_task, d, tmp_path / "out", strict=strict)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "samples_pope.jsonl").exists(), "nothing generated"
