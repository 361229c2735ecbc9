"""POPE split builder: POPE's sampling rules, determinism, and a round trip through the loader."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from shapes.pope_build import (
    build_pope_questions,
    load_ground_truth,
    main,
    question_text,
    write_pope_files,
)
from tasks.pope import DEFAULT_PROMPT_SUFFIX, POPETask

# A constructed example with known rankings (objects in order of first appearance:
# dog cat bird leash ball car frisbee sofa lamp tv).
# Frequencies: dog 4, cat 3, leash 3, sofa 2, the rest 1.
# Co-occurrence with dog: leash 3, cat/bird/ball/car/frisbee 1.  With cat: sofa 2, dog/bird/lamp/tv 1.
SMALL = {
    "t.jpg": ["dog", "cat", "bird"],
    "1.jpg": ["dog", "leash", "ball"],
    "2.jpg": ["dog", "leash", "car"],
    "3.jpg": ["dog", "leash", "frisbee"],
    "4.jpg": ["cat", "sofa", "lamp"],
    "5.jpg": ["cat", "sofa", "tv"],
    "few.jpg": ["dog", "cat"],  # fewer than 3 objects: skipped
}


def random_gt(n_images: int = 40, seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    vocab = [f"thing{i}" for i in range(25)] + ["apple", "umbrella", "orange"]
    return {f"img{i:03d}.jpg": rng.sample(vocab, rng.randint(3, 7)) for i in range(n_images)}


def negatives(questions: list[dict]) -> dict[str, list[str]]:
    out = defaultdict(list)
    for q in questions:
        if q["label"] == "no":
            out[q["image"]].append(q["text"])
    return out


def obj(text: str) -> str:
    return text.removeprefix("Is there ").removesuffix(" in the image?").split(" ", 1)[1]


def test_question_template():
    assert question_text("dog") == "Is there a dog in the image?"
    assert question_text("apple") == "Is there an apple in the image?"
    assert question_text("umbrella") == "Is there an umbrella in the image?"
    assert question_text("Elephant") == "Is there an Elephant in the image?"
    assert question_text("hair drier") == "Is there a hair drier in the image?"


@pytest.mark.parametrize("strategy", ["random", "popular", "adversarial"])
def test_structure_and_balance(strategy):
    gt = random_gt()
    qs = build_pope_questions(gt, strategy, seed=1)
    assert [q["question_id"] for q in qs] == list(range(1, len(qs) + 1))
    assert set(qs[0]) == {"question_id", "image", "text", "label"}
    labels = Counter(q["label"] for q in qs)
    assert labels["yes"] == labels["no"] == 3 * len(gt)
    for image, objects in gt.items():
        mine = [q for q in qs if q["image"] == image]
        assert [q["label"] for q in mine] == ["yes", "no"] * 3  # positive then negative, three times
        assert [obj(q["text"]) for q in mine if q["label"] == "yes"] == objects[:3]  # the first three listed
        asked = [obj(q["text"]) for q in mine]
        assert len(set(asked)) == 6  # never asked twice
        assert not {obj(q["text"]) for q in mine if q["label"] == "no"} & set(objects)  # never present


def test_images_with_fewer_than_three_objects_are_skipped():
    qs = build_pope_questions(SMALL, "random", seed=0)
    assert "few.jpg" not in {q["image"] for q in qs}
    assert len(qs) == 6 * 6


def test_popular_takes_most_frequent_absent_objects():
    neg = {img: [obj(t) for t in texts] for img, texts in negatives(build_pope_questions(SMALL, "popular")).items()}
    # ranking: dog 4, cat 3, leash 3 (cat first seen), sofa 2, bird, ball, car, frisbee, lamp, tv
    assert neg["t.jpg"] == ["leash", "sofa", "ball"]
    assert neg["1.jpg"] == ["cat", "sofa", "bird"]
    assert neg["4.jpg"] == ["dog", "leash", "bird"]


def test_adversarial_takes_top_cooccurring_object_of_the_positive():
    qs = build_pope_questions(SMALL, "adversarial", seed=0)
    neg = {img: [obj(t) for t in texts] for img, texts in negatives(qs).items()}
    assert neg["t.jpg"][0] == "leash"  # dog's top partner (3 images)
    assert neg["t.jpg"][1] == "sofa"  # cat's top partner (2 images)
    # bird co-occurs only with dog and cat, both present: random fallback, still absent and new
    assert neg["t.jpg"][2] not in {"dog", "cat", "bird", "leash", "sofa"}
    # 1.jpg: dog's partners leash/ball are present; tie cat=bird=car=frisbee=1 broken by first appearance
    assert neg["1.jpg"][:2] == ["cat", "car"]  # leash's partners: dog, ball present; car before frisbee


def test_deterministic_with_seed():
    gt = random_gt()
    for strategy in ("random", "popular", "adversarial"):
        assert build_pope_questions(gt, strategy, seed=3) == build_pope_questions(gt, strategy, seed=3)
    assert build_pope_questions(gt, "random", seed=3) != build_pope_questions(gt, "random", seed=4)
    drawn = {obj(t) for texts in negatives(build_pope_questions(gt, "random", seed=3)).values() for t in texts}
    assert len(drawn) > 15  # random negatives spread over the vocabulary


def test_positives_shared_across_splits():
    gt = random_gt()
    pos = {s: [q for q in build_pope_questions(gt, s, seed=0) if q["label"] == "yes"] for s in ("random", "popular")}
    assert pos["random"] == pos["popular"]


def test_unknown_strategy_and_tiny_vocabulary():
    with pytest.raises(ValueError, match="adversarial"):
        build_pope_questions(SMALL, "adversary")
    with pytest.raises(ValueError, match="vocabulary too small"):
        build_pope_questions({"a.jpg": ["x", "y", "z"]}, "random")


def test_round_trip_through_loader(tmp_path: Path):
    gt = random_gt(12)
    paths = write_pope_files(gt, tmp_path, "syn", seed=5)
    assert sorted(p.name for p in paths.values()) == [
        f"syn_pope_{s}.json" for s in ("adversarial", "popular", "random")
    ]
    first_line = json.loads(paths["random"].read_text().splitlines()[0])  # JSON Lines, official fields
    assert set(first_line) == {"question_id", "image", "text", "label"}
    task = POPETask(questions=str(tmp_path / "syn_pope_{split}.json"), image_root=str(tmp_path))
    samples = task.samples()
    for split in ("random", "popular", "adversarial"):
        got = [
            (s.sample_id, s.image_id + ".jpg", s.text.removesuffix(DEFAULT_PROMPT_SUFFIX), s.target)
            for s in samples
            if s.split == split
        ]
        built = build_pope_questions(gt, split, seed=5)
        assert got == [(f"{split}/{q['question_id']}", q["image"], q["text"], q["label"]) for q in built]
    assert all(s.error is None for s in samples)


def test_ground_truth_formats_and_cli(tmp_path: Path, capsys):
    mapping = tmp_path / "gt.json"
    mapping.write_text(json.dumps(SMALL))
    records = tmp_path / "seg.json"
    records.write_text("".join(json.dumps({"image": k, "objects": v}) + "\n" for k, v in SMALL.items()))
    assert load_ground_truth(mapping) == SMALL == load_ground_truth(records)
    main([str(records), str(tmp_path / "out"), "--prefix", "toy", "--splits", "popular"])
    assert (tmp_path / "out" / "toy_pope_popular.json").is_file()
    assert "popular" in capsys.readouterr().out
