"""Shapes-world benchmark exports: each read back in its original format and checked against ground truth."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from shapes.export import (
    MME_SUBTASKS,
    MME_SUFFIX,
    POPE_OBJECTS,
    export_all,
    export_vcr,
    main,
    make_vcr_sample,
    pope_scenes,
    read_png,
)
from shapes.pope_build import cooccurrence_ranking
from shapes.scene import COLOURS, SHAPES, WorldSpec, _mask, generate, image_digest
from tasks.pope import POPETask

SEED, N_EVAL, N_VCR = 4, 120, 8


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes_export")
    meta = export_all(out, seed=SEED, n_eval=N_EVAL, n_vcr=N_VCR, chair_subset=50)
    return out, meta


@pytest.fixture(scope="module")
def scenes():
    return generate(N_EVAL, SEED, WorldSpec(), split="eval")


def pil_digest(img) -> str:
    return image_digest(np.asarray(img.convert("RGB")))


# ----------------------------------------------------------------------------------------------- POPE
def test_pope_round_trip(export, scenes):
    out, meta = export
    task = POPETask(questions=str(out / "pope" / "shapes_pope_{split}.json"), image_root=str(out / "pope" / "images"))
    samples = task.samples()
    assert all(s.error is None for s in samples)
    by_split = defaultdict(list)
    for s in samples:
        by_split[s.split].append(s)
    assert {k: len(v) for k, v in by_split.items()} == meta["counts"]["pope"]["questions"]
    kept = [i for i, s in enumerate(scenes) if len(s.objects) >= 3]
    assert meta["counts"]["pope"]["images"] == len(kept) > 0
    assert len(by_split["random"]) == 6 * len(kept)
    for s in samples:
        index = int(s.image_id.split("_")[1])
        scene = scenes[index]
        assert pil_digest(s.images()[0]) == scene.digest
        obj = re.fullmatch(r"Is there an? (\w+) in the image\?", s.text.split("\n")[0]).group(1)
        assert (obj in scene.shapes) == (s.target == "yes")  # negatives are never in their image


def test_pope_adversarial_negatives_are_top_cooccurring(export, scenes):
    out, _ = export
    lines = (out / "pope" / "shapes_pope_adversarial.json").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    gt = {f"shapes_{i:05d}.png": s.shapes for i, s in enumerate(scenes) if len(s.objects) >= 3}
    ranking = cooccurrence_ranking(gt)
    spec = WorldSpec()
    assert all(ranking[s][0] == spec.partner(s) for s in ranking)  # the world's co-occurrence prior
    eligible = partners = 0
    for k in range(0, len(records), 6):
        group = records[k : k + 6]
        image = group[0]["image"]
        excluded = set(gt[image])
        for pos, neg in zip(group[::2], group[1::2], strict=True):
            p = pos["text"].split()[3]
            n = neg["text"].split()[3]
            expected = next(o for o in ranking[p] if o not in excluded)
            assert n == expected and n not in gt[image]
            if spec.partner(p) not in excluded:  # an absent, not yet asked partner is always the negative
                eligible += 1
                partners += n == spec.partner(p)
            excluded.add(n)
    assert partners == eligible > 0


def _partner_share(out: Path, split: str, present: dict[str, list[str]], spec: WorldSpec) -> float:
    """Share of a split's negatives that are the absent partner of a shape in the image."""
    lines = (out / "pope" / f"shapes_pope_{split}.json").read_text().splitlines()
    negatives = [q for q in map(json.loads, lines) if q["label"] == "no"]
    hits = [any(spec.partner(s) == q["text"].split()[3] for s in present[q["image"]]) for q in negatives]
    return sum(hits) / len(hits)


