"""CHAIR: vocabulary pipeline, hand-computed metrics, COCO-format loader, the shapes-world export."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.config import instantiate
from tasks.base import TASKS, Response, SampleError
from tasks.chair import (
    COCO_SYNONYMS,
    CHAIRTask,
    Vocabulary,
    chair_statistics,
    drop_incomplete_sentence,
    read_image_ids,
    read_synonyms,
    sample_image_ids,
    singularize,
    tokenize,
)

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "assets" / "shapes-world" / "chair"


@pytest.fixture(scope="module")
def coco() -> Vocabulary:
    return Vocabulary.from_file()


def pairs(vocab: Vocabulary, caption: str) -> list[tuple[str, str]]:
    m = vocab.parse(caption)
    return list(zip(m.words, m.node_words, strict=True))


# ----------------------------------------------------------------------------------------------- vocabulary


def test_shipped_table_is_chairs_80_lines():
    table = read_synonyms(COCO_SYNONYMS)
    lines = [x for x in COCO_SYNONYMS.read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert len(lines) == 80
    assert len(set(table.values())) == 80
    assert table["televison"] == "tv" and table["phon"] == "cell phone" and table["knive"] == "knife"
    assert table["solider"] == "person" and table["desk"] == "dining table" and table["iPhone"] == "cell phone"
    assert " motor bike" in table and "motor bike" not in table  # CHAIR's ", " split keeps the double space
    assert " cheesecake" in table and "cheesecake" not in table


@pytest.mark.parametrize(
    ("word", "lemma"),
    [
        ("glasses", "glass"),
        ("glass", "glass"),
        ("people", "people"),
        ("skis", "ski"),
        ("buses", "bus"),
        ("bus", "bus"),
        ("scissors", "scissors"),
        ("knives", "knife"),
        ("mice", "mouse"),
        ("sheep", "sheep"),
        ("teddybears", "teddybear"),
        ("skiing", "skiing"),
    ],
)
def test_lemmatiser_pinned(word, lemma):
    assert singularize(word) == lemma


def test_tokenizer_splits_sentences_and_possessives():
    assert tokenize("Two dogs. A man's cat!") == ["two", "dogs", ".", "a", "man", "'s", "cat", "!"]


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A puppy and a kitten on a sofa.", [("puppy", "dog"), ("kitten", "cat"), ("sofa", "couch")]),
        ("Three giraffes, two knives and mice.", [("giraffe", "giraffe"), ("knife", "knife"), ("mouse", "mouse")]),
        ("People on skis near buses.", [("people", "person"), ("ski", "skis"), ("bus", "bus")]),
        (
            "Hot dogs, a teddy bear, traffic lights.",
            [("hot dog", "hot dog"), ("teddy bear", "teddy bear"), ("traffic light", "traffic light")],
        ),
        ("Two wine glasses and scissors.", [("wine glass", "wine glass"), ("scissors", "scissors")]),
        ("A baby elephant.", [("elephant", "elephant")]),
        ("A baby and an elephant.", [("baby", "person"), ("elephant", "elephant")]),
        ("An adult giraffe.", [("giraffe", "giraffe")]),
        ("A toilet seat.", [("toilet", "toilet")]),
        ("A seat.", [("seat", "chair")]),
        ("The seat of the toilet.", [("toilet", "toilet")]),
        ("A passenger train.", [("train", "train")]),
        ("A passenger jet.", [("jet", "airplane")]),
        ("A passenger on a train.", [("passenger", "person"), ("train", "train")]),
        ("The train track.", []),
        ("Home plate.", []),
        ("A bow tie.", [("tie", "tie")]),
        ("A motor bike and a motorbike.", [("motorbike", "motorcycle")]),  # " motor bike" never matches
        ("A televison and a phon.", [("televison", "tv"), ("phon", "cell phone")]),
        ("A man skiing.", [("man", "person")]),
    ],
)
def test_mentions(coco, caption, expected):
    assert pairs(coco, caption) == expected


def test_tokens_and_indices_after_merging(coco):
    m = coco.parse("A hot dog and a dog.")
    assert m.tokens == ("a", "hot dog", "and", "a", "dog", ".")
    assert m.indices == (1, 4)


def test_drop_incomplete_sentence():
    assert drop_incomplete_sentence("A dog. A cat sits on") == "A dog."
    assert drop_incomplete_sentence("A dog! A cat?  ") == "A dog! A cat?"
    assert drop_incomplete_sentence('He said "hi." Then a') == 'He said "hi."'
    assert drop_incomplete_sentence("There are 3.5 apples") == ""
    assert drop_incomplete_sentence("") == ""


def test_chair_statistics_nan_where_undefined():
    sums = np.array([[1, 0, 0, 0, 0, 0, 3], [0, 0, 0, 0, 0, 0, 0]], dtype=float)  # [2, 7]
    out = chair_statistics(sums)  # [2, 4]
    assert out[0, 0] == 0 and math.isnan(out[0, 1]) and math.isnan(out[0, 2]) and out[0, 3] == 3
    assert np.isnan(out[1]).all()


# ----------------------------------------------------------------------------------------------- COCO fixture

CATEGORIES = ["person", "dog", "toilet", "elephant", "train", "dining table", "hot dog", "teddy bear"]
INSTANCES = {
    1: ["person", "dog", "person"],
    2: ["toilet"],
    3: ["elephant", "train"],
    4: ["dining table", "hot dog"],
    5: ["teddy bear"],
}
REFERENCES = {
    1: ["A man walks his dog.", "A boy with a puppy on a bench."],
    2: ["A white toilet in a small bathroom with a sink."],
    3: ["A baby elephant next to a passenger train."],
    4: ["Hot dogs on a table."],
}
GT = {
    1: ["bench", "dog", "person"],
    2: ["sink", "toilet"],
    3: ["elephant", "train"],
    4: ["dining table", "hot dog"],
    5: ["teddy bear"],
}

# Hand-scored generated captions: (caption, mentions, hallucinated, correct node words, tokens after merging).
GENERATED = {
    1: ("A woman and two dogs sit on a couch next to a cat and another cat.", 5, 3, 2, 17),
    2: ("The seat of the toilet is up, and a toilet seat cover lies by the sink.", 3, 0, 2, 17),
    3: ("A baby elephant walks beside a passenger train and a hot dog stand.", 3, 1, 2, 11),
    4: ("Two hot dogs and a teddy bear on a table under a traffic light.", 4, 2, 2, 12),
}


def write_coco(root: Path, image_ids=(1, 2, 3, 4, 5), missing=(4,), split: dict | None = None) -> dict:
    """COCO-format fixture; ``split`` maps a file suffix to the image ids it holds (default: one file)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": n, "supercategory": "x"} for i, n in enumerate(CATEGORIES)]
    cat_id = {c["name"]: c["id"] for c in cats}
    split = split or {"val": list(image_ids)}
    for suffix, ids in split.items():
        images = [{"id": i, "file_name": f"img_{i}.png", "width": 4, "height": 4} for i in ids]
        anns = [
            {"id": 100 * i + k, "image_id": i, "category_id": cat_id[n]}
            for i in ids
            for k, n in enumerate(INSTANCES[i])
        ]
        caps = [
            {"id": 100 * i + k, "image_id": i, "caption": c} for i in ids for k, c in enumerate(REFERENCES.get(i, []))
        ]
        inst = {"images": images, "annotations": anns, "categories": cats}
        (root / f"instances_{suffix}.json").write_text(json.dumps(inst))
        (root / f"captions_{suffix}.json").write_text(json.dumps({"images": images, "annotations": caps}))
    for i in image_ids:
        if i not in missing:
            Image.new("RGB", (4, 4), (i * 40, 0, 0)).save(root / "images" / f"img_{i}.png")
    return {
        "instances": str(root / "instances_*.json"),
        "captions": str(root / "captions_*.json"),
        "image_root": str(root / "images"),
        "n_boot": 50,
    }


