"""VCRBench, Video Causal Reasoning (Sarkar & Etemad, 2025, arXiv 2505.08455), and its RRD pipeline.

Each sample is a procedural activity (``goal``) whose N key-step clips (3–7 in the release) were shuffled and
concatenated into one video, "Clip k" shown at the start of clip k. The model must answer
``Correct order: <clip numbers>``: the clip numbers in true temporal order, ``[g + 1 for g in ground_truth]``.

Data (HF ``pritamqu/VCRBench``; also :func:`shapes.export.export_vcr`): ``data.json``, a JSON array of
``{qid, goal, video_file, ground_truth}`` with ``video_file`` relative to ``video_root`` (default
``<data dir>/videos``). A record may give, instead of ``video_file``, ``clip_files`` (one video or image file per
clip, in clip order) or ``frames`` (per clip one image file or a list of them), relative to the data directory;
their first frame of each clip then gets a "Clip k" label (``label_clips``), as the video carries.

Frames (OpenCV): ``num_frames`` frames at indices ``floor(i * T / num_frames)`` (Video-LLaVA's VCRBench loader;
8 frames there), or, with ``fps``, one frame every ``1 / fps`` seconds (the official Qwen2.5-VL runs use 1 fps)
capped by ``num_frames``; ``max_frames`` caps every case. Per-clip inputs share the budget: each clip gets
``max(1, budget // N)``. The frames are a multi-image prompt (image placeholders before the text).

Scoring follows the official ``process.py`` / ``metrics.py``: ``*`` removed, the answer split into sentences and
lines, each split on commas taking the first integer of each piece; the first candidate that is a permutation of
1..N is the prediction, else it is invalid (all zeros, wrong everywhere). Metrics (fractions, not ×100): ``acc``
(exact order), ``step_acc`` (Σ positions right / Σ lengths), ``invalid_rate``, ``weighted_acc`` (mean over goals of
the per-goal acc), per length (``vcrbench_len<k>``) and per goal (``vcrbench_goal/<goal>``).

RRD (Recognition–Reasoning Decomposition, ``mode="rrd"``; official ``models/qwen2_5_vl_rrd.py``): a recognition
stage describes the clips, then a text-only reasoning call orders the descriptions. ``rrd_recognition="joint"``:
one call with all frames asking for ``Clip k: <one sentence>`` per clip. ``"sequential"``: one call per clip with
that clip's frames only (whole videos are cut into N equal parts, as VCRBench concatenates its clips; per-clip
inputs are used as given). Deviations from the official sequential variant, which first asks the model how many
clips there are and then shows the whole video for each clip: the known N is used and each call sees its own clip;
the descriptions are listed as ``Clip k: ...`` (the official code writes ``Clip Clip k: ...``).
``rrd_reason_with_video`` gives the reasoning call the frames too (the official ``reason_with_videos``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
from PIL import Image

from core.stats import Outcomes, block_columns, safe_divide
from tasks.base import TASKS, Call, ModelCalls, Request, Response, Sample, SampleError, Task
from tasks.media import data_file, decode_image

# Official prompts, character for character (pritamqu/VCRBench @ 5d616a3, unchanged since 589efb1: data/dataset.py
# and models/qwen2_5_vl_rrd.py). The direct prompt is stripped as the official inference scripts do; the RRD prompts
# keep the indentation of the official triple-quoted strings.
PROMPT = (
    "The given video consists of multiple short clips, each showing a different segment needed to complete the "
    "task: {goal}. \n"
    "These clips are randomly shuffled, and your job is to arrange them in the correct order to complete the task: "
    "{goal}. \n"
    "The clip numbers are mentioned at the beginning of each clip as Clip 1, Clip 2, and so on.\n"
    "In order to solve this task, first, you should identify the activity that is performed in each clip, and then "
    "use your reasoning and common sense to arrange these clips to successfully complete the task.\n\n"
    "The final output should be in this format:\n\n"
    "Correct order: <mention the Clip numbers separated by a comma>\n"
)
_I = "\n        "  # line break + the official strings' indentation
RRD_JOINT_PROMPT = (
    f"The video contains multiple short clips.{_I}"
    f"The clip numbers are mentioned at the beginning of each clip as Clip 1, Clip 2, and so on.{_I}"
    f"Watch each clip carefully, paying attention to its fine-grained actions and events. {_I}"
    f"Note the unique events in each clip compared to the rest of the video.{_I}"
    "Respond with a one sentence description indicating the key and fine-grained actions or events for each "
    f"clip.{_I}"
    f"Please respond in this format:{_I}"
    f"Clip 1: <Write one sentence description>{_I}"
    f"Clip 2: <Write one sentence description>{_I}"
    f"...\n{_I}"
    f"Your response must not contain anything else.{_I}"
)
RRD_CLIP_PROMPT = (
    f"The video contains multiple short clips.{_I}"
    f"The clip numbers are mentioned at the beginning of each clip as Clip 1, Clip 2, and so on.{_I}"
    f"Watch Clip {{step}} carefully, paying attention to its fine-grained actions and events. {_I}"
    f"Note the unique events in Clip {{step}} compared to the rest of the video.{_I}"
    f"Respond with a one sentence description indicating the key and fine-grained actions or events.{_I}"
    f"Your response must not contain anything else.{_I}"
    "DO NOT MENTION ANY CLIP NUMBERS IN YOUR RESPONSE."
)
RRD_REASONING_PROMPT = (
    f"The following steps are needed to complete the task: {{goal}}. {_I}"
    "However, these steps are randomly shuffled, and your job is to arrange them in the correct order to "
    f"complete the task: {{goal}}. {_I}"
    f"Use your reasoning and common sense to arrange these steps to successfully complete the task.\n{_I}"
    f"{{clip_details}}\n{_I}"
    f"The final output should be in this format:\n{_I}"
    f"Correct order: <mention the step numbers separated by a comma>{_I}"
)
RRD_REASONING_VIDEO_PROMPT = (
    "The given video consists of multiple short clips, each showing a different segment needed to complete the "
    f"task: {{goal}}. {_I}"
    "These clips are randomly shuffled, and your job is to arrange them in the correct order to complete the "
    f"task: {{goal}}. {_I}"
    f"The clip numbers are mentioned at the beginning of each clip as Clip 1, Clip 2, and so on. {_I}"
    "Additionally, to assist you with the task, a brief description of the activities performed in each clip is "
    f"provided below.{_I}"
    f"Use your reasoning and common sense to arrange these clips to successfully complete the task.\n{_I}"
    f"A brief description of each clip:{_I}"
    f"{{clip_details}}\n{_I}"
    f"The final output should be in this format:\n{_I}"
    f"Correct order: <mention the clip numbers separated by a comma>{_I}"
)
#: Official runs use ``model_max_length`` 512 new tokens; greedy here (the official Qwen runs are greedy too).
DEFAULT_GEN_KWARGS: dict[str, Any] = {"max_new_tokens": 512, "do_sample": False}
MODES = ("direct", "rrd")
RECOGNITION = ("joint", "sequential")
SPLIT = "vcrbench"
#: ``Image.info`` key holding a frame's 1-based clip number (how :meth:`VCRBenchTask.respond` groups frames).
CLIP_KEY = "vcr_clip"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: One call of an RRD transcript: (stage, clip number or None, call).
_Step = tuple[str, int | None, Call]
_SENTENCES = re.compile(r"(?<=[.!?])\s+|\n+")
_INTEGER = re.compile(r"\d+")


# ----------------------------------------------------------------------------------------------- parsing


def candidate_orders(text: str) -> list[list[int]]:
    """Integer sequences of every sentence or line of ``text`` (official ``process.py`` rule).

    ``*`` is removed; the text is split after ``.``/``!``/``?`` followed by whitespace and at line breaks; each
    piece between commas contributes its first run of digits (pieces without one are skipped).
    """
    out = []
    for sentence in _SENTENCES.split(text.replace("*", "")):
        found = (_INTEGER.search(piece) for piece in sentence.split(","))
        out.append([int(m.group()) for m in found if m])
    return out


def parse_order(text: str | None, n: int) -> list[int] | None:
    """The first candidate of :func:`candidate_orders` that is a permutation of ``1..n``; ``None`` if none is."""
    if not isinstance(text, str):
        return None
    wanted = set(range(1, n + 1))
    return next((c for c in candidate_orders(text) if len(c) == n and set(c) == wanted), None)


def order_text(order: Sequence[int]) -> str:
    """``[3, 1, 2]`` → ``"3, 1, 2"`` (a sample's ``target``)."""
    return ", ".join(str(int(x)) for x in order)


def target_order(target: str) -> list[int]:
    """Inverse of :func:`order_text`."""
    return [int(x) for x in _INTEGER.findall(target)]


def judge(raw_output: str | None, answer: Sequence[int]) -> dict[str, Any]:
    """``parsed`` (or None), ``valid``, ``correct`` (exact order) and ``step_correct`` (positions right)."""
    parsed = parse_order(raw_output, len(answer))
    pred = parsed if parsed is not None else [0] * len(answer)
    step = sum(int(p == a) for p, a in zip(pred, answer, strict=True))
    return {"parsed": parsed, "valid": parsed is not None, "correct": step == len(answer), "step_correct": step}


# ----------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class FrameSampler:
    """Which frames of a video to show.

    Attributes:
        num_frames: Frames per video (``fps`` None) or their cap (``fps`` set); None: no count/cap.
        fps: Sampling rate in frames per second of video time; None: ``num_frames`` uniform frames.
        max_frames: Hard cap on the frames of a video.
    """

    num_frames: int | None = 8
    fps: float | None = None
    max_frames: int | None = None

    def __post_init__(self) -> None:
        if self.fps is None and self.num_frames is None:
            raise ValueError("set num_frames or fps")
        for name in ("num_frames", "max_frames", "fps"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")

    def indices(self, n_total: int, video_fps: float = 0.0) -> list[int]:
        """Sorted distinct frame indices in ``[0, n_total)``.

        Raises:
            ValueError: In fps mode when the video has no frame rate.
        """
        if self.fps is None:
            idx = _uniform(list(range(n_total)), int(self.num_frames))
        else:
            if video_fps <= 0:
                raise ValueError("the video reports no frame rate; use num_frames instead of fps")
            step = video_fps / self.fps
            idx = sorted({int(j * step) for j in range(math.ceil(n_total / step))} & set(range(n_total)))
        for cap in (self.num_frames if self.fps is not None else None, self.max_frames):
            idx = _uniform(idx, cap) if cap is not None else idx
        return idx

    def per_clip(self, n_clips: int) -> FrameSampler:
        """The sampler of one of ``n_clips`` clips sharing this budget: ``max(1, budget // n_clips)`` each."""

        def share(x: int | None) -> int | None:
            return None if x is None else max(1, x // n_clips)

        return replace(self, num_frames=share(self.num_frames), max_frames=share(self.max_frames))


def _uniform(items: list[int], k: int) -> list[int]:
    """``items[floor(i * n / k)]`` for ``i < k`` (all of them when ``k >= n``)."""
    n = len(items)
    return list(items) if k >= n else [items[i * n // k] for i in range(k)]


def _open(path: str, source: str) -> cv2.VideoCapture:
    if not Path(path).is_file():
        raise SampleError(f"video not found: {path}", source)
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise SampleError(f"cannot open video {path}", source)
    return cap


def _read(path: str, wanted: set[int], source: str) -> tuple[dict[int, np.ndarray], int]:
    """Decode the ``wanted`` frames in one sequential pass; returns them (RGB) and the frames actually seen."""
    cap, frames, n = _open(path, source), {}, 0
    try:
        last = max(wanted, default=-1)
        while n <= last and cap.grab():
            if n in wanted:
                ok, bgr = cap.retrieve()
                if not ok:
                    raise SampleError(f"cannot decode frame {n} of {path}", source)
                frames[n] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            n += 1
    finally:
        cap.release()
    return frames, n


def _probe(path: str, source: str) -> tuple[int, float]:
    """Frame count (counted by decoding when the container does not say) and frame rate of a video."""
    cap = _open(path, source)
    try:
        n, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS))
        if n <= 0:
            n = 0
            while cap.grab():
                n += 1
    finally:
        cap.release()
    return n, fps


def _select(plan: dict[int, int], n_total: int, fps: float, sampler: FrameSampler, n_clips: int, per_clip: bool):
    """Fill ``plan`` (frame index → clip number) for a video of ``n_total`` frames."""
    if not per_clip:
        for i in sampler.indices(n_total, fps):
            plan[i] = i * n_clips // n_total + 1
        return
    if n_total < n_clips:
        raise ValueError(f"{n_total} frames cannot hold {n_clips} clips")
    clip_sampler = sampler.per_clip(n_clips)
    for k in range(n_clips):
        start, end = k * n_total // n_clips, (k + 1) * n_total // n_clips
        for i in clip_sampler.indices(end - start, fps):
            plan[start + i] = k + 1


def video_frames(
    path: str, source: str, sampler: FrameSampler, n_clips: int = 1, per_clip: bool = False
) -> list[Image.Image]:
    """Sampled RGB frames of a video, each tagged with its clip (``info[CLIP_KEY]``, equal division into clips).

    Args:
        path: Video file.
        source: Record location for error messages.
        sampler: Frame selection (over the whole video, or over each clip when ``per_clip``).
        n_clips: Number of equal-length clips the video is made of.
        per_clip: Sample each clip with :meth:`FrameSampler.per_clip` instead of the whole video.

    Raises:
        SampleError: Missing, unreadable or empty video.
    """
    n_total, fps = _probe(path, source)
    for _ in range(2):  # a second pass when the container over-reports its frame count
        plan: dict[int, int] = {}
        try:
            _select(plan, n_total, fps, sampler, n_clips, per_clip)
        except ValueError as exc:
            raise SampleError(f"{path}: {exc}", source) from None
        frames, seen = _read(path, set(plan), source)
        if len(frames) == len(plan):
            break
        n_total = seen
    if not frames or len(frames) != len(plan):
        raise SampleError(f"no decodable frames in {path}", source)
    return [_tagged(Image.fromarray(frames[i]), plan[i]) for i in sorted(plan)]


def _tagged(image: Image.Image, clip: int) -> Image.Image:
    image.info[CLIP_KEY] = clip
    return image


def label_clip(image: Image.Image, clip: int) -> Image.Image:
    """Copy of ``image`` with ``"Clip k"`` in white on a black box at the top left (as VCRBench overlays)."""
    arr = np.asarray(image.convert("RGB")).copy()
    scale = max(0.4, arr.shape[0] / 256)
    thick = max(1, round(scale))
    (tw, th), base = cv2.getTextSize(f"Clip {clip}", cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    cv2.rectangle(arr, (0, 0), (tw + 6, th + base + 6), (0, 0, 0), -1)
    cv2.putText(arr, f"Clip {clip}", (3, th + 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick)
    return Image.fromarray(arr)


@dataclass(frozen=True)
class _VideoInput:
    """Lazy frames of one whole-video sample (picklable)."""

    path: str
    source: str
    sampler: FrameSampler
    n_clips: int
    per_clip: bool

    def __call__(self) -> list[Image.Image]:
        return video_frames(self.path, self.source, self.sampler, self.n_clips, self.per_clip)


@dataclass(frozen=True)
class _ClipInput:
    """Lazy frames of a sample given per clip: per clip one video file or one or more image files."""

    clips: tuple[tuple[str, ...], ...]
    source: str
    sampler: FrameSampler
    label: bool

    def __call__(self) -> list[Image.Image]:
        out: list[Image.Image] = []
        for k, files in enumerate(self.clips, start=1):
            frames = self._clip(files)
            if self.label:
                frames[0] = label_clip(frames[0], k)
            out += [_tagged(im, k) for im in frames]
        return out

    def _clip(self, files: tuple[str, ...]) -> list[Image.Image]:
        if len(files) == 1 and Path(files[0]).suffix.lower() not in IMAGE_SUFFIXES:
            return video_frames(files[0], self.source, self.sampler.per_clip(len(self.clips)))
        return [decode_image(f, self.source, f) for f in files]


# ----------------------------------------------------------------------------------------------- records


class _Malformed(Exception):
    """A record-level problem; becomes an error sample (or a :class:`SampleError` in strict mode)."""


@dataclass
class _Item:
    """One validated record of ``data.json`` (``error`` set when malformed)."""

    source: str
    doc: dict[str, Any]
    qid: str | None = None
    goal: str = ""
    answer: list[int] = field(default_factory=list)
    inputs: tuple[str, Any] | None = None  # ("video", path) or ("clips", per-clip file tuples)
    error: str | None = None


def _qid(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or str(value).strip() == "":
        raise _Malformed(f"field 'qid' must be an int or a non-empty string, got {value!r}")
    return str(value).strip()


def _goal(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Malformed(f"field 'goal' must be a non-empty string, got {value!r}")
    return value


def _ground_truth(value: Any) -> list[int]:
    ok = isinstance(value, list) and value and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    if not ok or sorted(value) != list(range(len(value))):
        raise _Malformed(f"field 'ground_truth' must be a permutation of 0..N-1, got {value!r}")
    return list(value)


def _file_list(record: dict[str, Any], name: str, n: int, root: Path) -> tuple[tuple[str, ...], ...]:
    value = record[name]
    if not isinstance(value, list) or len(value) != n:
        raise _Malformed(f"field {name!r} must be a list of {n} entries (one per clip), got {value!r}")
    clips = []
    for entry in value:
        files = [entry] if isinstance(entry, str) or name == "clip_files" else entry
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f.strip() for f in files):
            raise _Malformed(f"field {name!r}: bad entry {entry!r}")
        clips.append(tuple(str(root / f) for f in files))
    return tuple(clips)


def _inputs(record: dict[str, Any], n: int, video_root: Path, data_dir: Path) -> tuple[str, Any]:
    given = [k for k in ("video_file", "clip_files", "frames") if record.get(k) is not None]
    if len(given) != 1:
        raise _Malformed(f"give exactly one of 'video_file', 'clip_files', 'frames' (got {given or 'none'})")
    if given[0] != "video_file":
        return "clips", _file_list(record, given[0], n, data_dir)
    video = record["video_file"]
    if not isinstance(video, str) or not video.strip():
        raise _Malformed(f"field 'video_file' must be a non-empty string, got {video!r}")
    return "video", str(video_root / video)


def _item(record: Any, source: str, video_root: Path, data_dir: Path) -> _Item:
    item = _Item(source=source, doc=record if isinstance(record, dict) else {"raw": record})
    try:
        if not isinstance(record, dict):
            raise _Malformed(f"record is not a JSON object but {type(record).__name__}")
        missing = [k for k in ("qid", "goal", "ground_truth") if record.get(k) is None]
        if missing:
            raise _Malformed(f"missing field(s) {', '.join(map(repr, missing))}")
        item.qid, item.goal = _qid(record["qid"]), _goal(record["goal"])
        item.answer = [g + 1 for g in _ground_truth(record["ground_truth"])]
        item.inputs = _inputs(record, len(item.answer), video_root, data_dir)
    except _Malformed as exc:
        item.error = str(exc)
    return item


def read_items(data: str | Path, video_root: str | Path | None = None) -> list[_Item]:
    """Validated records of a VCRBench ``data.json``, in file order (sources ``data.json[i]``).

    Raises:
        FileNotFoundError: No such file (:class:`tasks.media.DataFileNotFoundError`), or a folder.
        SampleError: The file is not a JSON array.
    """
    path = data_file(data, "VCRBench data")
    root = Path(video_root) if video_root is not None else path.parent / "videos"
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise SampleError(f"invalid JSON: {exc}", str(path)) from exc
    if not isinstance(records, list):
        raise SampleError(f"expected a JSON array of records, got {type(records).__name__}", str(path))
    return [_item(r, f"{path}[{i}]", root, path.parent) for i, r in enumerate(records)]


# ----------------------------------------------------------------------------------------------- metrics

#: Per-record count columns.
COLUMNS = ("n", "correct", "step_correct", "n_steps", "invalid")
GROUP_METRICS = ("acc", "step_acc", "invalid_rate")


def record_counts(records: list[dict[str, Any]]) -> np.ndarray:
    """Counts ``[n_records, 5]`` (:data:`COLUMNS`), re-parsing each record's ``raw_output`` against its target."""
    counts = np.zeros((len(records), len(COLUMNS)))  # [n_records, 5]
    for r, rec in enumerate(records):
        answer = target_order(str(rec["target"]))
        verdict = judge(rec.get("raw_output"), answer)
        counts[r] = (1, verdict["correct"], verdict["step_correct"], len(answer), not verdict["valid"])
    return counts


def _group_stats(s: np.ndarray) -> np.ndarray:
    """``[..., G, 5]`` totals → ``[..., G, 3]`` acc, step_acc, invalid_rate (NaN for empty groups)."""
    n, correct, step, steps, invalid = (s[..., j] for j in range(len(COLUMNS)))
    return np.stack(
        [safe_divide(correct, n, np.nan), safe_divide(step, steps, np.nan), safe_divide(invalid, n, np.nan)], -1
    )


def vcr_statistics(sums: np.ndarray, n_lengths: int, n_goals: int) -> np.ndarray:
    """Metrics from totals laid out as blocks [all, length 1..L, goal 1..G] of :data:`COLUMNS`.

    Returns:
        ``[..., 4 + 3 * (L + G)]``: overall acc, step_acc, invalid_rate, weighted_acc (mean over the goals present
        of their acc), then acc, step_acc, invalid_rate per length and per goal.
    """
    lead = sums.shape[:-1]
    groups = _group_stats(sums.reshape(*lead, 1 + n_lengths + n_goals, len(COLUMNS)))  # [..., 1+L+G, 3]
    goal_acc = groups[..., 1 + n_lengths :, 0]  # [..., G]
    present = np.isfinite(goal_acc)
    weighted = safe_divide(np.where(present, goal_acc, 0).sum(-1), present.sum(-1), np.nan)  # [...]
    rest = groups[..., 1:, :].reshape(*lead, 3 * (n_lengths + n_goals))
    return np.concatenate([groups[..., 0, :], weighted[..., None], rest], axis=-1)


# ----------------------------------------------------------------------------------------------- task


@TASKS.register("vcrbench")
class VCRBenchTask(Task):
    """VCRBench causal ordering, direct or through RRD.

    Args:
        data: Path of ``data.json``.
        video_root: Directory ``video_file`` is relative to (default ``<data dir>/videos``).
        num_frames: Frames per video (or, with ``fps``, their cap; None for no cap).
        fps: Sample at this rate instead of a fixed count.
        max_frames: Hard cap on frames per video.
        label_clips: Overlay "Clip k" on the first frame of each clip given by ``clip_files`` / ``frames``.
        mode: ``direct`` (one call, the official prompt) or ``rrd``.
        rrd_recognition: ``joint`` (one description call) or ``sequential`` (one call per clip).
        rrd_reason_with_video: Give the reasoning call the frames (official ``reason_with_videos``).
        n_boot: Bootstrap draws for standard errors (0 disables them).
        strict: Raise :class:`SampleError` on the first malformed record instead of recording it.
        gen_kwargs: Generation settings merged over ``{"max_new_tokens": 512, "do_sample": False}``; used for
            every call of a pipeline.
        limit: At most this many samples (the first ones in file order).
    """

    name: ClassVar[str] = "vcrbench"
    version: ClassVar[str] = "1.0"
    default_gen_kwargs: ClassVar[dict[str, Any]] = DEFAULT_GEN_KWARGS
    higher_is_better: ClassVar[dict[str, bool]] = {
        "acc": True,
        "step_acc": True,
        "weighted_acc": True,
        "invalid_rate": False,
    }

    def __init__(
        self,
        *,
        data: str,
        video_root: str | None = None,
        num_frames: int | None = 8,
        fps: float | None = None,
        max_frames: int | None = None,
        label_clips: bool = True,
        mode: str = "direct",
        rrd_recognition: str = "joint",
        rrd_reason_with_video: bool = False,
        n_boot: int = 1000,
        strict: bool = False,
        gen_kwargs: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(strict=strict, gen_kwargs=gen_kwargs, n_boot=n_boot, limit=limit)
        if mode not in MODES or rrd_recognition not in RECOGNITION:
            raise ValueError(f"mode must be one of {MODES} and rrd_recognition one of {RECOGNITION}")
        self.data = str(data)
        self.video_root = None if video_root is None else str(video_root)
        self.sampler = FrameSampler(num_frames=num_frames, fps=fps, max_frames=max_frames)
        self.label_clips = bool(label_clips)
        self.mode, self.rrd_recognition = mode, rrd_recognition
        self.rrd_reason_with_video = bool(rrd_reason_with_video)
        self._samples: list[Sample] | None = None

    @property
    def sequential(self) -> bool:
        """Whether recognition makes one call per clip (frames are then sampled per clip)."""
        return self.mode == "rrd" and self.rrd_recognition == "sequential"

    # ---- loading

    def samples(self) -> list[Sample]:
        """All samples in file order (cached); duplicate qids are errors."""
        if self._samples is None:
            items = read_items(self.data, self.video_root)[: self.limit]
            seen: set[str] = set()
            out = []
            for item in items:
                if item.error is None and item.qid in seen:
                    item.error = f"duplicate qid {item.qid!r}"
                if item.error is not None and self.strict:
                    raise SampleError(item.error, item.source)
                sample_id = item.qid if item.qid is not None and item.qid not in seen else item.source
                seen.add(sample_id)
                out.append(self._sample(item, sample_id, len(out)))
            self._samples = out
        return list(self._samples)

    def _sample(self, item: _Item, sample_id: str, index: int) -> Sample:
        ok = item.error is None
        return Sample(
            sample_id=sample_id,
            split=SPLIT,
            index=index,
            image_id=sample_id,
            text=PROMPT.format(goal=item.goal).strip() if ok else "",
            target=order_text(item.answer),
            source=item.source,
            images=self._loader(item) if ok else None,
            doc=item.doc,
            error=item.error,
        )

    def _loader(self, item: _Item) -> _VideoInput | _ClipInput:
        kind, value = item.inputs
        if kind == "video":
            return _VideoInput(value, item.source, self.sampler, len(item.answer), self.sequential)
        return _ClipInput(value, item.source, self.sampler, self.label_clips)

    # ---- answering

    def respond(self, batch: Sequence[tuple[Sample, list[Image.Image]]], model: ModelCalls) -> list[Response]:
        """Direct: one call per sample. RRD: the recognition calls of the whole batch, then the reasoning calls.

        Every response stores ``seconds`` (the sample's share of generation wall time); RRD ones also ``calls``,
        the transcript ``[{stage, prompt, output, n_images, seconds}]``, the reasoning call last.
        """
        if self.mode == "direct":
            calls = model.generate([Request(s.text, images) for s, images in batch], **self.gen_kwargs)
            return [Response(c.output, c.prompt, {"seconds": c.seconds}) for c in calls]
        plans = [self._recognition(s, images) for s, images in batch]
        flat = model.generate([req for plan in plans for _, _, req in plan], **self.gen_kwargs)
        transcripts, start = [], 0
        for plan in plans:
            calls = flat[start : start + len(plan)]
            transcripts.append([(stage, clip, c) for (stage, clip, _), c in zip(plan, calls, strict=True)])
            start += len(plan)
        reasoning = [self._reasoning(s, images, t) for (s, images), t in zip(batch, transcripts, strict=True)]
        finals = model.generate(reasoning, **self.gen_kwargs)
        return [_rrd_response([*t, ("reasoning", None, c)]) for t, c in zip(transcripts, finals, strict=True)]

    def _recognition(self, sample: Sample, images: list[Image.Image]) -> list[tuple[str, int | None, Request]]:
        """``(stage, clip, request)`` of a sample's recognition calls."""
        if not self.sequential:
            return [("recognition", None, Request(RRD_JOINT_PROMPT, list(images)))]
        groups = clip_groups(images, len(target_order(sample.target)))
        return [(f"recognition:clip{k}", k, Request(RRD_CLIP_PROMPT.format(step=k), g)) for k, g in groups.items()]

    def _reasoning(self, sample: Sample, images: list[Image.Image], transcript: list[_Step]) -> Request:
        """The reasoning request: goal and clip descriptions, text-only unless ``rrd_reason_with_video``."""
        if self.sequential:
            details = "".join(f"Clip {clip}: {c.output.strip()}\n" for _, clip, c in transcript)
        else:
            details = transcript[0][2].output
        goal = str(sample.doc.get("goal", "")).strip()
        if self.rrd_reason_with_video:
            return Request(RRD_REASONING_VIDEO_PROMPT.format(goal=goal, clip_details=details), list(images))
        return Request(RRD_REASONING_PROMPT.format(goal=goal, clip_details=details), [])

    # ---- scoring

    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        """``parsed`` (clip order or None), ``valid``, ``correct`` (exact) and ``step_correct``."""
        return judge(response.raw_output, target_order(sample.target))

    def outcomes(self, records: list[dict[str, Any]], splits: list[str] | None = None) -> Outcomes:
        """Rows ``vcrbench`` (acc, step_acc, invalid_rate, weighted_acc), ``vcrbench_len<k>``, ``vcrbench_goal/<g>``.

        Each record is its own cluster (``image_id`` = qid); ``binary`` is exact correctness.
        """
        base = record_counts(records)  # [n_records, 5]
        lengths = sorted({int(n) for n in base[:, 3]})
        goals = sorted({_goal_of(r) for r in records})
        len_idx = np.array([lengths.index(int(n)) for n in base[:, 3]])
        goal_idx = np.array([goals.index(_goal_of(r)) for r in records])
        counts = np.concatenate(
            [base, block_columns(base, len_idx, len(lengths)), block_columns(base, goal_idx, len(goals))], axis=1
        )  # [n_records, 5 * (1 + L + G)]
        rows = [f"vcrbench_len{n}" for n in lengths] + [f"vcrbench_goal/{g}" for g in goals]
        names = [(SPLIT, f"{m},none") for m in (*GROUP_METRICS, "weighted_acc")]
        names += [(row, f"{m},none") for row in rows for m in GROUP_METRICS]
        sizes = {SPLIT: len(records)}
        sizes.update({f"vcrbench_len{n}": int((len_idx == i).sum()) for i, n in enumerate(lengths)})
        sizes.update({f"vcrbench_goal/{g}": int((goal_idx == i).sum()) for i, g in enumerate(goals)})
        n_len, n_goal = len(lengths), len(goals)
        return Outcomes(
            counts=counts,
            stat_fn=lambda sums: vcr_statistics(sums, n_len, n_goal),
            names=names,
            sizes=sizes,
            binary=base[:, 1].copy(),
            binary_name="correct,none",
        )

    @property
    def headline(self) -> tuple[str, str]:
        """Exact-order accuracy."""
        return SPLIT, "acc,none"

    def describe(self) -> dict[str, Any]:
        """Task metadata: data, frame sampling, mode and, once loaded, the samples per number of clips."""
        info = super().describe()
        info.update(
            data=self.data,
            video_root=self.video_root,
            num_frames=self.sampler.num_frames,
            fps=self.sampler.fps,
            max_frames=self.sampler.max_frames,
            label_clips=self.label_clips,
            mode=self.mode,
            rrd_recognition=self.rrd_recognition,
            rrd_reason_with_video=self.rrd_reason_with_video,
            limit=self.limit,
        )
        if self._samples is not None:
            lengths = [len(target_order(s.target)) for s in self._samples if s.error is None]
            info["per_length"] = {n: lengths.count(n) for n in sorted(set(lengths))}
        return info


def _goal_of(record: dict[str, Any]) -> str:
    doc = record.get("doc") or {}
    return str(doc.get("goal", "")).strip()


def clip_groups(images: list[Image.Image], n_clips: int) -> dict[int, list[Image.Image]]:
    """Frames per clip (1-based), from ``info[CLIP_KEY]``; untagged frames are split into equal parts."""
    if images and all(CLIP_KEY in im.info for im in images):
        groups: dict[int, list[Image.Image]] = {k: [] for k in range(1, n_clips + 1)}
        for im in images:
            groups.setdefault(int(im.info[CLIP_KEY]), []).append(im)
        return groups
    n = len(images)
    return {k + 1: images[k * n // n_clips : (k + 1) * n // n_clips] for k in range(n_clips)}


def _rrd_response(transcript: list[_Step]) -> Response:
    """The response of one RRD sample: the last call's output, the transcript and the summed call seconds."""
    calls = [
        {"stage": stage, "prompt": c.prompt, "output": c.output, "n_images": c.n_images, "seconds": c.seconds}
        for stage, _, c in transcript
    ]
    final = transcript[-1][2]
    seconds = round(sum(c.seconds for _, _, c in transcript), 4)
    return Response(final.output, final.prompt, {"calls": calls, "seconds": seconds})
