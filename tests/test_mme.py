"""MME: the official parser, acc / acc+ / score by hand, both release layouts and the parquet export, the invariant."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.base import TASKS, Response, Sample, SampleError
from tasks.mme import DEFAULT_PROMPT_SUFFIX, MMETask, subtask_layout
from tasks.yesno import PARSERS, all_verdicts

REPO = Path(__file__).resolve().parent.parent
SHAPES_MME = REPO / "assets" / "shapes-world" / "mme"
SUFFIX = " Please answer yes or no."


# ----------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("YES!", "yes"),
        ("  no \n", "no"),
        ("No, there is", "no"),
        ("There is no", None),  # "ther": the answer word is past the 4-character prefix
        ("nope", "no"),
        ("noted", "no"),  # faithful quirk: "note" contains "no"
        ("Not sure", "no"),
        ("", None),
        ("I don't know", None),
        ("y", None),
        ("Yes and no", "yes"),  # "yes" is checked first
    ],
)
def test_mme_official_parser(text, expected):
    assert PARSERS.get("mme_official")(text, None) == expected
    assert PARSERS.get("mme_official")(text, "yes") == expected  # target-blind


def test_all_verdicts_has_every_parser():
    verdicts = all_verdicts("No, there is not.", "no")
    assert set(verdicts) == set(PARSERS.names()) >= {"mme_official", "pope_official", "lmms_exact", "yorn_words"}
    assert verdicts["mme_official"] == "no" and verdicts["lmms_exact"] is None


# ----------------------------------------------------------------------------------------------- metrics

# (subtask, image, target, output): a known pattern of right and wrong answers.
ANSWERS = [
    ("existence", "e1", "yes", "Yes"),
    ("existence", "e1", "no", "No"),  # both right
    ("existence", "e2", "yes", "Yes"),
    ("existence", "e2", "no", "Yes"),  # one wrong
    ("existence", "e3", "yes", "There is a cat"),  # undecided under mme_official (and unclean)
    ("existence", "e3", "no", "No."),
    ("commonsense_reasoning", "c1", "yes", "yes"),
    ("commonsense_reasoning", "c1", "no", "no"),  # both right
    ("commonsense_reasoning", "c2", "yes", "Yes"),
    ("commonsense_reasoning", "c2", "no", "no, it is not"),  # both right (unclean)
    ("commonsense_reasoning", "c3", "yes", "No"),
    ("commonsense_reasoning", "c3", "no", "Yes"),  # both wrong
]


def make_records(rows=ANSWERS, shuffle_seed=None):
    records = [
        {"sample_id": f"{s}/{i}/{k}", "split": s, "index": k, "image_id": f"{s}/{i}", "target": t, "raw_output": o}
        for k, (s, i, t, o) in enumerate(rows)
    ]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(records)
    return records


@pytest.fixture
def scorer(tmp_path):
    (tmp_path / "existence").mkdir()
    return MMETask(data=str(tmp_path), extra_parsers=["lmms_exact"], n_boot=50)


def test_acc_acc_plus_score_by_hand(scorer):
    res = scorer.aggregate(make_records(shuffle_seed=3), seed=0)
    ex, cs = res["mme_existence"], res["mme_commonsense_reasoning"]
    assert ex["acc,mme_official"] == pytest.approx(4 / 6)
    assert ex["acc_plus,mme_official"] == pytest.approx(1 / 3)
    assert ex["score,mme_official"] == pytest.approx(100 * 4 / 6 + 100 / 3)  # 100
    assert ex["unknown_rate,mme_official"] == pytest.approx(1 / 6)
    assert ex["unclean_rate,none"] == pytest.approx(1 / 6)
    assert cs["acc,mme_official"] == pytest.approx(4 / 6)
    assert cs["acc_plus,mme_official"] == pytest.approx(2 / 3)
    assert cs["score,mme_official"] == pytest.approx(400 / 3)
    assert cs["unknown_rate,mme_official"] == 0.0
    assert res["mme_perception"]["score,mme_official"] == pytest.approx(100.0)
    assert res["mme_cognition"]["score,mme_official"] == pytest.approx(400 / 3)
    assert res["mme"]["score,mme_official"] == pytest.approx(100 + 400 / 3)
    assert res["mme"]["acc,mme_official"] == pytest.approx(8 / 12)
    assert (ex["sample_len"], res["mme_perception"]["sample_len"], res["mme"]["sample_len"]) == (6, 6, 12)
    # lmms_exact: "No." and "There is a cat" are undecided → existence acc 3/6, acc+ 1/3, unknown 2/6.
    assert ex["acc,lmms_exact"] == pytest.approx(3 / 6)
    assert ex["score,lmms_exact"] == pytest.approx(50 + 100 / 3)
    assert ex["unknown_rate,lmms_exact"] == pytest.approx(2 / 6)
    assert ex["score_stderr,mme_official"] is not None and ex["score_stderr,mme_official"] > 0


def test_outcomes_binary_and_absent_group(scorer):
    records = make_records()
    out = scorer.outcomes(records)
    assert out.binary_name == "correct,mme_official"
    expected = [PARSERS.get("mme_official")(r["raw_output"], None) == r["target"] for r in records]
    np.testing.assert_array_equal(out.binary, np.array(expected, dtype=float))
    perception_only = scorer.aggregate(make_records(ANSWERS[:6]))
    assert "mme_cognition" not in perception_only
    assert perception_only["mme"]["score,mme_official"] == pytest.approx(100.0)


def test_a_subtask_whose_every_question_failed_leaves_its_sums_undefined(scorer):
    """Perception and the total are sums over the subtasks evaluated: one whose every record is an error keeps its
    row with null scores, and its group's sum and the total are null, not a sum over fewer subtasks."""
    errored = [{**r, "error": "image not found"} for r in make_records(ANSWERS[6:])]  # every cognition question
    res = scorer.aggregate(make_records(ANSWERS[:6]) + errored)
    assert res["mme_commonsense_reasoning"]["score,mme_official"] is None
    assert res["mme_commonsense_reasoning"]["sample_len"] == 0
    assert res["mme_cognition"]["score,mme_official"] is None and res["mme"]["score,mme_official"] is None
    assert res["mme_perception"]["score,mme_official"] == pytest.approx(100.0)  # the complete group stands
    assert res["mme_existence"] == scorer.aggregate(make_records(ANSWERS[:6]))["mme_existence"]


