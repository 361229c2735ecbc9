"""POPE loaders: JSON Lines, JSON array and parquet give the same samples; malformed input is reported."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.base import TASKS, SampleError
from tasks.pope import DEFAULT_PROMPT_SUFFIX, POPETask

COLORS = {"COCO_a": (255, 0, 0), "COCO_b": (0, 0, 255)}

QUESTIONS = {
    "random": [
        (1, "COCO_a", "Is there a dog in the image?", "yes"),
        (2, "COCO_a", "Is there an apple in the image?", "no"),
        (3, "COCO_b", "Is there a car in the image?", "yes"),
        (4, "COCO_b", "Is there a kite in the image?", "no"),
    ],
    "popular": [
        (1, "COCO_a", "Is there a dog in the image?", "yes"),
        (2, "COCO_a", "Is there a person in the image?", "no"),
        (3, "COCO_b", "Is there a car in the image?", "yes"),
    ],
}


def official(split: str) -> list[dict]:
    return [{"question_id": q, "image": f"{img}.png", "text": t, "label": lab} for q, img, t, lab in QUESTIONS[split]]


def png_bytes(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for stem, color in COLORS.items():
        (images / f"{stem}.png").write_bytes(png_bytes(color))
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "array").mkdir()
    for split in QUESTIONS:
        write_jsonl(tmp_path / "jsonl" / f"coco_pope_{split}.json", official(split))
        (tmp_path / "array" / f"aokvqa_pope_seem_{split}.json").write_text(json.dumps(official(split), indent=1))
    # one JSON Lines file holding every split, split taken from `category`; popular first to test re-ordering
    mixed = [{**r, "category": s} for s in ("popular", "random") for r in official(s)]
    write_jsonl(tmp_path / "mixed.jsonl", mixed)
    rows = [
        {
            "id": str(k),
            "question_id": str(q),
            "question": t,
            "answer": lab,
            "image": {"bytes": png_bytes(COLORS[img]), "path": f"{img}.png"},
            "image_source": img,
            "category": split,
        }
        for k, (split, (q, img, t, lab)) in enumerate((s, x) for s in ("popular", "random") for x in QUESTIONS[s])
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pope.parquet")
    return tmp_path


def key(samples) -> list[tuple]:
    return [(s.sample_id, s.split, s.index, s.image_id, s.text, s.target, s.error) for s in samples]


def pixels(sample) -> tuple:
    (img,) = sample.images()
    assert img.mode == "RGB"
    return tuple(np.asarray(img)[0, 0])


def test_registered():
    assert TASKS.get("pope") is POPETask
    assert POPETask.name == "pope" and POPETask.version == "1.0"


def test_jsonl_samples(data: Path):
    task = POPETask(
        questions=str(data / "jsonl" / "coco_pope_{split}.json"),
        image_root=str(data / "images"),
        splits=["random", "popular"],
    )
    samples = task.samples()
    assert [s.sample_id for s in samples] == [f"random/{i}" for i in (1, 2, 3, 4)] + [f"popular/{i}" for i in (1, 2, 3)]
    assert [s.index for s in samples] == list(range(7))
    first = samples[1]
    assert first.split == "random" and first.image_id == "COCO_a" and first.target == "no"
    assert first.text == "Is there an apple in the image?" + DEFAULT_PROMPT_SUFFIX
    assert first.source == f"{data / 'jsonl' / 'coco_pope_random.json'}:2"
    assert first.doc == official("random")[1]
    assert first.error is None
    assert pixels(samples[0]) == COLORS["COCO_a"] and pixels(samples[3]) == COLORS["COCO_b"]


def test_a_question_that_already_ends_with_the_suffix_gets_it_once(data: Path, tmp_path: Path):
    """A file exported with the instruction in (on its own line or after a space) is not told it twice."""
    words = DEFAULT_PROMPT_SUFFIX.strip()
    records = official("random")
    records[0]["text"] += DEFAULT_PROMPT_SUFFIX
    records[1]["text"] += f" {words} "
    write_jsonl(tmp_path / "with_suffix_random.jsonl", records)
    questions = str(tmp_path / "with_suffix_{split}.jsonl")
    task = POPETask(questions=questions, image_root=str(data / "images"), splits=["random"])
    texts = [s.text for s in task.samples()]
    assert [t.count(words) for t in texts] == [1, 1, 1, 1], texts
    assert texts[0] == texts[2].replace("a car", "a dog") == "Is there a dog in the image?" + DEFAULT_PROMPT_SUFFIX


def test_jsonl_array_and_parquet_agree(data: Path):
    splits = ["random", "popular"]
    root = str(data / "images")
    jsonl = POPETask(questions=str(data / "jsonl" / "coco_pope_{split}.json"), image_root=root, splits=splits)
    array = POPETask(questions=str(data / "array" / "aokvqa_pope_seem_{split}.json"), image_root=root, splits=splits)
    mixed = POPETask(questions=str(data / "mixed.jsonl"), image_root=root, splits=splits)
    parquet = POPETask(questions=str(data / "pope.parquet"), splits=splits)
    ref = jsonl.samples()
    for other in (array, mixed, parquet):
        got = other.samples()
        assert key(got) == key(ref)
        assert [pixels(s) for s in got] == [pixels(s) for s in ref]
    assert array.samples()[2].source.endswith("aokvqa_pope_seem_random.json[2]")
    assert parquet.samples()[0].source == f"{data / 'pope.parquet'}[3]"  # rows 0-2 are popular


def test_parquet_doc_has_no_image_bytes(data: Path):
    (sample, *_) = POPETask(questions=str(data / "pope.parquet"), splits=["random"]).samples()
    assert sample.doc["image"] == {"path": "COCO_a.png"}
    assert sample.doc["question"] == "Is there a dog in the image?"
    json.dumps(sample.doc)  # serialisable


def test_glob_pattern(data: Path):
    task = POPETask(questions=str(data / "jsonl" / "*_pope_{split}.json"), image_root=str(data / "images"))
    with pytest.raises(FileNotFoundError, match="adversarial"):
        task.samples()
    task = POPETask(questions=str(data / "*.parquet"), splits=["popular"])
    assert len(task.samples()) == 3


def test_limit_per_split(data: Path):
    for questions in (str(data / "jsonl" / "coco_pope_{split}.json"), str(data / "pope.parquet")):
        task = POPETask(questions=questions, image_root=str(data / "images"), splits=["random", "popular"], limit=2)
        assert [s.sample_id for s in task.samples()] == ["random/1", "random/2", "popular/1", "popular/2"]


def test_unknown_split_lists_present_splits(data: Path):
    task = POPETask(questions=str(data / "pope.parquet"), splits=["random", "adverserial"])
    with pytest.raises(ValueError, match=r"adverserial.*present: \['popular', 'random'\]"):
        task.samples()


def test_missing_file(data: Path):
    with pytest.raises(FileNotFoundError, match="nothing_pope_random"):
        POPETask(questions=str(data / "nothing_pope_{split}.json"), splits=["random"]).samples()
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet"):
        POPETask(questions=str(data / "missing.parquet")).samples()


def malformed_file(tmp_path: Path) -> Path:
    lines = [
        json.dumps({"question_id": 1, "image": "a.png", "text": "Is there a dog in the image?", "label": "yes"}),
        '{"question_id": 2, "image": "a.png", "text": ',  # truncated JSON
        json.dumps({"question_id": 3, "image": "a.png", "text": "Is there a cat in the image?"}),  # no label
        json.dumps({"question_id": 4, "image": "a.png", "text": "Is there a cow in the image?", "label": "maybe"}),
        "",
        json.dumps({"question_id": 5, "image": "a.png", "text": "Is there a pig in the image?", "label": " No"}),
        json.dumps({"question_id": 5, "image": "a.png", "text": "Is there a hen in the image?", "label": "no"}),
    ]
    path = tmp_path / "bad_pope_random.json"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_lines_become_error_records(tmp_path: Path):
    path = malformed_file(tmp_path)
    samples = POPETask(
        questions=str(tmp_path / "bad_pope_{split}.json"), image_root=str(tmp_path), splits=["random"]
    ).samples()
    by_line = {s.source.rsplit(":", 1)[1]: s for s in samples}
    assert sorted(by_line, key=int) == ["1", "2", "3", "4", "6", "7"]  # the blank line 5 is skipped
    assert all(s.source.startswith(f"{path}:") for s in samples)
    assert by_line["1"].error is None
    assert "invalid JSON" in by_line["2"].error and by_line["2"].images is None
    assert "'label'" in by_line["3"].error and "missing" in by_line["3"].error
    assert "'label'" in by_line["4"].error and "maybe" in by_line["4"].error
    assert by_line["6"].error is None and by_line["6"].target == "no"  # " No" normalised
    assert "duplicate" in by_line["7"].error
    assert len({s.sample_id for s in samples}) == len(samples)  # ids stay unique
    assert [s.index for s in samples] == list(range(6))


def test_strict_raises_naming_file_and_line(tmp_path: Path):
    path = malformed_file(tmp_path)
    task = POPETask(questions=str(tmp_path / "bad_pope_{split}.json"), splits=["random"], strict=True)
    with pytest.raises(SampleError, match=re.escape(f"{path}:2")) as info:
        task.samples()
    assert info.value.source == f"{path}:2"


def test_missing_category_in_all_splits_file(tmp_path: Path):
    path = write_jsonl(tmp_path / "all.jsonl", official("random"))  # no category field
    for strict in (False, True):
        task = POPETask(questions=str(path), splits=["random"], strict=strict)
        with pytest.raises(ValueError, match=r"not found.*present: \[\].*" + re.escape(f"{path}:1") + ".*'category'"):
            task.samples()


def test_row_without_category_is_an_error_record(tmp_path: Path):
    rows = [{**official("random")[0], "category": "random"}, official("random")[1]]
    path = write_jsonl(tmp_path / "all.jsonl", rows)
    ok, bad = POPETask(questions=str(path), splits=["random"]).samples()
    assert ok.error is None and ok.sample_id == "random/1"
    assert bad.split == "unknown" and "'category'" in bad.error and bad.source == f"{path}:2"
    with pytest.raises(SampleError, match=re.escape(f"{path}:2")):
        POPETask(questions=str(path), splits=["random"], strict=True).samples()


def test_missing_and_corrupt_images(tmp_path: Path):
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg at all")
    (tmp_path / "trunc.png").write_bytes(png_bytes((1, 2, 3))[:30])
    records = [
        {"question_id": 1, "image": "gone.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "bad.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 3, "image": "trunc.png", "text": "Is there a dog in the image?", "label": "yes"},
    ]
    path = write_jsonl(tmp_path / "img_pope_random.json", records)
    gone, bad, trunc = POPETask(
        questions=str(tmp_path / "img_pope_{split}.json"), image_root=str(tmp_path), splits=["random"]
    ).samples()
    assert gone.error is None  # images are lazy: the record itself is fine
    with pytest.raises(SampleError, match="not found") as info:
        gone.images()
    assert info.value.source == f"{path}:1"
    with pytest.raises(SampleError, match="cannot decode"):
        bad.images()
    with pytest.raises(SampleError, match="cannot decode"):
        trunc.images()


def test_corrupt_parquet_image(tmp_path: Path):
    row = {
        "question_id": "1",
        "question": "Is there a dog in the image?",
        "answer": "yes",
        "image": {"bytes": b"garbage", "path": "x.jpg"},
        "image_source": "x",
        "category": "random",
    }
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "p.parquet")
    (sample,) = POPETask(questions=str(tmp_path / "p.parquet"), splits=["random"]).samples()
    with pytest.raises(SampleError, match=re.escape(f"{tmp_path / 'p.parquet'}[0]")):
        sample.images()


def test_describe_reports_split_sizes(data: Path):
    task = POPETask(questions=str(data / "pope.parquet"), splits=["random", "popular"], n_boot=10)
    task.samples()
    info = task.describe()
    assert info["name"] == "pope" and info["version"] == "1.0"
    assert info["split_sizes"] == {"random": 4, "popular": 3}
    assert info["gen_kwargs"] == {"max_new_tokens": 128, "do_sample": False}
