"""Shapes world: generator determinism, visibility, co-occurrence statistics, captions and QA language."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from shapes.scene import (
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    SYNONYMS,
    WorldSpec,
    _mask,
    caption,
    generate,
    make_scene,
    qa_colour,
    qa_count,
    qa_existence,
    qa_position,
    reference_caption,
    world_statistics,
)

SPEC = WorldSpec()


@pytest.fixture(scope="module")
def scenes():
    return generate(300, seed=3, spec=SPEC, split="eval")


@pytest.fixture(scope="module")
def big_sample():
    return generate(2000, seed=11, spec=SPEC, split="train")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


# ----------------------------------------------------------------------------------------------- generator
def test_same_seed_same_bytes_and_random_access():
    a = generate(20, seed=5, split="eval")
    b = generate(20, seed=5, split="eval")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.image.tobytes() == y.image.tobytes()
        assert x.objects == y.objects
        z = make_scene(5, "eval", i)
        assert z.image.tobytes() == x.image.tobytes() and z.objects == x.objects
    assert make_scene(5, "eval", 19).image.tobytes() == a[19].image.tobytes()  # random access, no prefix needed


def test_seeds_and_splits_are_different_streams():
    train = {s.digest for s in generate(300, seed=0, split="train")}
    evals = {s.digest for s in generate(300, seed=0, split="eval")}
    other_seed = {s.digest for s in generate(300, seed=1, split="eval")}
    assert len(train) == len(evals) == 300  # no duplicate image inside a stream
    assert not train & evals
    assert not evals & other_seed


def test_scene_shape_and_object_rules(scenes):
    for s in scenes:
        assert s.image.shape == (SPEC.image_size, SPEC.image_size, 3) and s.image.dtype == np.uint8
        assert SPEC.min_objects <= len(s.objects) <= SPEC.max_objects
        assert len(set(s.shapes)) == len(s.shapes)  # distinct shape classes
        assert all(o.shape in SHAPES and o.colour in COLOURS for o in s.objects)


def test_every_object_visible_recomputed_from_masks(scenes):
    size = SPEC.image_size
    for s in scenes:
        masks = [_mask(o, size) for o in s.objects]
        for i, (obj, m) in enumerate(zip(s.objects, masks, strict=True)):
            covered = np.zeros_like(m)
            for later in masks[i + 1 :]:
                covered |= later
            visible = m & ~covered
            frac = visible.sum() / m.sum()
            assert frac >= SPEC.min_visible
            assert frac == pytest.approx(obj.visible, abs=1e-3)
            # The pixels the ground truth calls visible really show the object's colour.
            assert (s.image[visible] == COLOURS[obj.colour]).all()


def test_cooccurrence_statistics(big_sample):
    stats = world_statistics(big_sample, SPEC)
    assert stats["n_images"] == 2000
    assert stats["mean_p_partner_given_shape"] == pytest.approx(0.8, abs=0.04)
    assert stats["mean_p_nonpartner_given_shape"] == pytest.approx(0.24, abs=0.03)
    for value in stats["p_partner_given_shape"].values():
        assert value == pytest.approx(0.8, abs=0.07)
    # Independent recomputation for one pair and one non-pair.
    present = [set(s.shapes) for s in big_sample]
    with_circle = [p for p in present if "circle" in p]
    assert sum("star" in p for p in with_circle) / len(with_circle) == pytest.approx(
        stats["p_partner_given_shape"]["star|circle"], abs=1e-4
    )
    assert sum("square" in p for p in with_circle) / len(with_circle) < 0.4


# ----------------------------------------------------------------------------------------------- language
def test_synonym_table():
    assert list(SYNONYMS) == list(SHAPES)
    all_words = [w for syns in SYNONYMS.values() for w in syns]
    assert len(all_words) == len(set(all_words))
    assert not set(all_words) & set(SHAPES)
    assert not set(all_words) & set(COLOURS)
    assert all(re.fullmatch(r"[a-z]+", w) for w in all_words)


def assert_mentions_each_once(text: str, scene, vocab: dict[str, str]) -> None:
    """Every object named once (word → canonical shape via ``vocab``), preceded by its colour; nothing else."""
    toks = words(text)
    named = [(toks[i - 1], vocab[t]) for i, t in enumerate(toks) if t in vocab]
    assert sorted(named) == sorted((o.colour, o.shape) for o in scene.objects), text


def test_caption_mentions_every_object_exactly_once(scenes):
    rng = random.Random(0)
    canonical = {s: s for s in SHAPES}
    templates = set()
    for s in scenes:
        for text in (caption(s), caption(s, rng)):
            assert_mentions_each_once(text, s, canonical)
            assert text.endswith(".")
            templates.add(text.split(" a")[0])
        expected = [f"{o.colour} {o.shape}" for o in s.objects]
        plain = caption(s)
        assert plain.startswith("There is ")
        assert [plain.index(e) for e in expected] == sorted(plain.index(e) for e in expected)  # drawing order
    assert len(templates) >= 3  # wording varies with rng


def test_caption_is_a_function_of_scene_and_rng(scenes):
    s = scenes[0]
    assert caption(s, random.Random(7)) == caption(s, random.Random(7))
    assert caption(s) == caption(s)


def test_reference_captions_use_synonyms(scenes):
    rng = random.Random(1)
    vocab = {s: s for s in SHAPES} | {w: s for s, syns in SYNONYMS.items() for w in syns}
    used = set()
    for s in scenes:
        text = reference_caption(s, rng)
        assert_mentions_each_once(text, s, vocab)
        used |= set(words(text)) & (set(vocab) - set(SHAPES))
    assert len(used) > 10


def test_qa_existence(scenes):
    rng = random.Random(2)
    answers = []
    for s in scenes:
        for forced in ("Yes", "No", None):
            q, a = qa_existence(s, rng, forced)
            shape = re.fullmatch(r"Is there an? (\w+) in the image\?", q).group(1)
            assert a == ("Yes" if shape in s.shapes else "No")
            assert forced in (None, a)
            assert q.split()[2] == ("an" if shape[0] in "aeiou" else "a")
            if forced is None:
                answers.append(a)
    assert 0.4 < answers.count("Yes") / len(answers) < 0.6


def test_qa_count(scenes):
    rng = random.Random(3)
    for s in scenes:
        for forced in ("Yes", "No"):
            q, a = qa_count(s, rng, forced)
            m = re.fullmatch(r"(?:Is there (one) object|Are there (\w+) objects) in the image\?", q)
            n = NUMBER_WORDS.index(m.group(1) or m.group(2))
            assert a == forced and (n == len(s.objects)) == (a == "Yes")
            assert n >= 1 and (n == 1) == q.startswith("Is there")


def test_qa_colour(scenes):
    rng = random.Random(4)
    for s in scenes:
        for forced in ("Yes", "No"):
            q, a = qa_colour(s, rng, forced)
            shape, colour = re.fullmatch(r"Is the (\w+) (\w+)\?", q).groups()
            obj = next(o for o in s.objects if o.shape == shape)
            assert colour in COLOURS and a == forced and (obj.colour == colour) == (a == "Yes")


def position_truth(scene, a: str, rel: str, b: str) -> bool:
    oa = next(o for o in scene.objects if o.shape == a)
    ob = next(o for o in scene.objects if o.shape == b)
    axis = 0 if rel in ("left", "right") else 1
    delta = ob.center[axis] - oa.center[axis]
    assert abs(delta) >= scene.image.shape[1] / 8  # only unambiguous relations are asked
    return delta > 0 if rel in ("left", "above") else delta < 0


def test_qa_position(scenes):
    rng = random.Random(5)
    pattern = r"Is the (\w+) (?:to the )?(left|right|above|below) (?:of )?the (\w+)\?"
    asked = none = 0
    for s in scenes:
        for forced in ("Yes", "No"):
            qa = qa_position(s, rng, forced)
            if len(s.objects) == 1:
                assert qa is None
            if qa is None:
                none += 1
                continue
            q, a = qa
            a_shape, rel, b_shape = re.fullmatch(pattern, q).groups()
            assert a_shape != b_shape and a == forced
            assert position_truth(s, a_shape, rel, b_shape) == (a == "Yes")
            asked += 1
    assert asked > 400 and none > 0


def test_qa_rejects_bad_answer(scenes):
    with pytest.raises(ValueError):
        qa_existence(scenes[0], random.Random(0), "yes")