def test_release_folder_mistakes_are_named(tmp_path, caplog):
    """A folder that is not a subtask is skipped with a warning (its questions would be missing from the sums);
    a release one level too deep or a folder of parquet files gets a hint."""
    from tasks.media import DataFileNotFoundError
    from tasks.mme import folder_subtasks, release_root

    root = tmp_path / "MME" / "MME_Benchmark"
    for name in ("existence", "Code_Reasoning"):
        (root / name).mkdir(parents=True)
        (root / name / "1.txt").write_text("Is it? Please answer yes or no.\tYes\n")
    with caplog.at_level("WARNING", logger="tasks.mme"):
        assert folder_subtasks(root) == ["existence"]
    assert "['Code_Reasoning']" in caplog.text and "'code_reasoning'" in caplog.text
    with pytest.raises(DataFileNotFoundError, match=r"did you mean task.data='.*MME_Benchmark'\?"):
        release_root(tmp_path / "MME")
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "test-0.parquet").write_bytes(b"")
    with pytest.raises(DataFileNotFoundError, match=r"parquet files: task.data='.*pq/\*.parquet'"):
        release_root(tmp_path / "pq")


def test_image_missing_a_question_never_counts_for_acc_plus(scorer):
    res = scorer.aggregate(make_records([ANSWERS[0], *ANSWERS[2:4]]))  # e1 lost its No question
    assert res["mme_existence"]["acc_plus,mme_official"] == 0.0
    assert res["mme_existence"]["acc,mme_official"] == pytest.approx(2 / 3)


