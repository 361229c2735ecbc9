"""Export shapes-world scenes as benchmarks in their ORIGINAL file formats (POPE, CHAIR, MME, VCRBench).

    python -m shapes.export --out DIR --seed 0 --n-eval 300 --n-vcr 30

The same loaders and scorers as the real benchmarks read these files; only the pictures are synthetic. Every
file is a pure function of the arguments (re-running gives identical bytes), with one exception: the bytes of
the VCR mp4 videos depend on the OpenCV/FFmpeg build's encoder, so ``metadata.json`` records, per video, the
SHA-256 of the frames handed to the encoder (``vcr.encoded_frames``, :func:`frames_digest`). :func:`export_all` writes::

    DIR/
      metadata.json                 seed, split, spec, world statistics, per-scene ground truth and digests, counts
      pope/                         POPE (official COCO layout, read by tasks.pope.POPETask)
        images/shapes_00007.png     scene 7 of the eval split, or of POPE's own pool with ``n_pope`` (only
                                    scenes POPE keeps: >= 3 objects)
        shapes_pope_{random,popular,adversarial}.json   JSON Lines {question_id, image, text, label}
      chair/                        CHAIR inputs (COCO annotation layout + synonym table)
        images/shapes_000000000008.png                  scene i is COCO image id i + 1 (ids start at 1)
        annotations/instances_shapes.json               COCO instances: images, annotations, categories
        annotations/captions_shapes.json                COCO captions: 5 reference captions per image
        synonyms.txt                                    one line per category, "canonical, syn1, syn2"
        chair_image_ids.txt                             frozen evaluation subset, one image id per line
      mme/                          MME release, flat layout (MME_Benchmark_release_version/<subtask>/)
        {existence,count,position,color}/0007.png + 0007.txt   (scene 7; two lines "question<TAB>Yes|No")
        mme.parquet                                     HF lmms-lab/MME layout, same rows
      vcr/                          VCRBench layout (data.json + videos/)
        data.json                                       [{qid, goal, video_file, ground_truth}]
        videos/video_1.mp4                              the shuffled clips, "Clip k" overlaid at each clip start
        frames/1/clip_1.png                             representative frame of clip k (no overlay)
        procedures.json                                 qid -> build steps, clip -> step map (not in VCRBench)
      causal/                       VQA-Causal layout (CSV; images are the CHAIR images, as COCO val2014 is shared)
        vqa_causal.csv                                  image_id,sentence,reverse_sentence

Formats:

* **POPE** (:mod:`shapes.pope_build`): positives are the first three objects of an image in drawing order; POPE
  skips images with fewer than 3 objects. Adversarial negatives are the objects co-occurring most often with the
  positive: in this world its declared partner whenever that is absent from the image and not yet asked.
* **CHAIR** (benchmarks.md §2): the ground-truth object set of an image is the union of its instance
  categories and the objects named in its reference captions, mapped through ``synonyms.txt`` (CHAIR splits
  each line on ``", "``; the first word is the node word). Instance ``bbox`` ``[x, y, w, h]``, ``area`` and
  polygon ``segmentation`` describe the object's VISIBLE pixels (COCO's convention); ``category_id`` is the
  1-based index in :data:`shapes.scene.SHAPES`. Reference captions use :func:`shapes.scene.caption` (first one)
  and :func:`shapes.scene.reference_caption` (synonyms), so they only name present objects. Many CHAIR ports
  parse the image id from the last digits of the file name; the 12-digit names keep that working.
* **MME** (§3.2): each image has exactly one Yes question (first line) and one No question (second line), each
  ending in " Please answer yes or no.". Questions come from :func:`shapes.scene.qa_existence`, ``qa_count``,
  ``qa_position`` and ``qa_colour`` (subtask ``color``, MME's spelling). A scene is skipped in a subtask that
  cannot ask both polarities about it: ``position`` needs two objects whose centres are at least 1/8 of the image
  apart along x or y (single-object scenes are always skipped there); ``existence`` needs an absent shape (always
  true with at most 7 of the 8 shapes). ``mme.parquet`` has columns ``question_id`` (``"count/0007.png"``, shared
  by the image's two rows), ``image`` (struct ``{bytes, path}``, the PNG file's bytes), ``question``,
  ``answer``, ``category``.
* **VCRBench** (§4.1): each sample builds an arrangement of 3–7 objects (count drawn with VCRBench's step-count
  proportions 126:105:80:30:24), one object per step, so step k's frame holds the objects of step k-1 plus one
  more drawn on top (each step visibly changes at least ``min_visible`` of the new object's pixels). The goal
  names the objects in a random order (never the build order). The steps are shown as clips in a shuffled
  order: clip k (1-based, as overlaid in the video and named in ``frames/``) shows step ``clip_steps[k-1]``.
  ``ground_truth`` is 0-based and lists, for the steps in their true temporal order, the index of the clip
  showing each step: ``[g + 1 for g in ground_truth]`` is the answer "Correct order: 3, 1, 2" (clip numbers in
  temporal order), exactly VCRBench's ``prepare_answer``. ``qid`` is a string ``"1"``, ``"2"``, ... and
  ``video_file`` is relative to ``videos/`` (VCRBench joins ``<root>/videos/<video_file>``). Videos are MPEG-4
  Part 2 (``mp4v``, readable by OpenCV's FFmpeg backend), 128×128, ``fps`` frames per second,
  ``frames_per_clip`` frames per clip, the "Clip k" label on the first half of each clip's frames.

World statistics of the default export (seed 0, eval split, 300 scenes of 64 px; written to ``metadata.json``
under ``statistics`` by :func:`shapes.scene.world_statistics`): mean P(partner | shape) = 0.79 (per pair
0.75–0.81; 0.80 on 2000 scenes) against P(other shape | shape) = 0.23 for non-partners: the co-occurrence
prior behind POPE's adversarial split. Objects per image 1/2/3/4 in 10% / 38% / 16% / 36% of the images, so 156
of the 300 images have the 3 objects POPE needs (936 questions per POPE split); each shape appears in 29–39% of
the images; colours are uniform; the least visible object keeps 50% of its pixels. MME: 300 images in
existence / count / color, 264 in position (2,328 questions). CHAIR: 300 images, 833 instances, 1,500
reference captions. VCR: 30 samples (3/4/5/6/7 steps: 15/5/4/3/3). About 2.9 MB in all.

* **VQA-Causal** (§4.2): one row per object that a later-drawn object hides by at least 5% of its pixels:
  "The red circle is partly hidden is due to the blue square covering it." and the reversal "The blue square
  covers the red circle is due to the red circle being partly hidden." (:func:`causal_pair`). Both sentences
  name the same objects, so only the causal direction — which one covers which, visible in the image —
  separates them.

Eval images are the ``"eval"`` stream of :func:`shapes.scene.make_scene`; VCR samples the separate ``"vcr"``
stream, and POPE's own pool (``n_pope``) the ``"pope"`` stream (its scenes are in ``metadata.json`` under
``pope.scenes``; :func:`pope_scenes` returns whichever scenes POPE's images show). ``metadata.json`` lists the
content digest (:func:`shapes.scene.image_digest` of the RGB pixels) of every exported image, so a trainer can
refuse training images equal to an eval image.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from shapes.pope_build import write_pope_files
from shapes.scene import (
    NO,
    QA,
    SHAPES,
    SYNONYMS,
    YES,
    Scene,
    SceneObject,
    WorldSpec,
    _mask,
    caption,
    draw_object,
    generate,
    image_digest,
    list_phrase,
    object_phrase,
    qa_colour,
    qa_count,
    qa_existence,
    qa_position,
    reference_caption,
    sample_scene,
    scene_rng,
    world_statistics,
)

EVAL_SPLIT = "eval"
VCR_SPLIT = "vcr"
POPE_SPLIT = "pope"
#: Objects per scene of a separate POPE pool (``export_all(n_pope=...)``): POPE's minimum, which leaves the most
#: absent shapes to draw negatives from (see :func:`export_all`).
POPE_OBJECTS = 3
MME_SUFFIX = " Please answer yes or no."
#: MME subtask folder → question generator (``color`` is MME's spelling).
MME_SUBTASKS: dict[str, Callable[..., QA | None]] = {
    "existence": qa_existence,
    "count": qa_count,
    "position": qa_position,
    "color": qa_colour,
}
N_REFERENCE_CAPTIONS = 5
#: VCRBench's step-count distribution (number of samples with 3..7 clips).
VCR_STEP_WEIGHTS = {3: 126, 4: 105, 5: 80, 6: 30, 7: 24}
#: World parameters of VCR samples: 128 px frames (legible "Clip k" label), 3–7 small objects.
VCR_SPEC = WorldSpec(image_size=128, min_objects=3, max_objects=7, radius=(0.08, 0.13))
#: "Clip 1" ... "Clip 9" stacked top to bottom, each a 24×48 grey patch: white ``FONT_HERSHEY_SIMPLEX`` text
#: (scale 0.5, thickness 1, ``LINE_AA``) at (3, 13) on an opaque black box, exactly as ``cv2.putText`` and
#: ``cv2.rectangle`` of opencv-python-headless 5.1 drew them (the shipped videos' labels; 4.10 draws them otherwise).
CLIP_LABELS = Path(__file__).parent / "data" / "clip_labels.png"


# ----------------------------------------------------------------------------------------------- files
def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of an ``[H, W, 3]`` uint8 RGB image."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def write_png(path: Path, image: np.ndarray) -> bytes:
    """Write an RGB image as PNG (parents created); returns the file's bytes."""
    data = png_bytes(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def read_png(path: str | Path) -> np.ndarray:
    """Read a PNG written by :func:`write_png` back as ``[H, W, 3]`` uint8 RGB."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _write_json(path: Path, data: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n", encoding="utf-8")


def _objects_json(objects: Sequence[SceneObject]) -> list[dict[str, Any]]:
    return [asdict(o) for o in objects]


# ----------------------------------------------------------------------------------------------- POPE
def pope_image_name(index: int, prefix: str = "shapes") -> str:
    """File name of scene ``index`` in the POPE export."""
    return f"{prefix}_{index:05d}.png"


def export_pope(scenes: Sequence[Scene], out_dir: str | Path, prefix: str = "shapes", seed: int = 0) -> dict[str, Any]:
    """Write POPE's three split files and the images they ask about.

    Args:
        scenes: Scenes; scene ``i`` becomes ``images/{prefix}_{i:05d}.png``.
        out_dir: Output directory.
        prefix: File name prefix of images and question files (``{prefix}_pope_{split}.json``).
        seed: Seed of POPE's random draws.

    Returns:
        Counts: ``images`` (scenes with >= 3 objects, the only ones written) and ``questions`` per split.
    """
    out = Path(out_dir)
    gt = {pope_image_name(i, prefix): s.shapes for i, s in enumerate(scenes)}
    kept = {name: shapes for name, shapes in gt.items() if len(set(shapes)) >= 3}
    for i, scene in enumerate(scenes):
        if pope_image_name(i, prefix) in kept:
            write_png(out / "images" / pope_image_name(i, prefix), scene.image)
    paths = write_pope_files(gt, out, prefix=prefix, seed=seed)
    counts = {split: len(p.read_text(encoding="utf-8").splitlines()) for split, p in paths.items()}
    return {"images": len(kept), "questions": counts}


# ----------------------------------------------------------------------------------------------- CHAIR
def chair_image_id(index: int) -> int:
    """COCO image id of scene ``index`` (COCO ids start at 1)."""
    return index + 1


def chair_file_name(image_id: int) -> str:
    """File name of a CHAIR image (12-digit id, like COCO's ``COCO_val2014_000000000042.jpg``)."""
    return f"shapes_{image_id:012d}.png"


def synonyms_text() -> str:
    """CHAIR's ``synonyms.txt``: per category the canonical name then its synonyms, joined by ``", "``."""
    return "".join(", ".join((shape, *SYNONYMS[shape])) + "\n" for shape in SHAPES)


def visible_masks(scene: Scene) -> list[np.ndarray]:
    """Per object, the boolean mask of its pixels not covered by objects drawn after it."""
    size = scene.image.shape[0]
    masks = [_mask(o, size) for o in scene.objects]
    covered = np.zeros((size, size), bool)
    visible = []
    for m in reversed(masks):
        visible.append(m & ~covered)
        covered |= m
    return visible[::-1]


def _instance(mask: np.ndarray, ann_id: int, image_id: int, category_id: int) -> dict[str, Any]:
    """COCO instance annotation of one visible mask."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": polygons,
        "area": float(mask.sum()),
        "bbox": [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)],
        "iscrowd": 0,
    }


def _coco_header(description: str) -> dict[str, Any]:
    return {
        "info": {"description": description, "version": "1.0", "year": 2025, "contributor": "shapes.export"},
        "licenses": [],
    }


def export_chair(
    scenes: Sequence[Scene], out_dir: str | Path, seed: int = 0, n_subset: int | None = None
) -> dict[str, Any]:
    """Write CHAIR's inputs: COCO instances and captions JSON, ``synonyms.txt``, images and an image-id list.

    Args:
        scenes: Scenes; scene ``i`` is image id ``i + 1``.
        out_dir: Output directory.
        seed: Seed of the reference captions and of the subset draw.
        n_subset: Size of the frozen evaluation subset in ``chair_image_ids.txt`` (drawn with ``seed``, written
            sorted); ``None`` lists every image.

    Returns:
        Counts of images, instances, captions and subset ids.
    """
    out = Path(out_dir)
    rng = random.Random(f"shapes-export/chair/{seed}")
    categories = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
    cat_id = {s: k + 1 for k, s in enumerate(SHAPES)}
    images, instances, captions = [], [], []
    for i, scene in enumerate(scenes):
        image_id = chair_image_id(i)
        h, w = scene.image.shape[:2]
        images.append({"id": image_id, "file_name": chair_file_name(image_id), "width": w, "height": h})
        write_png(out / "images" / chair_file_name(image_id), scene.image)
        for obj, mask in zip(scene.objects, visible_masks(scene), strict=True):
            instances.append(_instance(mask, len(instances) + 1, image_id, cat_id[obj.shape]))
        texts = [caption(scene, rng)] + [reference_caption(scene, rng) for _ in range(N_REFERENCE_CAPTIONS - 1)]
        captions += [{"id": len(captions) + k + 1, "image_id": image_id, "caption": t} for k, t in enumerate(texts)]
    _write_json(
        out / "annotations" / "instances_shapes.json",
        {
            **_coco_header("shapes world instances"),
            "images": images,
            "annotations": instances,
            "categories": categories,
        },
    )
    _write_json(
        out / "annotations" / "captions_shapes.json",
        {**_coco_header("shapes world captions"), "images": images, "annotations": captions},
    )
    (out / "synonyms.txt").write_text(synonyms_text(), encoding="utf-8")
    ids = [im["id"] for im in images]
    if n_subset is not None:
        ids = random.Random(f"shapes-export/chair-subset/{seed}").sample(ids, min(n_subset, len(ids)))
    subset = sorted(ids)
    (out / "chair_image_ids.txt").write_text("".join(f"{i}\n" for i in subset), encoding="utf-8")
    return {"images": len(images), "instances": len(instances), "captions": len(captions), "subset": len(subset)}


# ----------------------------------------------------------------------------------------------- MME
def mme_pair(scene: Scene, subtask: str, rng: random.Random) -> tuple[str, str] | None:
    """The (Yes question, No question) of a scene in an MME subtask, suffix included; None when impossible."""
    make = MME_SUBTASKS[subtask]
    yes, no = make(scene, rng, YES), make(scene, rng, NO)
    if yes is None or no is None:
        return None
    return yes[0] + MME_SUFFIX, no[0] + MME_SUFFIX


def export_mme(
    scenes: Sequence[Scene], out_dir: str | Path, seed: int = 0, max_per_subtask: int | None = None
) -> dict[str, Any]:
    """Write the MME release's flat layout for existence / count / position / color, plus ``mme.parquet``.

    Args:
        scenes: Scenes; scene ``i`` is ``{subtask}/{i:04d}.png`` in every subtask that can use it.
        out_dir: Output directory.
        seed: Seed of the question draws.
        max_per_subtask: At most this many images per subtask (the first usable scenes); ``None``: all.

    Returns:
        Images per subtask and total questions.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    rng = random.Random(f"shapes-export/mme/{seed}")
    rows: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for subtask in MME_SUBTASKS:
        counts[subtask] = 0
        for i, scene in enumerate(scenes):
            if max_per_subtask is not None and counts[subtask] >= max_per_subtask:
                break
            pair = mme_pair(scene, subtask, rng)
            if pair is None:
                continue
            name = f"{i:04d}"
            data = write_png(out / subtask / f"{name}.png", scene.image)
            lines = f"{pair[0]}\t{YES}\n{pair[1]}\t{NO}\n"
            (out / subtask / f"{name}.txt").write_text(lines, encoding="utf-8")
            qid = f"{subtask}/{name}.png"
            for question, answer in zip(pair, (YES, NO), strict=True):
                rows.append({"question_id": qid, "image": {"bytes": data, "path": qid}, "question": question,
                             "answer": answer, "category": subtask})  # fmt: skip
            counts[subtask] += 1
    schema = pa.schema(
        [
            ("question_id", pa.string()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("category", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "mme.parquet")
    return {"images": counts, "questions": len(rows)}


# ----------------------------------------------------------------------------------------------- VCRBench
@dataclass(frozen=True)
class VCRSample:
    """One causal-ordering sample.

    Attributes:
        qid: Sample id (``"1"``, ``"2"``, ...; VCRBench uses strings).
        goal: Task text, e.g. ``"Build the arrangement: a red circle, a blue star and a white square"``.
        objects: Objects in build (= drawing) order; step ``j`` adds ``objects[j]``.
        steps: Step ``j``'s image (RGB, no overlay): the objects ``0..j`` on the background.
        clip_steps: ``clip_steps[c]`` = the step shown by clip ``c + 1`` of the video.
        ground_truth: VCRBench's 0-based answer: ``ground_truth[j]`` = index of the clip showing step ``j``.
    """

    qid: str
    goal: str
    objects: tuple[SceneObject, ...]
    steps: tuple[np.ndarray, ...]
    clip_steps: tuple[int, ...]
    ground_truth: tuple[int, ...]

    def clip_frames(self) -> list[np.ndarray]:
        """Representative frame of each clip in video order (clip 1 first)."""
        return [self.steps[s] for s in self.clip_steps]


def render_steps(objects: Sequence[SceneObject], size: int, background: int) -> list[np.ndarray]:
    """Cumulative renders: image ``j`` shows objects ``0..j`` (drawn in order) on a uniform background."""
    img = np.full((size, size, 3), background, np.uint8)
    steps = []
    for obj in objects:
        draw_object(img, obj)
        steps.append(img.copy())
    return steps


def _steps_distinct(objects: Sequence[SceneObject], steps: Sequence[np.ndarray], min_change: float) -> bool:
    """Whether each step changes at least ``min_change`` of its new object's pixels (step 0: vs background)."""
    size = steps[0].shape[0]
    for j, (obj, img) in enumerate(zip(objects, steps, strict=True)):
        area = _mask(obj, size).sum()
        prev = steps[j - 1] if j else None
        changed = area if prev is None else np.any(img != prev, axis=-1).sum()
        if changed < min_change * area:
            return False
    return True


def make_vcr_sample(seed: int, index: int, spec: WorldSpec = VCR_SPEC, split: str = VCR_SPLIT) -> VCRSample:
    """VCR sample ``index`` (deterministic, random access; ``qid`` is ``index + 1``).

    The number of steps follows :data:`VCR_STEP_WEIGHTS` restricted to ``spec``'s object range; shapes follow
    the world's co-occurrence rule and placements its visibility rule (see :mod:`shapes.scene`), redrawn until
    every step visibly adds its object.

    Raises:
        RuntimeError: When no placement with distinct steps is found.
    """
    rng = scene_rng(seed, split, index)
    counts = [n for n in VCR_STEP_WEIGHTS if spec.min_objects <= n <= spec.max_objects]
    if not counts:
        raise ValueError(f"spec allows no VCR step count in {sorted(VCR_STEP_WEIGHTS)}")
    n = rng.choices(counts, weights=[VCR_STEP_WEIGHTS[k] for k in counts])[0]
    fixed = dataclasses.replace(spec, min_objects=n, max_objects=n)
    background = rng.randint(0, 40)
    for _ in range(100):
        objects = sample_scene(rng, fixed)
        steps = render_steps(objects, spec.image_size, background)
        if _steps_distinct(objects, steps, spec.min_visible):
            break
    else:
        raise RuntimeError(f"no VCR placement with distinct steps for sample {index}")
    clip_steps = list(range(n))
    rng.shuffle(clip_steps)
    goal_order = [object_phrase(o) for o in objects]
    rng.shuffle(goal_order)
    return VCRSample(
        qid=str(index + 1),
        goal=f"Build the arrangement: {list_phrase(goal_order)}",
        objects=tuple(objects),
        steps=tuple(steps),
        clip_steps=tuple(clip_steps),
        ground_truth=tuple(clip_steps.index(j) for j in range(n)),
    )


def label_frame(image: np.ndarray, clip: int) -> np.ndarray:
    """Copy of an RGB frame with ``"Clip k"`` (k = 1..9) in white on a black box at the top left (48×24 pixels).

    The label is pasted from :data:`CLIP_LABELS`, not drawn with ``cv2.putText``: OpenCV's text rendering changed
    between releases (4.10 draws other glyphs and a wider box than 5.1), and the frames handed to the video
    encoder must not depend on the OpenCV build.
    """
    out = image.copy()
    patch = _clip_labels()[clip - 1]
    out[: patch.shape[0], : patch.shape[1]] = patch[..., None]
    return out


@functools.cache
def _clip_labels() -> np.ndarray:
    sheet = cv2.imread(str(CLIP_LABELS), cv2.IMREAD_GRAYSCALE)  # PNG is lossless: the same pixels on every build
    if sheet is None:
        raise FileNotFoundError(f"cannot read {CLIP_LABELS}")
    return sheet.reshape(9, -1, sheet.shape[1])


def encoder_frames(sample: VCRSample, frames_per_clip: int = 4) -> list[np.ndarray]:
    """The BGR frames :func:`write_vcr_video` hands to the encoder, in order.

    Each clip is ``frames_per_clip`` copies of its step image; the first ``ceil(frames_per_clip / 2)`` carry
    the ``"Clip k"`` label.
    """
    frames = []
    for k, frame in enumerate(sample.clip_frames(), start=1):
        labelled = label_frame(frame, k)
        frames += [cv2.cvtColor(labelled if f < (frames_per_clip + 1) // 2 else frame, cv2.COLOR_RGB2BGR)
                   for f in range(frames_per_clip)]  # fmt: skip
    return frames


def frames_digest(frames: Sequence[np.ndarray]) -> str:
    """SHA-256 of a frame sequence's pixels (shape-prefixed): what a video encodes, whatever its encoder's bytes."""
    h = hashlib.sha256()
    for frame in frames:
        h.update(f"{frame.shape}{frame.dtype}".encode())
        h.update(np.ascontiguousarray(frame).tobytes())
    return h.hexdigest()


def write_vcr_video(path: Path, sample: VCRSample, frames_per_clip: int = 4, fps: float = 2.0) -> str:
    """Write the sample's shuffled clips (:func:`encoder_frames`) as one ``mp4v`` video.

    Returns:
        :func:`frames_digest` of the frames handed to the encoder. The file's bytes (and, mp4v being lossy, its
        decoded pixels) depend on the OpenCV/FFmpeg build; this digest does not.

    Raises:
        RuntimeError: When OpenCV cannot open a video writer.
    """
    size = sample.steps[0].shape[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (size, size))
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot write {path} with codec mp4v")
    frames = encoder_frames(sample, frames_per_clip)
    try:
        for frame in frames:
            writer.write(frame)
    finally:
        writer.release()
    return frames_digest(frames)


def export_vcr(
    n_samples: int,
    out_dir: str | Path,
    seed: int = 0,
    spec: WorldSpec = VCR_SPEC,
    frames_per_clip: int = 4,
    fps: float = 2.0,
) -> dict[str, Any]:
    """Write a VCRBench-style set: ``data.json``, ``videos/``, per-clip PNG frames and ``procedures.json``.

    Args:
        n_samples: Number of samples (:func:`make_vcr_sample` ``0..n_samples-1`` of the ``"vcr"`` stream).
        out_dir: Output directory.
        seed: World seed.
        spec: World parameters (objects per sample, frame size).
        frames_per_clip: Video frames per clip.
        fps: Video frame rate.

    Returns:
        Counts (samples, per step count, frames), the step-image digests and, per video file, the
        :func:`frames_digest` of the frames handed to its encoder.
    """
    out = Path(out_dir)
    records, procedures, digests, encoded = [], {}, [], {}
    per_steps: dict[int, int] = {}
    n_frames = 0
    for index in range(n_samples):
        s = make_vcr_sample(seed, index, spec)
        video_file = f"video_{s.qid}.mp4"
        encoded[video_file] = write_vcr_video(out / "videos" / video_file, s, frames_per_clip, fps)
        n_frames += len(s.clip_steps) * frames_per_clip
        for k, frame in enumerate(s.clip_frames(), start=1):
            write_png(out / "frames" / s.qid / f"clip_{k}.png", frame)
        records.append({"qid": s.qid, "goal": s.goal, "video_file": video_file, "ground_truth": list(s.ground_truth)})
        procedures[s.qid] = {
            "steps": [f"Add {object_phrase(o)}." for o in s.objects],
            "objects": _objects_json(s.objects),
            "clip_steps": list(s.clip_steps),
            "frames_per_clip": frames_per_clip,
            "fps": fps,
        }
        digests += [image_digest(img) for img in s.steps]
        per_steps[len(s.objects)] = per_steps.get(len(s.objects), 0) + 1
    _write_json(out / "data.json", records, indent=4)
    _write_json(out / "procedures.json", procedures, indent=1)
    return {"samples": n_samples, "per_step_count": dict(sorted(per_steps.items())), "frames": n_frames,
            "digests": digests, "encoded_frames": encoded}  # fmt: skip


# ----------------------------------------------------------------------------------------------- all
BENCHMARKS = ("pope", "chair", "mme", "vcr", "causal")


# ----------------------------------------------------------------------------------------------- causal
#: Least hidden fraction of an object for its occlusion to be stated as a cause (0.05 = 5% of its pixels).
CAUSAL_MIN_HIDDEN = 0.05


def occlusions(scene: Scene, min_hidden: float = CAUSAL_MIN_HIDDEN) -> list[tuple[int, int, float]]:
    """``(hidden, cover, fraction)``: object ``hidden`` loses ``fraction`` of its pixels, most of them to ``cover``.

    Only objects hiding at least ``min_hidden`` of their own pixels count; ``cover`` is the later-drawn object
    overlapping the most of them.
    """
    size = scene.image.shape[0]
    masks = [_mask(o, size) for o in scene.objects]
    out = []
    for i, (mask, vis) in enumerate(zip(masks, visible_masks(scene), strict=True)):
        lost = 1.0 - vis.sum() / max(mask.sum(), 1)
        overlaps = [(int((mask & masks[j]).sum()), j) for j in range(i + 1, len(masks))]
        if lost >= min_hidden and overlaps and max(overlaps)[0] > 0:
            out.append((i, max(overlaps)[1], round(float(lost), 4)))
    return out


def causal_pair(scene: Scene, hidden: int, cover: int) -> tuple[str, str]:
    """VQA-Causal's sentence and its order-reversed version for "``hidden`` is partly hidden by ``cover``".

    Same construction as the benchmark ("<effect> is due to <cause>" and the reversal, which keeps the
    connective and swaps the clauses), so a model that reads only the objects cannot tell them apart.
    """
    a, b = scene.objects[hidden], scene.objects[cover]
    na, nb = f"{a.colour} {a.shape}", f"{b.colour} {b.shape}"
    return (
        f"The {na} is partly hidden is due to the {nb} covering it.",
        f"The {nb} covers the {na} is due to the {na} being partly hidden.",
    )


def export_causal(scenes: Sequence[Scene], out_dir: str | Path) -> dict[str, Any]:
    """Write ``vqa_causal.csv`` (VQA-Causal's columns ``image_id,sentence,reverse_sentence``).

    One row per occluded object (:func:`occlusions`), in scene order; ``image_id`` is the scene's CHAIR/COCO image
    id, so the rows point at ``chair/images/shapes_<12-digit id>.png`` as the real file points at COCO val2014.
    """
    import csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(scenes):
        for hidden, cover, _ in occlusions(scene):
            rows.append((chair_image_id(i), *causal_pair(scene, hidden, cover)))
    with (out / "vqa_causal.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image_id", "sentence", "reverse_sentence"])
        writer.writerows(rows)
    return {"rows": len(rows), "images": len({r[0] for r in rows})}


def _prepare(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier export unless ``overwrite`` (then remove only what this module writes)."""
    targets = [out / b for b in BENCHMARKS] + [out / "metadata.json"]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True (--overwrite) to replace the export")
    for t in existing:
        shutil.rmtree(t) if t.is_dir() else t.unlink()
    out.mkdir(parents=True, exist_ok=True)


def export_all(
    out_dir: str | Path,
    seed: int = 0,
    n_eval: int = 300,
    spec: WorldSpec = WorldSpec(),
    n_vcr: int = 30,
    vcr_spec: WorldSpec = VCR_SPEC,
    mme_per_subtask: int | None = None,
    chair_subset: int | None = None,
    n_pope: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate ``n_eval`` eval-split scenes, export every benchmark and write ``metadata.json``.

    POPE reads the eval scenes too unless ``n_pope`` is given: then it gets its own pool of ``n_pope`` scenes
    from the ``"pope"`` stream, each with exactly :data:`POPE_OBJECTS` objects (``spec`` otherwise). Why: POPE
    keeps images with at least 3 objects and asks 3 negatives per image. In an 8-shape world a 4-object image
    leaves 4 absent shapes, so the random and the adversarial split ask about nearly the same ones and cannot
    differ; a 3-object image leaves 5, and when its objects come from different pairs their 3 absent partners
    are exactly the adversarial negatives while a random draw takes 3 of the 5 absent shapes. Measured on
    300-scene exports (seed 0, ``pair_prob`` 0.3): the share of negatives that are an absent partner of a
    present shape is 0.31 (random) vs 0.51 (adversarial) with 3-object scenes, 0.34 vs 0.49 with the 1-4-object
    eval scenes. (COCO, with 80 categories, has no such problem.)

    Args:
        out_dir: Output directory (subfolders ``pope/``, ``chair/``, ``mme/``, ``vcr/``, ``causal/``).
        seed: World seed (scenes, questions, captions, VCR samples).
        n_eval: Number of eval-split scenes shared by POPE, CHAIR and MME.
        spec: World parameters of the eval scenes.
        n_vcr: Number of VCR samples.
        vcr_spec: World parameters of the VCR samples.
        mme_per_subtask: At most this many images per MME subtask (``None``: every usable scene).
        chair_subset: Size of CHAIR's frozen image-id subset (``None``: all images).
        n_pope: Size of POPE's own scene pool (``None``: POPE reads the eval scenes).
        overwrite: Replace an earlier export in ``out_dir``.

    Returns:
        The metadata written to ``metadata.json``.
    """
    out = Path(out_dir)
    _prepare(out, overwrite)
    scenes = generate(n_eval, seed, spec, split=EVAL_SPLIT)
    pope, pope_spec = scenes, spec
    if n_pope is not None:
        pope_spec = dataclasses.replace(spec, min_objects=POPE_OBJECTS, max_objects=POPE_OBJECTS)
        pope = generate(n_pope, seed, pope_spec, split=POPE_SPLIT)
    counts = {
        "pope": export_pope(pope, out / "pope", seed=seed),
        "chair": export_chair(scenes, out / "chair", seed=seed, n_subset=chair_subset),
        "mme": export_mme(scenes, out / "mme", seed=seed, max_per_subtask=mme_per_subtask),
        "causal": export_causal(scenes, out / "causal"),
    }
    vcr = export_vcr(n_vcr, out / "vcr", seed=seed, spec=vcr_spec)
    vcr_digests, vcr_encoded = vcr.pop("digests"), vcr.pop("encoded_frames")
    counts["vcr"] = vcr
    metadata = {
        "world": "shapes",
        "seed": seed,
        "split": EVAL_SPLIT,
        "n_eval": n_eval,
        "spec": asdict(spec),
        "statistics": world_statistics(scenes, spec),
        "counts": counts,
        "digests": {EVAL_SPLIT: [s.digest for s in scenes], VCR_SPLIT: vcr_digests},
        "scenes": _scenes_json(scenes),
        "vcr": {"split": VCR_SPLIT, "spec": asdict(vcr_spec), "n_samples": n_vcr, "encoded_frames": vcr_encoded},
        "pope": {"split": EVAL_SPLIT if n_pope is None else POPE_SPLIT, "spec": asdict(pope_spec)},
    }
    if n_pope is not None:
        metadata["digests"][POPE_SPLIT] = [s.digest for s in pope]
        metadata["pope"] |= {"statistics": world_statistics(pope, pope_spec), "scenes": _scenes_json(pope)}
    _write_json(out / "metadata.json", metadata, indent=1)
    return json.loads(json.dumps(metadata))  # exactly what the file holds (string keys, lists)


def _scenes_json(scenes: Sequence[Scene]) -> list[dict[str, Any]]:
    """Per scene: index, digest and objects (``metadata.json``)."""
    return [{"index": i, "digest": s.digest, "objects": _objects_json(s.objects)} for i, s in enumerate(scenes)]


def pope_scenes(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """The scenes POPE's image ``shapes_{index:05d}.png`` files show, from an export's ``metadata.json``."""
    return metadata["pope"].get("scenes", metadata["scenes"])


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m shapes.export --out DIR --seed 0 --n-eval 300 --n-vcr 30``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-eval", type=int, default=300, help="eval scenes shared by POPE, CHAIR and MME")
    ap.add_argument("--n-vcr", type=int, default=30, help="VCR samples")
    ap.add_argument("--image-size", type=int, default=WorldSpec().image_size, help="eval image side in pixels")
    ap.add_argument("--mme-per-subtask", type=int, default=None, help="cap on images per MME subtask")
    ap.add_argument("--chair-subset", type=int, default=None, help="size of CHAIR's frozen image-id subset")
    ap.add_argument("--n-pope", type=int, default=None, help=f"POPE's own pool of {POPE_OBJECTS}-object scenes")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    args = ap.parse_args(argv)
    meta = export_all(
        args.out,
        seed=args.seed,
        n_eval=args.n_eval,
        spec=WorldSpec(image_size=args.image_size),
        n_vcr=args.n_vcr,
        mme_per_subtask=args.mme_per_subtask,
        chair_subset=args.chair_subset,
        n_pope=args.n_pope,
        overwrite=args.overwrite,
    )
    print(json.dumps(meta["counts"], indent=1))
    stats = meta["statistics"]
    print(
        f"P(partner|shape)={stats['mean_p_partner_given_shape']} "
        f"P(non-partner|shape)={stats['mean_p_nonpartner_given_shape']} -> {args.out}"
    )


if __name__ == "__main__":
    main()
