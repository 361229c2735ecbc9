"""Shapes world: seeded synthetic scenes of coloured shapes with exact ground truth (OpenCV drawing).

A controlled hallucination testbed. Every scene is a pure function of ``(seed, split, index)``:

* **Objects.** 1–4 objects (``min_objects``..``max_objects``) of DISTINCT shape classes from 8 shapes
  (:data:`SHAPES`), each with one of 6 colours (:data:`COLOURS`), a random centre and radius. Objects may
  overlap (later ones are drawn on top), but every object keeps at least ``min_visible`` of its own pixels
  visible; a placement that would hide more is redrawn, so the ground truth never lists an invisible object.
* **Co-occurrence prior.** Shapes come in declared pairs (:data:`DEFAULT_PAIRS`; each shape in exactly one
  pair). A scene draws a target count n ~ U{min_objects..max_objects}, then repeatedly draws an unused shape
  uniformly at random until it holds n; after each draw, with probability ``pair_prob`` the shape's partner
  is added too (even past n, up to ``max_objects``). With the default
  ``pair_prob=0.65`` and 1–4 objects this gives an empirical P(partner | shape) ≈ 0.8 against ≈ 0.25 for a
  non-partner (measured by :func:`world_statistics` and written to each export's metadata), so a model
  trained on the world learns "B tends to come with A": the language prior POPE's adversarial split probes.
* **Splits.** ``split`` names an independent random stream (``"train"``, ``"eval"``, ...). Exporters also
  record each image's content hash so a trainer can refuse any training image that equals an eval image.

Ground truth per scene: the ordered object list (drawing order), each with shape, colour, centre, radius and
visible fraction.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "hexagon")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 220),
    "white": (245, 245, 245),
}
DEFAULT_PAIRS = (("circle", "star"), ("square", "hexagon"), ("triangle", "ring"), ("cross", "diamond"))


@dataclass(frozen=True)
class SceneObject:
    """One drawn object (pixel coordinates; ``visible`` = fraction of its own pixels not covered)."""

    shape: str
    colour: str
    center: tuple[int, int]
    radius: int
    visible: float = 1.0


@dataclass(frozen=True)
class Scene:
    """A rendered scene and its ground truth."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    objects: tuple[SceneObject, ...]

    @property
    def shapes(self) -> list[str]:
        """Shape classes in drawing order."""
        return [o.shape for o in self.objects]

    @property
    def digest(self) -> str:
        """Content hash of the pixels (train/eval disjointness checks)."""
        return image_digest(self.image)


@dataclass(frozen=True)
class WorldSpec:
    """Generator parameters (defaults suit CPU-trained models)."""

    image_size: int = 64  # square side in pixels
    min_objects: int = 1
    max_objects: int = 4
    pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS
    pair_prob: float = 0.65  # P(add partner | shape drawn) → P(partner present | shape present) ≈ 0.8
    radius: tuple[float, float] = (0.12, 0.19)  # object radius range as a fraction of image_size
    min_visible: float = 0.75  # every object keeps at least this fraction of its pixels visible
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = field(default=tuple(COLOURS))

    def partner(self, shape: str) -> str | None:
        """The shape's declared partner, if any."""
        for a, b in self.pairs:
            if shape in (a, b):
                return b if shape == a else a
        return None


def absent_partners(present: list[str], pairs: tuple[tuple[str, str], ...]) -> list[str]:
    """Declared partners of the ``present`` shapes that are themselves absent, in the order of ``present``."""
    partner = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    return [partner[s] for s in present if s in partner and partner[s] not in present]