def test_score_stores_every_verdict(scorer):
    sample = Sample("count/0001/2", "count", 0, "count/0001", "q", "no", "x.txt:2")
    fields = scorer.score(sample, Response(raw_output="No, there are two.", prompt="q"))
    assert fields["parsed"] == "no" and fields["correct"] is True and fields["clean"] is False
    assert set(fields["verdicts"]) == set(PARSERS.names())
    assert fields["verdicts"]["vcd_substring"] == "no"


# ----------------------------------------------------------------------------------------------- loaders

COLORS = {"a1": (255, 0, 0), "a2": (0, 255, 0), "c1": (0, 0, 255), "c2": (9, 9, 9)}
QA = {
    ("artwork", "a1"): [("Is this artwork by Monet?", "Yes"), ("Is this artwork by Goya?", "No")],
    ("artwork", "a2"): [("Is this a fresco?", "No"), ("Is this a painting?", "Yes")],
    ("count", "c1"): [("Are there two dogs?", "Yes"), ("Are there three dogs?", "No")],
    ("count", "c2"): [("Is there one cat?", "Yes"), ("Are there two cats?", "No")],
}


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def qa_text(pairs, newline="\n", space=" ") -> str:
    return "".join(f"{q}{space}Please answer yes or no.\t{a}{newline}" for q, a in pairs)


@pytest.fixture
def release(tmp_path) -> Path:
    """MME_Benchmark_release_version/ with artwork in the split layout and count in the flat layout."""
    root = tmp_path / "MME_Benchmark_release_version"
    for (subtask, stem), pairs in QA.items():
        if subtask == "artwork":
            img_dir, qa_dir = root / subtask / "images", root / subtask / "questions_answers_YN"
        else:
            img_dir = qa_dir = root / subtask
        img_dir.mkdir(parents=True, exist_ok=True)
        qa_dir.mkdir(parents=True, exist_ok=True)
        (img_dir / f"{stem}.png").write_bytes(png(COLORS[stem]))
        # c2: CRLF line endings and the release's occasional double space before the instruction.
        (qa_dir / f"{stem}.txt").write_bytes(qa_text(pairs, *(("\r\n", "  ") if stem == "c2" else ())).encode())
    (root / "eval_tool").mkdir()  # not a subtask: ignored
    return root