def test_pope_pool_of_three_object_scenes(tmp_path):
    spec = WorldSpec(pair_prob=0.3)
    meta = export_all(tmp_path, seed=0, n_eval=30, spec=spec, n_vcr=1, n_pope=150)
    pool = generate(150, 0, WorldSpec(pair_prob=0.3, min_objects=3, max_objects=3), split="pope")
    assert {len(s.objects) for s in pool} == {POPE_OBJECTS}
    assert meta["digests"]["pope"] == [s.digest for s in pool] == [sc["digest"] for sc in pope_scenes(meta)]
    assert not set(meta["digests"]["pope"]) & set(meta["digests"]["eval"])
    assert meta["pope"]["split"] == "pope" and meta["pope"]["spec"]["max_objects"] == POPE_OBJECTS
    pope = tmp_path / "pope"
    task = POPETask(questions=str(pope / "shapes_pope_{split}.json"), image_root=str(pope / "images"))
    for s in task.samples():
        scene = pool[int(s.image_id.split("_")[1])]
        assert pil_digest(s.images()[0]) == scene.digest
        assert (s.text.split("\n")[0].split()[3] in scene.shapes) == (s.target == "yes")
    # CHAIR and MME still read the eval scenes
    assert len(list((tmp_path / "chair" / "images").glob("*.png"))) == 30
    # What the pool is for: adversarial negatives are absent partners far more often than random ones.
    present = {f"shapes_{i:05d}.png": s.shapes for i, s in enumerate(pool)}
    rnd, adv = (_partner_share(tmp_path, split, present, spec) for split in ("random", "adversarial"))
    assert adv - rnd > 0.15, (rnd, adv)


def test_pope_reads_the_eval_scenes_without_a_pool(export):
    _, meta = export
    assert pope_scenes(meta) == meta["scenes"] and "pope" not in meta["digests"]


# ----------------------------------------------------------------------------------------------- CHAIR
def test_chair_coco_structure_and_ground_truth(export, scenes):
    out, _ = export
    chair = out / "chair"
    inst = json.loads((chair / "annotations" / "instances_shapes.json").read_text())
    caps = json.loads((chair / "annotations" / "captions_shapes.json").read_text())
    synonyms = [line.split(", ") for line in (chair / "synonyms.txt").read_text().splitlines()]
    heads = {words[0] for words in synonyms}
    inverse = {w: words[0] for words in synonyms for w in words}
    assert [w[0] for w in synonyms] == list(SHAPES)
    assert {"images", "annotations", "categories"} <= set(inst) and {"images", "annotations"} <= set(caps)
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    assert set(cats.values()) <= heads and all(c["supercategory"] == "shape" for c in inst["categories"])
    images = {im["id"]: im for im in inst["images"]}
    assert sorted(images) == list(range(1, N_EVAL + 1)) and caps["images"] == inst["images"]
    assert len({a["id"] for a in inst["annotations"]}) == len(inst["annotations"])
    per_image = defaultdict(list)
    for a in inst["annotations"]:
        per_image[a["image_id"]].append(a)
    for image_id, im in images.items():
        scene = scenes[image_id - 1]
        assert (im["width"], im["height"]) == (64, 64)
        assert image_digest(read_png(chair / "images" / im["file_name"])) == scene.digest
        anns = per_image[image_id]
        assert [cats[a["category_id"]] for a in anns] == scene.shapes
        for a, obj in zip(anns, scene.objects, strict=True):
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0 and 0 <= x <= x + w <= 64 and 0 <= y <= y + h <= 64
            assert a["area"] / _mask(obj, 64).sum() == pytest.approx(obj.visible, abs=1e-3)
            assert a["area"] <= w * h and a["segmentation"]
    captions = defaultdict(list)
    for c in caps["annotations"]:
        captions[c["image_id"]].append(c["caption"])
    assert len({c["id"] for c in caps["annotations"]}) == len(caps["annotations"])
    for image_id, texts in captions.items():
        assert len(texts) == 5
        shapes = sorted(scenes[image_id - 1].shapes)
        for text in texts:  # reference captions name exactly the present objects, via the synonym table
            assert sorted(inverse[w] for w in re.findall(r"[a-z]+", text.lower()) if w in inverse) == shapes
    subset = [int(x) for x in (chair / "chair_image_ids.txt").read_text().split()]
    assert len(subset) == 50 and subset == sorted(set(subset)) and set(subset) <= set(images)