def image_digest(image: np.ndarray) -> str:
    """SHA-256 (first 16 hex) of an image's bytes."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: int, cy: int, r: int) -> np.ndarray:
    if shape == "triangle":
        angles, radii = np.deg2rad([-90, 30, 150]), [r] * 3
    elif shape == "diamond":
        angles, radii = np.deg2rad([-90, 0, 90, 180]), [r, 0.65 * r, r, 0.65 * r]
    elif shape == "hexagon":
        angles, radii = np.deg2rad(np.arange(6) * 60), [r] * 6
    elif shape == "star":
        angles, radii = np.deg2rad(np.arange(10) * 36 - 90), [r if i % 2 == 0 else 0.45 * r for i in range(10)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    pts = [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a, rad in zip(angles, radii, strict=True)]
    return np.round(np.array(pts)).astype(np.int32)


def draw_object(img: np.ndarray, obj: SceneObject, colour: tuple[int, int, int] | None = None) -> None:
    """Draw one object in place on an ``[H, W, 3]`` (or ``[H, W]``) uint8 image."""
    (cx, cy), r = obj.center, obj.radius
    col = colour if colour is not None else COLOURS[obj.colour]
    if obj.shape == "circle":
        cv2.circle(img, (cx, cy), r, col, -1)
    elif obj.shape == "ring":
        cv2.circle(img, (cx, cy), r, col, max(2, r // 3))
    elif obj.shape == "square":
        s = round(r * 0.85)
        cv2.rectangle(img, (cx - s, cy - s), (cx + s, cy + s), col, -1)
    elif obj.shape == "cross":
        w = max(2, r // 3)
        cv2.rectangle(img, (cx - r, cy - w), (cx + r, cy + w), col, -1)
        cv2.rectangle(img, (cx - w, cy - r), (cx + w, cy + r), col, -1)
    else:
        cv2.fillPoly(img, [_polygon(obj.shape, cx, cy, r)], col)


def _mask(obj: SceneObject, size: int) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    draw_object(m, obj, colour=(1,))
    return m.astype(bool)


# ----------------------------------------------------------------------------------------------- sampling
def sample_shapes(rng: random.Random, spec: WorldSpec) -> list[str]:
    """The shape classes of one scene, in drawing order, with the co-occurrence rule applied."""
    n = rng.randint(spec.min_objects, spec.max_objects)
    shapes: list[str] = []
    while len(shapes) < n:
        s = rng.choice([x for x in spec.shapes if x not in shapes])
        shapes.append(s)
        partner = spec.partner(s)
        if partner and partner not in shapes and len(shapes) < spec.max_objects and rng.random() < spec.pair_prob:
            shapes.append(partner)
    return shapes


def _place(rng: random.Random, spec: WorldSpec, shapes: list[str]) -> list[SceneObject] | None:
    size = spec.image_size
    lo, hi = (max(3, round(f * size)) for f in spec.radius)
    objs = [SceneObject(s, rng.choice(spec.colours), (0, 0), rng.randint(lo, hi)) for s in shapes]
    objs = [
        SceneObject(
            o.shape,
            o.colour,
            (rng.randint(o.radius, size - o.radius - 1), rng.randint(o.radius, size - o.radius - 1)),
            o.radius,
        )
        for o in objs
    ]
    masks = [_mask(o, size) for o in objs]
    placed = []
    for i, (o, m) in enumerate(zip(objs, masks, strict=True)):
        covered = np.zeros_like(m)
        for later in masks[i + 1 :]:
            covered |= later
        visible = float((m & ~covered).sum() / max(1, m.sum()))
        if visible < spec.min_visible:
            return None
        placed.append(SceneObject(o.shape, o.colour, o.center, o.radius, round(visible, 3)))
    return placed


def sample_scene(rng: random.Random, spec: WorldSpec, max_tries: int = 100) -> list[SceneObject]:
    """Object list of one scene: shapes by :func:`sample_shapes`, placements redrawn until all are visible."""
    shapes = sample_shapes(rng, spec)
    for _ in range(max_tries):
        objs = _place(rng, spec, shapes)
        if objs is not None:
            return objs
    raise RuntimeError(f"could not place {shapes} with min_visible={spec.min_visible} in {max_tries} tries")


def render(objs: list[SceneObject], spec: WorldSpec, rng: random.Random) -> np.ndarray:
    """Render objects on a dark, slightly varying background. Returns ``[H, W, 3]`` uint8 RGB."""
    img = np.zeros((spec.image_size, spec.image_size, 3), np.uint8)
    img[:] = rng.randint(0, 40)
    for o in objs:
        draw_object(img, o)
    return img


def scene_rng(seed: int, split: str, index: int) -> random.Random:
    """Independent, reproducible random stream of one scene."""
    return random.Random(f"shapes-world/{seed}/{split}/{index}")


def make_scene(seed: int, split: str, index: int, spec: WorldSpec = WorldSpec()) -> Scene:
    """Scene ``index`` of ``split`` (deterministic; random access, no need to generate the ones before)."""
    rng = scene_rng(seed, split, index)
    objs = sample_scene(rng, spec)
    return Scene(render(objs, spec, rng), tuple(objs))


def generate(n_images: int, seed: int, spec: WorldSpec = WorldSpec(), split: str = "eval") -> list[Scene]:
    """Scenes ``0..n_images-1`` of ``split``."""
    return [make_scene(seed, split, i, spec) for i in range(n_images)]


# ----------------------------------------------------------------------------------------------- statistics
def world_statistics(scenes: list[Scene], spec: WorldSpec) -> dict[str, Any]:
    """Measured co-occurrence and frequency statistics of a set of scenes (for metadata files)."""
    present = [set(s.shapes) for s in scenes]
    n_with = Counter(x for p in present for x in p)

    def cond(b: str, a: str) -> float | None:
        with_a = [p for p in present if a in p]
        return round(sum(b in p for p in with_a) / len(with_a), 4) if with_a else None

    pair_set = {frozenset(p) for p in spec.pairs}
    partner = [cond(b, a) for a, b in spec.pairs] + [cond(a, b) for a, b in spec.pairs]
    others = [cond(b, a) for a, b in itertools.permutations(spec.shapes, 2) if frozenset((a, b)) not in pair_set]
    mean = lambda xs: round(float(np.mean([x for x in xs if x is not None])), 4)  # noqa: E731
    return {
        "n_images": len(scenes),
        "spec": {k: v for k, v in asdict(spec).items()},
        "p_partner_given_shape": {f"{b}|{a}": cond(b, a) for a, b in spec.pairs}
        | {f"{a}|{b}": cond(a, b) for a, b in spec.pairs},
        "mean_p_partner_given_shape": mean(partner),
        "mean_p_nonpartner_given_shape": mean(others),
        "shape_frequency": {s: round(n_with[s] / len(scenes), 4) for s in spec.shapes},
        "objects_per_image": dict(sorted(Counter(len(s.objects) for s in scenes).items())),
        "colour_frequency": dict(Counter(o.colour for s in scenes for o in s.objects)),
        "min_visible_fraction": min((o.visible for s in scenes for o in s.objects), default=None),
    }


# ----------------------------------------------------------------------------------------------- language
# The world's shared language: captions, synonyms and yes/no questions. Used by the benchmark exporters
# (shapes/export.py) and by trainers, so every function here is a pure function of (scene, rng): the
# same scene and an rng in the same state give the same text, and ``rng`` is only consumed, never seeded.
# Shape and colour words are always the canonical ones (:data:`SHAPES`, :data:`COLOURS`) except in
# :func:`reference_caption`, which may use :data:`SYNONYMS` (CHAIR's reference captions).

#: Canonical shape → synonyms (single nouns, so CHAIR's lemmatizer handles plurals such as "boxes", "discs").
#: No word appears twice and none is a canonical name; one line each of CHAIR's ``synonyms.txt``.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "disk", "dot"),
    "square": ("box", "block", "rectangle"),
    "triangle": ("pyramid", "wedge"),
    "star": ("pentagram", "starburst"),
    "cross": ("plus", "crucifix"),
    "diamond": ("rhombus", "lozenge"),
    "ring": ("hoop", "donut", "doughnut", "annulus"),
    "hexagon": ("hex",),
}
#: Caption templates; ``{}`` is the object list. The first one is the canonical (``rng=None``) form.
CAPTION_TEMPLATES = ("There is {}.", "The image shows {}.", "I can see {}.", "The picture contains {}.")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
YES, NO = "Yes", "No"
QA = tuple[str, str]


def article(word: str) -> str:
    """``"an"`` before a vowel-initial word, ``"a"`` otherwise."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def object_phrase(obj: SceneObject, name: str | None = None) -> str:
    """``"a red circle"``: article, colour and shape name (``name`` overrides the shape word)."""
    return f"{article(obj.colour)} {obj.colour} {name or obj.shape}"