@pytest.fixture
def fixture(tmp_path: Path) -> dict:
    return write_coco(tmp_path)


def records_for(task: CHAIRTask, outputs: dict[int, str]) -> list[dict]:
    by_id = {int(s.image_id): s for s in task.samples()}
    recs = []
    for image_id, text in outputs.items():
        s = by_id[image_id]
        fields = task.score(s, Response(raw_output=text, prompt=s.text))
        recs.append({"image_id": s.image_id, "doc": s.doc, "target": s.target, "raw_output": text, **fields})
    return recs


def test_ground_truth_is_instances_union_captions(fixture):
    samples = {int(s.image_id): s for s in CHAIRTask(**fixture).samples()}
    assert {i: s.doc["gt_objects"] for i, s in samples.items()} == GT
    assert samples[1].doc["gt_from_instances"] == ["dog", "person"]
    assert samples[1].doc["gt_from_captions"] == ["bench", "dog", "person"]
    assert samples[3].doc["gt_from_captions"] == ["elephant", "train"]  # baby / passenger do not fire person
    assert samples[4].target == "dining table, hot dog"
    assert [s.sample_id for s in samples.values()] == ["1", "2", "3", "4", "5"]
    assert samples[1].text == "Please describe this image in detail."


def test_per_caption_fields(fixture):
    task = CHAIRTask(**fixture)
    rec = {r["image_id"]: r for r in records_for(task, {i: g[0] for i, g in GENERATED.items()})}
    assert rec["1"]["hallucinated"] == [["couch", "couch"], ["cat", "cat"], ["cat", "cat"]]
    assert rec["1"]["correct_objects"] == ["dog", "person"]
    assert rec["2"]["mentions"] == ["toilet", "toilet", "sink"] and rec["2"]["hallucinated"] == []
    assert rec["3"]["hallucinated"] == [["hot dog", "hot dog"]]
    assert rec["4"]["hallucinated"] == [["teddy bear", "teddy bear"], ["traffic light", "traffic light"]]
    for i, (caption, mentions, hallucinated, correct, words) in GENERATED.items():
        r = rec[str(i)]
        assert r["parsed"] == caption
        assert (len(r["mentions"]), len(r["hallucinated"]), len(r["correct_objects"]), r["n_words"]) == (
            mentions,
            hallucinated,
            correct,
            words,
        )