# ----------------------------------------------------------------------------------------------- MME
def mme_answer_is_correct(subtask: str, question: str, scene) -> bool:
    """Recompute the answer of an MME question from the scene's ground truth."""
    q = question.removesuffix(MME_SUFFIX)
    if subtask == "existence":
        return re.fullmatch(r"Is there an? (\w+) in the image\?", q).group(1) in scene.shapes
    if subtask == "count":
        word = re.search(r"(\w+) objects? in the image", q).group(1)
        return ["zero", "one", "two", "three", "four", "five", "six"].index(word) == len(scene.objects)
    if subtask == "color":
        shape, colour = re.fullmatch(r"Is the (\w+) (\w+)\?", q).groups()
        return colour in COLOURS and next(o.colour for o in scene.objects if o.shape == shape) == colour
    a, rel, b = re.fullmatch(r"Is the (\w+) (?:to the )?(left|right|above|below) (?:of )?the (\w+)\?", q).groups()
    ca = next(o.center for o in scene.objects if o.shape == a)
    cb = next(o.center for o in scene.objects if o.shape == b)
    axis = 0 if rel in ("left", "right") else 1
    delta = cb[axis] - ca[axis]
    assert abs(delta) >= 8
    return delta > 0 if rel in ("left", "above") else delta < 0


def test_mme_folders_invariant_and_answers(export, scenes):
    out, meta = export
    rows = set()
    for subtask in MME_SUBTASKS:
        folder = out / "mme" / subtask
        pngs, txts = sorted(folder.glob("*.png")), sorted(folder.glob("*.txt"))
        assert [p.stem for p in pngs] == [t.stem for t in txts] and pngs
        assert len(pngs) == meta["counts"]["mme"]["images"][subtask]
        for txt in txts:
            scene = scenes[int(txt.stem)]
            assert image_digest(read_png(txt.with_suffix(".png"))) == scene.digest
            lines = txt.read_text().split("\n")
            assert lines[-1] == "" and len(lines) == 3  # exactly two lines, newline-terminated
            (q1, a1), (q2, a2) = (line.split("\t") for line in lines[:2])
            assert (a1, a2) == ("Yes", "No") and q1 != q2
            for q, a in ((q1, a1), (q2, a2)):
                assert q.endswith(MME_SUFFIX) and "\t" not in q
                assert mme_answer_is_correct(subtask, q, scene) == (a == "Yes")
                rows.add((f"{subtask}/{txt.name[:-4]}.png", q, a, subtask))
    assert meta["counts"]["mme"]["images"]["position"] < N_EVAL  # single-object scenes are skipped there
    table = pq.read_table(out / "mme" / "mme.parquet").to_pylist()
    assert len(table) == len(rows) == meta["counts"]["mme"]["questions"]
    assert {(r["question_id"], r["question"], r["answer"], r["category"]) for r in table} == rows
    for r in table[::7]:
        assert r["image"]["bytes"] == (out / "mme" / r["question_id"]).read_bytes()


# ----------------------------------------------------------------------------------------------- VCR
def ordered_frames_are_causal(frames: list[np.ndarray]) -> bool:
    """Each frame equals the previous one plus one object drawn on top (a one-colour change, never background)."""
    background = frames[0][0, 0]
    prev = np.broadcast_to(background, frames[0].shape)
    prev_count = 0
    for f in frames:
        changed = np.any(f != prev, axis=-1)
        colours = {tuple(c) for c in f[changed]}
        count = int(np.any(f != background, axis=-1).sum())
        if not changed.any() or len(colours) != 1 or colours == {tuple(background)} or count < prev_count:
            return False
        prev, prev_count = f, count
    return True


