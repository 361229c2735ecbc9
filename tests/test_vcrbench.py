"""VCRBench: official answer parsing, metrics by hand, video/clip/frame loaders, the RRD pipeline, shapes export."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from tasks.base import TASKS, Call, Request, Response, SampleError
from tasks.vcrbench import (
    CLIP_KEY,
    PROMPT,
    RRD_CLIP_PROMPT,
    RRD_JOINT_PROMPT,
    FrameSampler,
    VCRBenchTask,
    judge,
    parse_order,
)

REPO = Path(__file__).resolve().parent.parent
SHAPES_VCR = REPO / "assets" / "shapes-world" / "vcr"
N_FRAMES, VIDEO_FPS = 20, 10.0


# ----------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("**Correct order: 2, 1, 3**", 3, [2, 1, 3]),
        ("Sure! I watched the video.\nCorrect order: 3, 1, 2\nI hope this helps.", 3, [3, 1, 2]),
        ("Clip 1 shows a star being added.\nClip 2 shows the base.\n\nCorrect order: 2, 1, 3", 3, [2, 1, 3]),
        ("Correct order: Clip 2, Clip 1, Clip 3", 3, [2, 1, 3]),
        ("Clip 2, Clip 1, Clip 3", 3, [2, 1, 3]),
        ("The correct order is: 4,2,1,3.", 4, [4, 2, 1, 3]),
        ("First guess: 1, 2, 3\nCorrect order: 3, 2, 1", 3, [1, 2, 3]),  # first valid candidate wins
        # A reasoning sentence whose comma pieces happen to start with a permutation is taken (official quirk).
        ("Clip 3 is first, then clip 1, and finally clip 2. Correct order: 1, 2, 3", 3, [3, 1, 2]),
        ("Order: 1, 2. Correct order: 2, 3, 1", 3, [2, 3, 1]),  # sentences end at '. '
        ("*Correct order:* 1, 3, 2", 3, [1, 3, 2]),
        ("Correct order: 1, 2", 3, None),  # too short
        ("Correct order: 1, 2, 3, 4", 3, None),  # too long
        ("Correct order: 1, 1, 2", 3, None),  # duplicate
        ("Correct order: 1, 2, 4", 3, None),  # out of range
        ("Correct order: 1 2 3", 3, None),  # no commas: one piece, one integer
        ("I cannot tell.", 3, None),
        ("", 3, None),
        (None, 3, None),
    ],
)
def test_parse_order(text, n, expected):
    assert parse_order(text, n) == expected


def test_judge_invalid_scores_zero_everywhere():
    assert judge("no idea", [1, 2, 3]) == {"parsed": None, "valid": False, "correct": False, "step_correct": 0}
    assert judge("Correct order: 1, 3, 2", [1, 2, 3]) == {
        "parsed": [1, 3, 2],
        "valid": True,
        "correct": False,
        "step_correct": 1,
    }
    assert judge("Correct order: 2, 1", [2, 1])["correct"]


# ----------------------------------------------------------------------------------------------- metrics

# (goal, target, output): acc by hand below.
HAND = [
    ("A", "1, 2, 3", "Correct order: 1, 2, 3"),  # right, 3/3
    ("A", "2, 1, 3", "Correct order: 1, 2, 3"),  # wrong, 1/3
    ("A", "3, 1, 2, 4", "no idea"),  # invalid, 0/4
    ("B", "1, 2, 3, 4", "Correct order: 1, 2, 4, 3"),  # wrong, 2/4
    ("B", "2, 3, 1", "**Correct order: 2, 3, 1**"),  # right, 3/3
    ("C", "4, 3, 2, 1", "Step 4 first.\nCorrect order: 4, 3, 2, 1"),  # right, 4/4
]


def hand_records() -> list[dict]:
    return [
        {"sample_id": str(i), "index": i, "split": "vcrbench", "image_id": str(i), "target": target,
         "raw_output": out, "doc": {"goal": goal}, "error": None}
        for i, (goal, target, out) in enumerate(HAND)
    ]  # fmt: skip


def test_metrics_by_hand():
    task = VCRBenchTask(data="unused.json", n_boot=50)
    records = hand_records()
    error = {**records[0], "sample_id": "e", "raw_output": None, "error": "video not found: x"}
    res = task.aggregate([*records, error])
    top = res["vcrbench"]
    assert top["sample_len"] == 6
    assert top["acc,none"] == pytest.approx(3 / 6)
    assert top["step_acc,none"] == pytest.approx(13 / 21)
    assert top["invalid_rate,none"] == pytest.approx(1 / 6)
    assert top["weighted_acc,none"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert top["acc_stderr,none"] > 0
    assert res["vcrbench_len3"]["sample_len"] == 3
    assert res["vcrbench_len3"]["acc,none"] == pytest.approx(2 / 3)
    assert res["vcrbench_len3"]["step_acc,none"] == pytest.approx(7 / 9)
    assert res["vcrbench_len3"]["invalid_rate,none"] == 0
    assert res["vcrbench_len4"]["acc,none"] == pytest.approx(1 / 3)
    assert res["vcrbench_len4"]["step_acc,none"] == pytest.approx(6 / 12)
    assert res["vcrbench_len4"]["invalid_rate,none"] == pytest.approx(1 / 3)
    assert res["vcrbench_goal/A"]["acc,none"] == pytest.approx(1 / 3)
    assert res["vcrbench_goal/A"]["step_acc,none"] == pytest.approx(4 / 10)
    assert res["vcrbench_goal/B"]["acc,none"] == pytest.approx(1 / 2)
    assert res["vcrbench_goal/B"]["step_acc,none"] == pytest.approx(5 / 7)
    assert res["vcrbench_goal/C"]["sample_len"] == 1
    assert res["vcrbench_goal/C"]["acc,none"] == 1
    assert set(res) == {"vcrbench", "vcrbench_len3", "vcrbench_len4", *(f"vcrbench_goal/{g}" for g in "ABC")}
    out = task.outcomes(records)
    assert out.binary.tolist() == [1, 0, 0, 0, 1, 1]
    assert out.binary_name == "correct,none"


def test_outcomes_reparse_raw_output_not_stored_fields():
    task = VCRBenchTask(data="unused.json", n_boot=0)
    records = hand_records()
    for r in records:
        r["correct"] = True  # stale stored verdicts must not matter
    assert task.aggregate(records)["vcrbench"]["acc,none"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- loaders


def gray(i: int) -> int:
    return 10 + 12 * i


def frame_number(im: Image.Image) -> int:
    return round((np.asarray(im.convert("L"), dtype=float)[8:, :].mean() - 10) / 12)


def write_video(path: Path, n: int = N_FRAMES, fps: float = VIDEO_FPS) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (64, 64))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((64, 64, 3), gray(i), dtype=np.uint8))
    writer.release()
    return path


def write_png(path: Path, color=(200, 50, 50)) -> str:
    Image.new("RGB", (64, 64), color).save(path)
    return path.name


@pytest.fixture
def vcr_dir(tmp_path: Path) -> Path:
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "v1.mp4")
    write_video(tmp_path / "clip2.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all")
    names = [write_png(tmp_path / f"f{k}.png", (40 * k, 200, 50)) for k in range(1, 5)]
    records = [
        {"qid": 1, "goal": "Make tea", "video_file": "v1.mp4", "ground_truth": [2, 0, 3, 1]},
        {"qid": "2", "goal": "Make tea", "video_file": "missing.mp4", "ground_truth": [1, 0, 2]},
        {"qid": "3", "goal": "Fix a bike", "clip_files": [names[0], "clip2.mp4", names[1]], "ground_truth": [0, 2, 1]},
        {"qid": "4", "goal": "Fix a bike", "frames": [names[0], names[1:3], names[3]], "ground_truth": [1, 2, 0]},
        {"qid": "5", "goal": "Bad", "video_file": "v1.mp4", "ground_truth": [0, 2, 2]},
        {"qid": "6", "video_file": "v1.mp4", "ground_truth": [0, 1]},
        {"qid": "7", "goal": "Both", "video_file": "v1.mp4", "frames": [names[0]], "ground_truth": [0]},
        {"qid": "8", "goal": "Short", "frames": [names[0]], "ground_truth": [1, 0]},
        ["not", "an", "object"],
        {"qid": 1, "goal": "Duplicate", "video_file": "v1.mp4", "ground_truth": [0, 1]},
        {"qid": "11", "goal": "Broken", "video_file": "../broken.mp4", "ground_truth": [0, 1]},
    ]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def make_task(vcr_dir: Path, **kwargs) -> VCRBenchTask:
    return VCRBenchTask(data=str(vcr_dir / "data.json"), **kwargs)


def test_samples_and_prompt(vcr_dir):
    samples = make_task(vcr_dir).samples()
    assert [s.sample_id for s in samples[:4]] == ["1", "2", "3", "4"]
    s = samples[0]
    assert s.target == "3, 1, 4, 2" and s.image_id == "1" and s.split == "vcrbench"
    assert s.text == PROMPT.format(goal="Make tea").strip()
    assert s.text.count("Make tea") == 2 and s.text.endswith(
        "Correct order: <mention the Clip numbers separated by a comma>"
    )
    assert s.source == f"{vcr_dir / 'data.json'}[0]"
    assert pickle.loads(pickle.dumps(s.images)) == s.images


def test_malformed_records_are_error_samples(vcr_dir):
    samples = make_task(vcr_dir).samples()
    errors = {s.source.rsplit("[", 1)[1].rstrip("]"): s.error for s in samples if s.error}
    assert set(errors) == {"4", "5", "6", "7", "8", "9"}
    assert "permutation" in errors["4"]
    assert "goal" in errors["5"]
    assert "exactly one" in errors["6"]
    assert "'frames' must be a list of 2" in errors["7"]
    assert "not a JSON object" in errors["8"]
    assert "duplicate qid '1'" in errors["9"]
    assert all(s.images is None for s in samples if s.error)
    with pytest.raises(SampleError, match=r"data.json\[4\]"):
        make_task(vcr_dir, strict=True).samples()
    assert len(make_task(vcr_dir, limit=2).samples()) == 2


@pytest.mark.parametrize(
    ("kwargs", "frames"),
    [
        ({"num_frames": 5}, [0, 4, 8, 12, 16]),
        ({"num_frames": 40}, list(range(N_FRAMES))),  # never more frames than the video has
        ({"fps": 2.0, "num_frames": None}, [0, 5, 10, 15]),
        ({"fps": 4.0, "num_frames": None}, [0, 2, 5, 7, 10, 12, 15, 17]),  # every 2.5 frames
        ({"fps": 2.0, "num_frames": 3}, [0, 5, 10]),  # num_frames caps fps sampling
        ({"num_frames": 8, "max_frames": 3}, [0, 5, 12]),  # of 0, 2, 5, 7, 10, 12, 15, 17
    ],
)
def test_video_frames_by_count_and_fps(vcr_dir, kwargs, frames):
    images = make_task(vcr_dir, **kwargs).samples()[0].images()
    assert [frame_number(im) for im in images] == frames
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in images)
    assert [im.info[CLIP_KEY] for im in images] == [f * 4 // N_FRAMES + 1 for f in frames]  # 4 equal clips


def test_sequential_rrd_samples_each_clip(vcr_dir):
    images = make_task(vcr_dir, num_frames=8, mode="rrd", rrd_recognition="sequential").samples()[0].images()
    assert [frame_number(im) for im in images] == [0, 2, 5, 7, 10, 12, 15, 17]  # 2 of each 5-frame clip
    assert [im.info[CLIP_KEY] for im in images] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_unreadable_videos_raise_sample_error_lazily(vcr_dir):
    samples = make_task(vcr_dir).samples()
    with pytest.raises(SampleError, match="video not found") as exc:
        samples[1].images()
    assert exc.value.source.endswith("data.json[1]")
    with pytest.raises(SampleError, match=r"broken\.mp4"):
        samples[-1].images()
    with pytest.raises(ValueError, match="no frame rate"):
        FrameSampler(fps=1.0).indices(10, 0.0)


def test_clip_files_mix_images_and_videos(vcr_dir):
    images = make_task(vcr_dir, num_frames=6).samples()[2].images()
    assert [im.info[CLIP_KEY] for im in images] == [1, 2, 2, 3]  # per clip 6 // 3 = 2 frames of the video
    assert [frame_number(im) for im in images[1:3]] == [0, 10]
    for im in (images[0], images[1], images[3]):  # first frame of each clip labelled "Clip k" (black box)
        assert np.asarray(im)[1, 1].tolist() == [0, 0, 0]
    assert np.asarray(images[2])[1, 1].tolist() != [0, 0, 0]


def test_frames_lists_per_clip(vcr_dir):
    images = make_task(vcr_dir, label_clips=False).samples()[3].images()
    assert [im.info[CLIP_KEY] for im in images] == [1, 2, 2, 3]
    assert [np.asarray(im)[1, 1].tolist() for im in images] == [[40, 200, 50], [80, 200, 50], [120, 200, 50],
                                                                 [160, 200, 50]]  # fmt: skip


def test_sampler_validation():
    with pytest.raises(ValueError):
        FrameSampler(num_frames=None, fps=None)
    with pytest.raises(ValueError):
        FrameSampler(num_frames=0)
    assert FrameSampler(num_frames=8, max_frames=5).per_clip(3) == FrameSampler(num_frames=2, max_frames=1)
    with pytest.raises(ValueError):
        VCRBenchTask(data="x.json", mode="cot")


# ----------------------------------------------------------------------------------------------- pipelines


class ScriptedModel:
    """Stands in for the model: canned outputs keyed on the prompt, every generate call recorded."""

    def __init__(self) -> None:
        self.batches: list[list[Request]] = []

    def generate(self, requests, **gen_kwargs):
        self.batches.append(list(requests))
        return [Call(f"<{len(r.images)} img> {r.text}", self._answer(r.text), len(r.images), 0.25) for r in requests]

    @staticmethod
    def _answer(text: str) -> str:
        if text == RRD_JOINT_PROMPT:
            return "Clip 1: a cup is filled.\nClip 2: water boils.\nClip 3: tea is served.\nClip 4: leaves steep."
        if text.startswith("The video contains"):
            return f"  step shown in clip {text.split('Watch Clip ')[1].split()[0]}\n"
        if text.startswith("The following steps") or "A brief description" in text:
            return "Clip 2 boils water, clip 1 fills the cup.\nCorrect order: 2, 1, 4, 3"
        return "Correct order: 3, 1, 4, 2"

    def answer_logprobs(self, requests, answers):
        raise AssertionError("not used by VCRBench")


def good_batch(task: VCRBenchTask) -> list:
    samples = [task.samples()[0], task.samples()[3]]  # 4 clips, 3 clips
    return [(s, s.images()) for s in samples]


def test_direct_is_one_call_per_sample(vcr_dir):
    task = make_task(vcr_dir, num_frames=4, gen_kwargs={"max_new_tokens": 7})
    model = ScriptedModel()
    batch = good_batch(task)
    responses = task.respond(batch, model)
    assert len(model.batches) == 1
    assert [r.text for r in model.batches[0]] == [s.text for s, _ in batch]
    assert [len(r.images) for r in model.batches[0]] == [4, 4]
    assert responses[0].raw_output == "Correct order: 3, 1, 4, 2" and responses[0].fields == {"seconds": 0.25}
    assert task.score(batch[0][0], responses[0]) == {
        "parsed": [3, 1, 4, 2], "valid": True, "correct": True, "step_correct": 4}  # fmt: skip


def test_rrd_joint_pipeline(vcr_dir):
    task = make_task(vcr_dir, num_frames=4, mode="rrd")
    model = ScriptedModel()
    batch = good_batch(task)
    responses = task.respond(batch, model)
    assert [len(b) for b in model.batches] == [2, 2]  # recognition of the batch, then reasoning
    assert [r.text for r in model.batches[0]] == [RRD_JOINT_PROMPT] * 2
    assert [len(r.images) for r in model.batches[0]] == [4, 4]
    reasoning = model.batches[1][0]
    assert reasoning.images == []  # text-only
    assert "complete the task: Make tea. " in reasoning.text
    assert "Clip 1: a cup is filled.\nClip 2: water boils." in reasoning.text
    r = responses[0]
    assert r.raw_output == "Clip 2 boils water, clip 1 fills the cup.\nCorrect order: 2, 1, 4, 3"
    assert r.prompt == f"<0 img> {reasoning.text}"
    assert [c["stage"] for c in r.fields["calls"]] == ["recognition", "reasoning"]
    assert [c["n_images"] for c in r.fields["calls"]] == [4, 0]
    assert r.fields["calls"][0]["output"].startswith("Clip 1: a cup")
    assert r.fields["seconds"] == 0.5
    # "Clip 2 boils water, clip 1 fills the cup." is not a permutation of 1..4; the final line is.
    assert task.score(batch[0][0], r)["parsed"] == [2, 1, 4, 3]
    assert task.score(batch[1][0], r)["valid"] is False  # 3 clips: no permutation of 1..3 in the text
    json.dumps(r.fields)


def test_rrd_sequential_pipeline(vcr_dir):
    task = make_task(vcr_dir, num_frames=8, mode="rrd", rrd_recognition="sequential")
    model = ScriptedModel()
    batch = good_batch(task)
    responses = task.respond(batch, model)
    assert [len(b) for b in model.batches] == [7, 2]  # 4 + 3 clip calls, then 2 reasoning calls
    first = model.batches[0]
    assert [r.text for r in first] == [RRD_CLIP_PROMPT.format(step=k) for k in (1, 2, 3, 4, 1, 2, 3)]
    for req, k in zip(first[:4], (1, 2, 3, 4), strict=True):
        assert [im.info[CLIP_KEY] for im in req.images] == [k, k]
    assert [len(r.images) for r in first[4:]] == [1, 2, 1]  # the frames sample's clips as given
    text = model.batches[1][0].text
    assert "Clip 1: step shown in clip 1\nClip 2: step shown in clip 2\n" in text
    assert "Clip 4: step shown in clip 4\n\n" in text
    assert all(r.images == [] for r in model.batches[1])
    stages = [c["stage"] for c in responses[0].fields["calls"]]
    assert stages == ["recognition:clip1", "recognition:clip2", "recognition:clip3", "recognition:clip4", "reasoning"]
    assert responses[0].fields["seconds"] == pytest.approx(1.25)
    assert len(responses[1].fields["calls"]) == 4


def test_rrd_reasoning_with_video(vcr_dir):
    task = make_task(vcr_dir, num_frames=4, mode="rrd", rrd_reason_with_video=True)
    model = ScriptedModel()
    task.respond(good_batch(task)[:1], model)
    final = model.batches[1][0]
    assert len(final.images) == 4 and "A brief description of each clip:" in final.text


def test_engine_record_roundtrip(vcr_dir):
    """What the engine stores (fields + score) aggregates to the same verdict."""
    task = make_task(vcr_dir, num_frames=4, mode="rrd", n_boot=0)
    (sample, images), _ = good_batch(task)
    resp: Response = task.respond([(sample, images)], ScriptedModel())[0]
    record = {"sample_id": sample.sample_id, "image_id": sample.image_id, "target": sample.target,
              "doc": sample.doc, "raw_output": resp.raw_output, **resp.fields, **task.score(sample, resp)}  # fmt: skip
    step = task.score(sample, resp)["step_correct"]
    assert task.aggregate([record])["vcrbench"]["step_acc,none"] == pytest.approx(step / 4)


# ----------------------------------------------------------------------------------------------- shapes world


def test_shapes_world_export_matches_procedures():
    cfg = OmegaConf.load(REPO / "conf" / "task" / "vcrbench.yaml")
    from harness.config import instantiate

    task = instantiate(cfg, drop=("name",))
    assert TASKS.get("vcrbench") is VCRBenchTask and isinstance(task, VCRBenchTask)
    procedures = json.loads((SHAPES_VCR / "procedures.json").read_text())
    samples = task.samples()
    assert len(samples) == len(procedures) == 30 and not any(s.error for s in samples)
    for s in samples:
        clip_steps = procedures[s.sample_id]["clip_steps"]  # clip k shows step clip_steps[k - 1]
        answer = [clip_steps.index(step) + 1 for step in range(len(clip_steps))]
        assert s.target == ", ".join(map(str, answer))
        assert s.doc["goal"].startswith("Build the arrangement")
    images = samples[0].images()
    n = len(procedures["1"]["clip_steps"])
    assert [im.info[CLIP_KEY] for im in images] == [k for k in range(1, n + 1) for _ in range(2)]  # 1 fps, 2-s clips


def test_clip_groups_untagged_frames_split_equally():
    from tasks.vcrbench import clip_groups

    images = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(7)]
    groups = clip_groups(images, 3)
    assert [[im.getpixel((0, 0))[0] for im in g] for g in groups.values()] == [[0, 1], [2, 3], [4, 5, 6]]