def test_metrics_by_hand(fixture):
    task = CHAIRTask(**fixture)
    records = records_for(task, {i: g[0] for i, g in GENERATED.items()})
    out = task.outcomes(records)
    assert out.counts.shape == (4, 7)
    assert out.binary.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert out.binary_name == "no_hallucination,none"
    row = task.aggregate(records)["chair"]
    assert row["sample_len"] == 4
    assert row["chair_s,none"] == pytest.approx(3 / 4)  # captions 1, 3, 4 hallucinate
    assert row["chair_i,none"] == pytest.approx(6 / 15)  # 3 + 0 + 1 + 2 of 5 + 3 + 3 + 4 mentions
    assert row["recall,none"] == pytest.approx(8 / 9)  # 2 + 2 + 2 + 2 of 3 + 2 + 2 + 2
    assert row["len,none"] == pytest.approx(57 / 4)  # 17 + 17 + 11 + 12 tokens
    assert row["chair_s_stderr,none"] is not None


def test_outcomes_reparse_raw_output_under_current_options(fixture):
    records = records_for(CHAIRTask(**fixture), {1: "A dog on a couch. A cat on the"})
    assert CHAIRTask(**fixture).aggregate(records)["chair"]["chair_i,none"] == pytest.approx(2 / 3)
    dropped = CHAIRTask(**fixture, drop_incomplete_sentence=True)
    assert dropped.aggregate(records)["chair"]["chair_i,none"] == pytest.approx(1 / 2)
    assert dropped.score(dropped.samples()[0], Response("A dog on a couch. A cat on the", None))["parsed"] == (
        "A dog on a couch."
    )
    records[0]["raw_output"] = "A dog."  # stale stored fields: outcomes trusts raw_output
    assert CHAIRTask(**fixture).aggregate(records)["chair"]["chair_s,none"] == 0.0