def read_video(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames


def test_vcr_data_video_and_ground_truth(export):
    out, meta = export
    vcr = out / "vcr"
    data = json.loads((vcr / "data.json").read_text())
    assert len(data) == N_VCR and [d["qid"] for d in data] == [str(i + 1) for i in range(N_VCR)]
    for d in data:
        assert set(d) == {"qid", "goal", "video_file", "ground_truth"} and d["goal"].startswith("Build the")
        n = len(d["ground_truth"])
        assert 3 <= n <= 7 and sorted(d["ground_truth"]) == list(range(n))
        clips = [read_png(vcr / "frames" / d["qid"] / f"clip_{k}.png") for k in range(1, n + 1)]
        assert not (vcr / "frames" / d["qid"] / f"clip_{n + 1}.png").exists()
        ordered = [clips[g] for g in d["ground_truth"]]  # ground_truth + 1 = clip numbers in temporal order
        assert ordered_frames_are_causal(ordered)
        if n > 1:
            assert not ordered_frames_are_causal(ordered[::-1])  # the check can fail
        object_words = re.findall(r"(\w+) (\w+)(?:,| and|$)", d["goal"].split(": ")[1])
        assert len(object_words) == n  # the goal names every object once
        frames = read_video(vcr / "videos" / d["video_file"])
        assert len(frames) == 4 * n
        for k, clip in enumerate(clips):  # last frame of clip k+1 (no label) matches its PNG, up to mp4v loss
            err = np.abs(frames[4 * k + 3].astype(int) - clip.astype(int)).mean()
            assert err < 6, (d["qid"], k, err)
        label = frames[0][:12, :40].astype(int)  # "Clip 1" box: black with white text
        assert (label < 60).mean() > 0.5 and (label > 180).any()
    steps = meta["counts"]["vcr"]["per_step_count"]
    assert sum(steps.values()) == N_VCR


def test_vcr_sample_random_access_and_ground_truth_definition(tmp_path):
    s = make_vcr_sample(SEED, 2)
    assert s.qid == "3"
    for j, g in enumerate(s.ground_truth):
        assert s.clip_steps[g] == j  # clip g+1 shows step j
    export_vcr(3, tmp_path, seed=SEED)
    record = json.loads((tmp_path / "data.json").read_text())[2]
    assert record["ground_truth"] == list(s.ground_truth) and record["goal"] == s.goal


def test_vcr_every_step_visibly_adds_its_object():
    spec = WorldSpec(image_size=128, min_objects=3, max_objects=7, radius=(0.08, 0.13))
    sizes = set()
    for index in range(300):
        s = make_vcr_sample(0, index, spec)
        sizes.add(len(s.objects))
        assert ordered_frames_are_causal(list(s.steps))
        prev = np.broadcast_to(s.steps[0][0, 0], s.steps[0].shape)
        for obj, img in zip(s.objects, s.steps, strict=True):
            changed = np.any(img != prev, axis=-1)
            assert changed.sum() >= spec.min_visible * _mask(obj, 128).sum()
            assert (img[changed] == COLOURS[obj.colour]).all()
            prev = img
    assert sizes == {3, 4, 5, 6, 7}


# ----------------------------------------------------------------------------------------------- metadata
def test_metadata_digests_match_pngs(export, scenes):
    out, meta = export
    assert meta == json.loads((out / "metadata.json").read_text())
    assert meta["digests"]["eval"] == [s.digest for s in scenes]
    assert [sc["digest"] for sc in meta["scenes"]] == meta["digests"]["eval"]
    assert meta["statistics"]["n_images"] == N_EVAL and meta["split"] == "eval" and meta["seed"] == SEED
    eval_digests = set(meta["digests"]["eval"])
    files = [*(out / "pope" / "images").glob("*.png"), *(out / "chair" / "images").glob("*.png")]
    files += [p for sub in MME_SUBTASKS for p in (out / "mme" / sub).glob("*.png")]
    assert {image_digest(read_png(p)) for p in files} == eval_digests
    vcr_files = (out / "vcr" / "frames").glob("*/clip_*.png")
    assert {image_digest(read_png(p)) for p in vcr_files} == set(meta["digests"]["vcr"])
    for sc, scene in zip(meta["scenes"], scenes, strict=True):
        assert [o["shape"] for o in sc["objects"]] == scene.shapes


def test_export_is_deterministic_and_cli(tmp_path, export):
    out, _ = export
    main(["--out", str(tmp_path / "a"), "--seed", str(SEED), "--n-eval", "20", "--n-vcr", "2"])
    main(["--out", str(tmp_path / "b"), "--seed", str(SEED), "--n-eval", "20", "--n-vcr", "2"])
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 50
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    # The small export's first scenes are the big export's first scenes (same stream).
    assert (tmp_path / "a" / "chair" / "images" / "shapes_000000000001.png").read_bytes() == (
        out / "chair" / "images" / "shapes_000000000001.png"
    ).read_bytes()
    with pytest.raises(FileExistsError):
        main(["--out", str(tmp_path / "a"), "--n-eval", "5", "--n-vcr", "1"])
    main(["--out", str(tmp_path / "a"), "--n-eval", "5", "--n-vcr", "1", "--overwrite"])
    assert len(list((tmp_path / "a" / "chair" / "images").glob("*.png"))) == 5