def list_phrase(phrases: list[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _choice(rng: random.Random | None, items: list[Any]) -> Any:
    """``rng.choice(items)``, or the first item when ``rng`` is None (deterministic canonical form)."""
    return items[0] if rng is None else rng.choice(items)


def _describe(scene: Scene, rng: random.Random | None, names: list[str]) -> str:
    """One sentence listing every object once (``names[i]`` names object ``i``)."""
    order = list(range(len(scene.objects)))
    if rng is not None:
        rng.shuffle(order)
    phrases = [object_phrase(scene.objects[i], names[i]) for i in order]
    return _choice(rng, list(CAPTION_TEMPLATES)).format(list_phrase(phrases))


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A short description mentioning every object exactly once, by colour and canonical shape name.

    Args:
        scene: The scene to describe.
        rng: Varies the template (:data:`CAPTION_TEMPLATES`) and the object order. ``None`` gives the canonical
            form: drawing order and ``"There is ..."``, e.g. ``"There is a red circle, a blue star and a white
            square."``

    Returns:
        The caption (one sentence ending with a full stop).
    """
    return _describe(scene, rng, [o.shape for o in scene.objects])


def reference_caption(scene: Scene, rng: random.Random, synonym_prob: float = 0.5) -> str:
    """Like :func:`caption`, but each shape is named by a random synonym with probability ``synonym_prob``.

    Used for CHAIR's human-style reference captions, so that CHAIR's synonym mapping is exercised. Every object
    is still mentioned exactly once (by its canonical name or one of its :data:`SYNONYMS`).
    """
    names = [rng.choice(SYNONYMS[o.shape]) if rng.random() < synonym_prob else o.shape for o in scene.objects]
    return _describe(scene, rng, names)


def _polarity(rng: random.Random | None, answer: str | None) -> str:
    """The requested answer, or a fair coin flip (``"Yes"`` when ``rng`` is None)."""
    if answer is None:
        return YES if rng is None or rng.random() < 0.5 else NO
    if answer not in (YES, NO):
        raise ValueError(f"answer must be 'Yes', 'No' or None, got {answer!r}")
    return answer


def qa_existence(scene: Scene, rng: random.Random | None, answer: str | None = None) -> QA | None:
    """``"Is there a/an {shape} in the image?"``.

    Args:
        scene: The scene asked about.
        rng: Chooses the polarity (when ``answer`` is None) and the shape; ``None`` takes the first candidate.
        answer: Force ``"Yes"`` (a present shape) or ``"No"`` (a shape of :data:`SHAPES` absent from the scene);
            ``None`` picks one at random, 50/50.

    Returns:
        ``(question, answer)``, or None when the forced polarity is impossible (no absent shape left).
    """
    pol = _polarity(rng, answer)
    present = scene.shapes
    candidates = present if pol == YES else [s for s in SHAPES if s not in present]
    if not candidates:
        return None
    return existence_question(_choice(rng, candidates)), pol


def existence_question(shape: str) -> str:
    """``"Is there a/an {shape} in the image?"`` (POPE's wording)."""
    return f"Is there {article(shape)} {shape} in the image?"


def count_question(n: int) -> str:
    """``"Is there one object in the image?"`` / ``"Are there {n} objects in the image?"`` (n in words)."""
    word = NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)
    return "Is there one object in the image?" if n == 1 else f"Are there {word} objects in the image?"


def qa_count(scene: Scene, rng: random.Random | None, answer: str | None = None) -> QA:
    """``"Are there {n} objects in the image?"``; a No question asks a wrong count within ±2 (and ≥ 1)."""
    pol = _polarity(rng, answer)
    n = len(scene.objects)
    wrong = [k for k in range(max(1, n - 2), n + 3) if k != n]
    return count_question(n if pol == YES else _choice(rng, wrong)), pol


def qa_colour(scene: Scene, rng: random.Random | None, answer: str | None = None) -> QA:
    """``"Is the {shape} {colour}?"`` about a present shape; a No question names another colour of the world."""
    pol = _polarity(rng, answer)
    obj = _choice(rng, list(scene.objects))
    colour = obj.colour if pol == YES else _choice(rng, [c for c in COLOURS if c != obj.colour])
    return f"Is the {obj.shape} {colour}?", pol


#: Relation → (question template, axis 0=x 1=y, sign): true when sign * (b - a) on the axis ≥ the margin.
RELATIONS = {
    "left": ("Is the {a} to the left of the {b}?", 0, 1),
    "right": ("Is the {a} to the right of the {b}?", 0, -1),
    "above": ("Is the {a} above the {b}?", 1, 1),
    "below": ("Is the {a} below the {b}?", 1, -1),
}


def position_facts(scene: Scene, margin: float = 1 / 8) -> list[tuple[str, str, str, bool]]:
    """Every unambiguous pairwise relation ``(shape_a, relation, shape_b, holds)`` of a scene.

    A relation between two objects is unambiguous when their centres differ by at least ``margin`` × image
    width along its axis (x for left/right, y for above/below; y grows downwards); otherwise it is left out.
    """
    limit = margin * scene.image.shape[1]
    facts = []
    for a, b in itertools.permutations(scene.objects, 2):
        for rel, (_, axis, sign) in RELATIONS.items():
            delta = sign * (b.center[axis] - a.center[axis])
            if abs(delta) >= limit:
                facts.append((a.shape, rel, b.shape, delta > 0))
    return facts


def qa_position(scene: Scene, rng: random.Random | None, answer: str | None = None) -> QA | None:
    """``"Is the {a} to the left of the {b}?"`` (or right of / above / below), about two present shapes.

    Only unambiguous relations are asked (see :func:`position_facts`: centres at least 1/8 of the image apart
    along the relation's axis).

    Returns:
        ``(question, answer)``, or None when the scene has no unambiguous pair (e.g. a single object).
    """
    pol = _polarity(rng, answer)
    facts = [f for f in position_facts(scene) if f[3] == (pol == YES)]
    if not facts:
        return None
    a, rel, b, _ = _choice(rng, facts)
    return RELATIONS[rel][0].format(a=a, b=b), pol