def test_ground_truth_from_target_when_doc_lacks_it(fixture):
    task = CHAIRTask(**fixture)
    rec = {"image_id": "4", "doc": {}, "target": "dining table, hot dog", "raw_output": "A hot dog on a desk."}
    assert task.outcomes([rec]).counts.tolist() == [[1, 0, 2, 0, 2, 2, 6]]


def test_subset_from_text_and_jsonl_ids(fixture, tmp_path):
    (tmp_path / "ids.txt").write_text("# frozen\n3\n\n1\n")
    (tmp_path / "ids.jsonl").write_text('{"image_id": 3}\n{"image_id": "1"}\n')
    (tmp_path / "ids.json").write_text('[3, {"image_id": 1}]')
    for name in ("ids.txt", "ids.jsonl", "ids.json"):
        samples = CHAIRTask(**fixture, image_ids_file=str(tmp_path / name)).samples()
        assert [s.image_id for s in samples] == ["3", "1"]
        assert [s.index for s in samples] == [0, 1]
    first = CHAIRTask(**fixture, image_ids_file=str(tmp_path / "ids.txt")).samples()[0]
    assert first.source == f"{tmp_path / 'ids.txt'}:2"
    assert [s.image_id for s in CHAIRTask(**fixture, image_ids_file=str(tmp_path / "ids.txt"), limit=1).samples()] == [
        "3"
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1\nabc\n", r"ids:2: image id must be a non-negative integer, got 'abc'"),
        ("1\n2\n1\n", r"ids:3: duplicate image id 1 \(first at .*ids:1\)"),
        ('{"id": 1}\n', r"ids:1: record has no 'image_id' key"),
        ('{"image_id": 1\n', r"ids:1: invalid JSON"),
        ('{"image_id": true}\n', r"ids:1: image id must be"),
        ("# nothing\n", r"ids: no image ids"),
    ],
)
def test_malformed_ids_file(tmp_path, content, message):
    (tmp_path / "ids").write_text(content)
    with pytest.raises(ValueError, match=message):
        read_image_ids(tmp_path / "ids")


def test_sampled_subset_is_deterministic(fixture):
    ids = [s.image_id for s in CHAIRTask(**fixture, n_images=3, seed=7).samples()]
    assert ids == [s.image_id for s in CHAIRTask(**fixture, n_images=3, seed=7).samples()]
    assert ids == [str(i) for i in sorted(random.Random(7).sample([1, 2, 3, 4, 5], 3))]
    assert len({tuple(sample_image_ids(range(1, 6), 2, seed)) for seed in range(10)}) > 1
    with pytest.raises(ValueError, match="n_images"):
        CHAIRTask(**fixture, n_images=6).samples()
    with pytest.raises(ValueError, match="not both"):
        CHAIRTask(**fixture, n_images=2, image_ids_file="x")


def test_images_lazy_and_missing_image_is_a_sample_error(fixture):
    samples = {s.image_id: s for s in CHAIRTask(**fixture).samples()}
    assert samples["1"].images()[0].size == (4, 4)
    with pytest.raises(SampleError, match="image not found"):
        samples["4"].images()