def write_parquet(path: Path, rows: list[dict]) -> Path:
    schema = pa.schema(
        [
            ("question_id", pa.string()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("category", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def parquet_rows() -> list[dict]:
    rows = []
    for (subtask, stem), pairs in QA.items():
        rel = f"images/{stem}.png" if subtask == "artwork" else f"{stem}.png"
        for q, a in pairs:
            rows.append(
                {
                    "question_id": f"{subtask}/{rel}",
                    "image": {"bytes": png(COLORS[stem]), "path": f"{subtask}/{rel}"},
                    "question": q + SUFFIX,
                    "answer": a,
                    "category": subtask,
                }
            )
    return rows


def key(samples):
    return [(s.sample_id, s.split, s.image_id, s.text, s.target, s.error) for s in samples]


def test_release_folder_both_layouts(release):
    assert subtask_layout(release / "artwork")[0] == "split"
    assert subtask_layout(release / "count")[0] == "flat"
    task = MMETask(data=str(release.parent))  # the parent of MME_Benchmark_release_version/ works too
    samples = task.samples()
    assert [s.sample_id for s in samples] == [  # canonical subtask order: count (perception #2) before artwork (#9)
        "count/c1/1", "count/c1/2", "count/c2/1", "count/c2/2",
        "artwork/a1/1", "artwork/a1/2", "artwork/a2/1", "artwork/a2/2",
    ]  # fmt: skip
    assert all(s.error is None for s in samples)
    assert samples[4].text == "Is this artwork by Monet?" + DEFAULT_PROMPT_SUFFIX
    assert samples[3].text == "Are there two cats?" + DEFAULT_PROMPT_SUFFIX  # CRLF + double space handled
    assert [s.target for s in samples[4:]] == ["yes", "no", "no", "yes"]
    assert samples[5].source == f"{release}/artwork/questions_answers_YN/a1.txt:2"
    assert samples[4].doc["question_id"] == "artwork/images/a1.png"
    assert samples[0].images()[0].getpixel((0, 0)) == COLORS["c1"]
    assert samples[4].images()[0].getpixel((0, 0)) == COLORS["a1"]
    assert samples[4].image_id == samples[5].image_id == "artwork/a1"


def test_parquet_matches_folder(release, tmp_path):
    rows = parquet_rows()
    random.Random(0).shuffle(rows)  # row order does not matter: images are sorted by stem
    path = write_parquet(tmp_path / "mme.parquet", rows)
    folder, parquet = MMETask(data=str(release)).samples(), MMETask(data=str(path)).samples()
    # Within an image the question order follows the rows; compare as sets per image.
    assert sorted(key(folder)) != [] and {k[2:] for k in key(folder)} == {k[2:] for k in key(parquet)}
    assert sorted(s.image_id for s in parquet) == sorted(s.image_id for s in folder)
    assert parquet[0].images()[0].getpixel((0, 0)) == COLORS["c1"]
    assert parquet[0].source.startswith(f"{path}[")


def test_prompt_options(release):
    kept = MMETask(data=str(release), strip_original_suffix=False, prompt_suffix="").samples()
    assert kept[0].text == "Are there two dogs? Please answer yes or no."


def test_limit_counts_images_per_subtask(release):
    samples = MMETask(data=str(release), limit=1).samples()
    assert [s.sample_id for s in samples] == ["count/c1/1", "count/c1/2", "artwork/a1/1", "artwork/a1/2"]


def test_subtask_selection_and_unknown_names(release):
    assert {s.split for s in MMETask(data=str(release), subtasks=["count"]).samples()} == {"count"}
    with pytest.raises(ValueError, match="did you mean 'OCR'"):
        MMETask(data=str(release), subtasks=["ocr"])
    with pytest.raises(ValueError, match="did you mean 'existence'"):
        MMETask(data=str(release), subtasks=["existance"])
    with pytest.raises(ValueError, match=r"not found .* subtasks present: \['count', 'artwork'\]"):
        MMETask(data=str(release), subtasks=["perception"]).samples()  # all ten asked, two present


def test_invariant_violations_become_error_records(release):
    flat = release / "count"
    (flat / "c1.txt").write_text(qa_text([("Q1?", "Yes"), ("Q2?", "No"), ("Q3?", "No")]))  # three questions
    (flat / "c2.txt").write_text(qa_text([("Q1?", "Yes")]) + "no tab here\n")  # malformed line 2
    (flat / "c3.png").write_bytes(png((1, 2, 3)))
    (flat / "c3.txt").write_text(qa_text([("Q1?", "Yes"), ("Q2?", "Yes")]))  # two Yes
    samples = {s.sample_id: s for s in MMETask(data=str(release), subtasks=["count"]).samples()}
    assert len(samples) == 7 and all(s.error for s in samples.values())
    assert samples["count/c1/3"].source == f"{flat}/c1.txt:3" and "has 3 question(s)" in samples["count/c1/3"].error
    assert samples["count/c2/2"].source == f"{flat}/c2.txt:2"
    assert samples["count/c2/2"].error.startswith("malformed line")
    assert f"{flat}/c2.txt:2" in samples["count/c2/1"].error  # the good half names the bad line
    assert "one Yes, one No" in samples["count/c3/1"].error
    assert all(s.images is None for s in samples.values())
    relaxed = MMETask(data=str(release), subtasks=["count"], require_yes_and_no=False).samples()
    assert [s.error is None for s in relaxed if s.image_id == "count/c3"] == [True, True]
    with pytest.raises(SampleError, match=r"c1\.txt:1"):
        MMETask(data=str(release), subtasks=["count"], strict=True).samples()


def test_parquet_invariant_and_bad_rows(tmp_path):
    rows = parquet_rows()
    rows[1]["answer"] = "Maybe"  # artwork/a1, second row
    rows[2]["image"] = {"bytes": None, "path": None}  # artwork/a2 first row: no image at all
    rows = [r for r in rows if not (r["question_id"] == "count/c2.png" and r["answer"] == "No")]  # lone question
    for answer in ("Yes", "No"):  # a valid pair whose subtask cannot be told
        rows.append({**parquet_rows()[0], "question_id": "x.png", "category": None, "answer": answer})
    samples = {s.sample_id: s for s in MMETask(data=str(write_parquet(tmp_path / "m.parquet", rows))).samples()}
    assert "answer must be Yes or No" in samples["artwork/a1/2"].error
    assert samples["artwork/a1/2"].source == f"{tmp_path}/m.parquet[1]"
    assert "pair invariant violated" in samples["artwork/a1/1"].error
    assert "neither bytes nor path" in samples["artwork/a2/1"].error
    assert "has 1 question(s)" in samples["count/c2/1"].error
    assert samples["count/c1/1"].error is None and samples["count/c1/2"].error is None
    assert "no 'category'" in samples["unknown/x/1"].error and "no 'category'" in samples["unknown/x/2"].error


def test_missing_image_raises_from_the_loader(release):
    (release / "count" / "c1.png").unlink()
    sample = MMETask(data=str(release), subtasks=["count"]).samples()[0]
    assert sample.error is None  # the record is fine; the image is the problem, found when it is loaded
    with pytest.raises(SampleError, match="image not found") as info:
        sample.images()
    assert info.value.source.endswith("c1.txt")


def test_bad_data_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor"):
        MMETask(data=str(tmp_path / "nope")).samples()
    with pytest.raises(FileNotFoundError, match="no MME parquet"):
        MMETask(data=str(tmp_path / "*.parquet")).samples()
    with pytest.raises(FileNotFoundError, match="no MME subtask folder"):
        MMETask(data=str(tmp_path)).samples()


# ----------------------------------------------------------------------------------------------- shipped export


def test_shapes_world_folder_and_parquet_agree():
    folder = MMETask(data=str(SHAPES_MME)).samples()
    parquet = MMETask(data=str(SHAPES_MME / "mme.parquet")).samples()
    assert len(folder) > 0 and key(folder) == key(parquet)
    assert [s.doc for s in folder] == [s.doc for s in parquet]
    assert all(s.error is None for s in folder)
    assert {s.split for s in folder} <= {"existence", "count", "position", "color"}
    pairs = {}
    for s in folder:
        pairs.setdefault(s.image_id, []).append(s.target)
    assert all(sorted(t) == ["no", "yes"] for t in pairs.values())
    np.testing.assert_array_equal(np.asarray(folder[3].images()[0]), np.asarray(parquet[3].images()[0]))


def test_registered_and_config_instantiates():
    from harness.config import compose_config, instantiate

    assert TASKS.get("mme") is MMETask
    cfg = compose_config(["task=mme", "limit=3"])
    task = instantiate(cfg.task, drop=("name",), strict=False, limit=cfg.limit)
    assert task.gen_kwargs == {"max_new_tokens": 16, "do_sample": False}
    per_subtask = {}
    for s in task.samples():
        per_subtask[s.split] = per_subtask.get(s.split, 0) + 1
    assert per_subtask and set(per_subtask.values()) == {6}  # 3 images x 2 questions
