"""VQA-Causal / VCR-Causal: CSV formats, the repository's decision rule, connective sweep, metrics, shapes export."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from shapes.export import causal_pair, occlusions, visible_masks
from shapes.scene import WorldSpec, _mask, generate
from tasks.base import Response, SampleError
from tasks.causal_pairs import CausalPairsTask, is_right

LN = math.log


def write_csv(path, rows, header=None):
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def vqa_dir(tmp_path):
    for i in (42, 7):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"COCO_val2014_{i:012d}.jpg")
    rows = [
        ("42", "The road is wet is due to it rained.", "It rained is due to the road is wet."),
        ("7", "He wears a coat is caused by the cold.", "The cold is caused by he wears a coat."),
        ("7", "Two cups is due to two people.", "Two people is due to two cups."),
    ]
    return tmp_path, rows


def test_vqa_format_with_and_without_header(vqa_dir):
    root, rows = vqa_dir
    with_header = write_csv(root / "a.csv", rows, ["image_id", "sentence", "reverse_sentence"])
    without = write_csv(root / "b.csv", rows)
    for path, first_line in ((with_header, 2), (without, 1)):
        samples = CausalPairsTask(data=str(path), image_root=str(root)).samples()
        assert [s.image_id for s in samples] == ["42", "7", "7"]
        assert samples[0].source == f"{path}:{first_line}"
        assert samples[0].text.startswith("The road is wet is due to it rained. Given such an image")
        red = samples[0].images()[0].getpixel((0, 0))[0]  # COCO_val2014_000000000042.jpg (JPEG: approximately)
        assert abs(red - 42) <= 3


def test_vcr_format_uses_the_relative_frame_path(tmp_path):
    (tmp_path / "movie1").mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "movie1" / "frame@0.jpg")
    path = write_csv(
        tmp_path / "vcr_causal.csv",
        [("m1", "movie1/frame@0.jpg", "A is due to B.", "B is due to A.")],
        ["movie", "image_id", "sentence", "reverse_sentence"],
    )
    (s,) = CausalPairsTask(data=str(path), image_root=str(tmp_path)).samples()
    assert s.doc["movie"] == "m1" and s.images()[0].size == (8, 8)


def test_connective_sweep_replaces_both_original_connectives(vqa_dir):
    root, rows = vqa_dir
    path = write_csv(root / "a.csv", rows, ["image_id", "sentence", "reverse_sentence"])
    samples = CausalPairsTask(data=str(path), image_root=str(root), connective="because").samples()
    assert samples[0].doc["sentence_scored"] == "The road is wet because it rained."
    assert samples[1].doc["reverse_scored"] == "The cold because he wears a coat."
    assert samples[1].doc["sentence"] == rows[1][1], "the original text is kept in the record"


def test_malformed_rows_become_error_samples_or_raise_in_strict(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("image_id,sentence,reverse_sentence\n1,only two\n2,,reversed\n3,ok.,ko.\n", encoding="utf-8")
    samples = CausalPairsTask(data=str(path), image_root=str(tmp_path)).samples()
    assert [s.error is not None for s in samples] == [True, True, False]
    assert "expected 3 columns" in samples[0].error and samples[0].source.endswith(":2")
    with pytest.raises(SampleError, match=r"bad\.csv:2"):
        CausalPairsTask(data=str(path), strict=True).samples()
    with pytest.raises(SampleError, match="image not found"):
        samples[2].images()


@pytest.mark.parametrize(
    ("probs", "right"),
    [
        ((0.6, 0.3, 0.4, 0.5), True),  # affirms the sentence, more than the reversal
        ((0.6, 0.3, 0.7, 0.2), False),  # affirms both, the reversal more
        ((0.2, 0.7, 0.1, 0.8), True),  # denies both, the sentence less
        ((0.2, 0.7, 0.1, 0.6), False),  # denies the sentence more than the reversal
        ((0.5, 0.5, 0.1, 0.9), False),  # a tie is neither affirmation nor denial
    ],
)
def test_decision_rule(probs, right):
    assert is_right(*probs) is right
    assert is_right(*(LN(p) for p in probs)) is right, "log-probabilities order the same way"


def record(i, image, y, n, yr, nr):
    lp = {"sentence": {"Yes": LN(y), "No": LN(n)}, "reverse": {"Yes": LN(yr), "No": LN(nr)}}
    return {"sample_id": str(i), "index": i, "image_id": image, "logprobs": lp}


def test_metrics_by_hand():
    recs = [
        record(0, "a", 0.6, 0.3, 0.4, 0.5),  # right, affirms s, denies r
        record(1, "a", 0.6, 0.3, 0.7, 0.2),  # wrong, affirms both
        record(2, "b", 0.2, 0.7, 0.1, 0.8),  # right, denies both
        record(3, "c", 0.2, 0.7, 0.1, 0.6),  # wrong
    ]
    task = CausalPairsTask(data="unused.csv", n_boot=200)
    row = task.aggregate(recs)["causal_pairs"]
    assert row["acc,none"] == pytest.approx(0.5)
    assert row["affirm_rate,none"] == pytest.approx(0.5)
    assert row["affirm_rate_reverse,none"] == pytest.approx(0.25)
    assert row["acc_stderr,none"] > 0 and row["sample_len"] == 4
    out = task.score(None, Response(None, "p", {"logprobs": recs[0]["logprobs"]}))
    assert out == {"parsed": "sentence", "correct": True, "affirms_sentence": True, "affirms_reverse": False}
    np.testing.assert_array_equal(task.outcomes(recs).binary, [1, 0, 1, 0])


def test_shapes_export_states_the_real_occluder():
    scenes = generate(60, 3, WorldSpec(), split="eval")
    found = 0
    for scene in scenes:
        size = scene.image.shape[0]
        vis = visible_masks(scene)
        for hidden, cover, frac in occlusions(scene):
            found += 1
            assert cover > hidden, "only a later-drawn object can cover"
            full = _mask(scene.objects[hidden], size)
            assert frac == pytest.approx(1 - vis[hidden].sum() / full.sum(), abs=1e-4) and frac >= 0.05
            covered = full & _mask(scene.objects[cover], size)
            assert covered.any() and not (covered & vis[hidden]).any(), "the named cover hides those pixels"
            sentence, reverse = causal_pair(scene, hidden, cover)
            a, b = scene.objects[hidden], scene.objects[cover]
            assert sentence.startswith(f"The {a.colour} {a.shape} is partly hidden is due to the {b.colour} {b.shape}")
            assert reverse.startswith(f"The {b.colour} {b.shape} covers the {a.colour} {a.shape} is due to")
    assert found > 10