def test_unknown_image_id_is_an_error_sample(fixture, tmp_path):
    (tmp_path / "ids.txt").write_text("1\n99\n")
    samples = CHAIRTask(**fixture, image_ids_file=str(tmp_path / "ids.txt")).samples()
    assert samples[0].error is None and "image id 99 is not in the instance files" in samples[1].error
    with pytest.raises(SampleError, match="99"):
        CHAIRTask(**fixture, image_ids_file=str(tmp_path / "ids.txt"), strict=True).samples()
    (tmp_path / "none.txt").write_text("98\n99\n")
    with pytest.raises(ValueError, match="none of the image ids"):
        CHAIRTask(**fixture, image_ids_file=str(tmp_path / "none.txt")).samples()


def test_train_and_val_files_merge(tmp_path):
    merged = write_coco(tmp_path, split={"train2014": [1, 2], "val2014": [3, 4, 5]})
    samples = CHAIRTask(**merged).samples()
    assert {int(s.image_id): s.doc["gt_objects"] for s in samples} == GT


def test_bad_annotation_files_name_the_file(fixture, tmp_path):
    bad = tmp_path / "bad_instances.json"  # outside the fixture's instances_*.json glob
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"bad_instances\.json: invalid JSON"):
        CHAIRTask(**{**fixture, "instances": str(bad)}).samples()
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match=r"bad_instances\.json: missing list 'categories'"):
        CHAIRTask(**{**fixture, "instances": str(bad)}).samples()
    inst = json.loads((tmp_path / "instances_val.json").read_text())
    inst["categories"].append({"id": 99, "name": "spaceship"})
    bad.write_text(json.dumps(inst))
    with pytest.raises(ValueError, match=r"bad_instances\.json: category 'spaceship' .* synonym table"):
        CHAIRTask(**{**fixture, "instances": str(bad)}).samples()
    with pytest.raises(FileNotFoundError, match="no CHAIR captions file"):
        CHAIRTask(**{**fixture, "captions": str(tmp_path / "nope_*.json")}).samples()


# ----------------------------------------------------------------------------------------------- shapes world


@pytest.fixture(scope="module")
def shapes() -> CHAIRTask:
    return CHAIRTask(
        instances=str(SHAPES / "annotations" / "instances_shapes.json"),
        captions=str(SHAPES / "annotations" / "captions_shapes.json"),
        image_root=str(SHAPES / "images"),
        synonyms=str(SHAPES / "synonyms.txt"),
        image_ids_file=str(SHAPES / "chair_image_ids.txt"),
        n_boot=0,
    )


def test_shapes_reference_captions_do_not_hallucinate(shapes):
    samples = shapes.samples()
    assert len(samples) == 300
    refs = json.loads((SHAPES / "annotations" / "captions_shapes.json").read_text())["annotations"]
    first: dict[int, str] = {}
    for ann in refs:
        first.setdefault(ann["image_id"], ann["caption"])
    records = records_for(shapes, {int(s.image_id): first[int(s.image_id)] for s in samples})
    assert all(not r["hallucinated"] for r in records)
    row = shapes.aggregate(records)["chair"]
    assert row["chair_i,none"] == 0.0 and row["chair_s,none"] == 0.0 and row["recall,none"] == 1.0
    s = samples[0]
    assert s.images()[0].size == (64, 64)
    absent = sorted(
        {"circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon"} - set(s.doc["gt_objects"])
    )
    result = shapes.score(s, Response(f"I can see a {absent[0]} and a baby bear.", None))
    assert result["hallucinated"] == [[absent[0], absent[0]]]  # COCO rules and words do not fire here


def test_registered_and_config_builds_the_shapes_task():
    from omegaconf import OmegaConf

    assert TASKS.get("chair") is CHAIRTask
    cfg = OmegaConf.load(REPO / "conf" / "task" / "chair.yaml")
    task = instantiate(cfg, drop=("name",), strict=False, limit=4)
    assert isinstance(task, CHAIRTask) and cfg.name == task.name
    assert [s.image_id for s in task.samples()] == ["1", "2", "3", "4"]
    assert task.gen_kwargs == {"max_new_tokens": 512, "do_sample": False}
