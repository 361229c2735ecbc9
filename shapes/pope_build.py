"""Build POPE question files from per-image ground-truth object lists.

Follows the sampling rules of POPE (Li et al., EMNLP 2023, "Evaluating Object Hallucination in Large
Vision-Language Models"), so synthetic data can be written in the official COCO format and read by the same
loader (:class:`tasks.pope.POPETask`).

Rules:

* Input: an ordered mapping image file name → ordered list of ground-truth object names. Repeated names in a
  list are kept once; images with fewer than 3 distinct objects are skipped.
* Vocabulary: the objects of the kept images. Frequency of an object = number of kept images containing it.
  Co-occurrence of (a, b) = number of kept images containing both.
* For each image, for i = 0, 1, 2: the i-th listed object is asked as a positive (label ``yes``), immediately
  followed by one negative (label ``no``) chosen by the split's strategy. A negative is never an object of the
  image and never an object already asked about for that image.

  * ``random``: uniform draw from the allowed vocabulary objects;
  * ``popular``: the most frequent allowed object;
  * ``adversarial``: the allowed object co-occurring most often (count > 0) with the current positive;
  * ``popular`` / ``adversarial`` fall back to a random draw when their ranked list has no allowed object.

* Ties in the rankings are broken by first appearance in the input (image order, then list order), which is
  what POPE's stable sort over insertion-ordered dicts does for frequency; randomness comes only from
  ``random.Random(seed)``, consumed image by image in input order, so a seed fixes the output.
* Question: ``Is there a {object} in the image?``, ``an`` before an object whose first letter is a vowel
  (unlike the released POPE builder, which replaced every ``a`` of the template and so corrupted ``image``).
* ``question_id`` restarts at 1 in each split file; files are JSON Lines named ``{prefix}_pope_{split}.json``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

STRATEGIES = ("random", "popular", "adversarial")
N_POSITIVES = 3
TEMPLATE = "Is there {article} {obj} in the image?"


def question_text(obj: str) -> str:
    """The POPE question about ``obj`` (``an`` before a vowel-initial object, ``a`` otherwise)."""
    article = "an" if obj and obj[0].lower() in "aeiou" else "a"
    return TEMPLATE.format(article=article, obj=obj)


def _kept_images(gt: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Images with at least :data:`N_POSITIVES` distinct objects, each list de-duplicated in order."""
    kept = {}
    for image, objects in gt.items():
        unique = list(dict.fromkeys(objects))
        if len(unique) >= N_POSITIVES:
            kept[image] = unique
    return kept


def _vocabulary(images: Mapping[str, list[str]]) -> list[str]:
    """Objects in order of first appearance."""
    return list(dict.fromkeys(o for objects in images.values() for o in objects))


def popularity_ranking(images: Mapping[str, list[str]]) -> list[str]:
    """Objects by decreasing number of images containing them; ties by first appearance."""
    freq = Counter(o for objects in images.values() for o in objects)
    order = {o: i for i, o in enumerate(_vocabulary(images))}
    return sorted(order, key=lambda o: (-freq[o], order[o]))


def cooccurrence_ranking(images: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """For each object, the objects seen with it in some image, by decreasing count; ties by first appearance."""
    order = {o: i for i, o in enumerate(_vocabulary(images))}
    counts: dict[str, Counter[str]] = {o: Counter() for o in order}
    for objects in images.values():
        for a in objects:
            counts[a].update(b for b in objects if b != a)
    return {a: sorted(c, key=lambda b: (-c[b], order[b])) for a, c in counts.items()}


def _random_negative(rng: random.Random, vocab: list[str], excluded: set[str], image: str) -> str:
    allowed = [o for o in vocab if o not in excluded]
    if not allowed:
        raise ValueError(f"vocabulary too small: no negative object left for image {image!r}")
    return rng.choice(allowed)


def _first_allowed(ranked: Iterable[str], excluded: set[str]) -> str | None:
    return next((o for o in ranked if o not in excluded), None)


def build_pope_questions(gt: Mapping[str, Sequence[str]], strategy: str, seed: int = 0) -> list[dict[str, Any]]:
    """POPE questions for one split.

    Args:
        gt: Ordered mapping image file name → ordered ground-truth object names.
        strategy: ``"random"``, ``"popular"`` or ``"adversarial"``.
        seed: Seed of the random draws (random strategy, and fallbacks of the others).

    Returns:
        Records ``{"question_id", "image", "text", "label"}`` in the official order: per image, positive then
        negative, three times; ``question_id`` starts at 1.

    Raises:
        ValueError: For an unknown strategy or a vocabulary too small to find a negative.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown POPE strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    images = _kept_images(gt)
    vocab = _vocabulary(images)
    popular = popularity_ranking(images)
    cooccur = cooccurrence_ranking(images)
    rng = random.Random(seed)
    questions: list[dict[str, Any]] = []

    def ask(image: str, obj: str, label: str) -> None:
        questions.append(
            {"question_id": len(questions) + 1, "image": image, "text": question_text(obj), "label": label}
        )

    for image, objects in images.items():
        excluded = set(objects)  # present objects, plus every object already asked about
        for positive in objects[:N_POSITIVES]:
            ask(image, positive, "yes")
            ranked = {"popular": popular, "adversarial": cooccur[positive]}.get(strategy, ())
            negative = _first_allowed(ranked, excluded) or _random_negative(rng, vocab, excluded, image)
            excluded.add(negative)
            ask(image, negative, "no")
    return questions


def write_pope_files(
    gt: Mapping[str, Sequence[str]],
    out_dir: str | Path,
    prefix: str,
    seed: int = 0,
    splits: Sequence[str] = STRATEGIES,
) -> dict[str, Path]:
    """Write ``{prefix}_pope_{split}.json`` (JSON Lines, official COCO POPE format) for each split.

    Args:
        gt: Ordered mapping image file name → ordered ground-truth object names.
        out_dir: Output directory (created if needed).
        prefix: File name prefix, e.g. ``"coco"``.
        seed: Seed used for every split.
        splits: Strategies to write.

    Returns:
        Split name → written path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in splits:
        path = out / f"{prefix}_pope_{split}.json"
        lines = (json.dumps(q) + "\n" for q in build_pope_questions(gt, split, seed))
        path.write_text("".join(lines), encoding="utf-8")
        paths[split] = path
    return paths


def load_ground_truth(path: str | Path) -> dict[str, list[str]]:
    """Read ground truth as ``{image: [objects]}``.

    Accepts a JSON mapping ``{image: [objects]}`` or POPE's ``{"image": ..., "objects": [...]}`` records as a
    JSON array or JSON Lines (its segmentation files).
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict) and set(data) == {"image", "objects"}:
        data = [data]
    if isinstance(data, dict):
        return {str(k): list(v) for k, v in data.items()}
    return {str(r["image"]): list(r["objects"]) for r in data}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m shapes.pope_build GT_JSON OUT_DIR --prefix coco --seed 0``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ground_truth", help="JSON {image: [objects]} or POPE {image, objects} records")
    parser.add_argument("out_dir")
    parser.add_argument("--prefix", default="coco")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", nargs="+", default=list(STRATEGIES))
    args = parser.parse_args(argv)
    paths = write_pope_files(load_ground_truth(args.ground_truth), args.out_dir, args.prefix, args.seed, args.splits)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
