"""Shapes world: seeded synthetic scenes of coloured shapes with exact ground truth (OpenCV drawing).

A scene holds ``min_objects``..``max_objects`` objects of DISTINCT shape classes, each with a random colour,
position and size (overlap allowed, later objects drawn on top). Ground truth is the ordered list of shape
classes as drawn, which is what POPE's builder needs (its positives are the first three listed objects).

Co-occurrence structure: for each declared pair ``(a, b)``, a scene that contains ``a`` also gets ``b`` with
probability ``pair_prob`` (when there is room), so P(b | a) is well above the base rate. This is the language
prior that POPE's adversarial split probes. Everything is a pure function of the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

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
DEFAULT_PAIRS = (("circle", "square"), ("star", "triangle"), ("ring", "cross"))


@dataclass(frozen=True)
class SceneObject:
    """One drawn object."""

    shape: str
    colour: str
    center: tuple[int, int]
    radius: int


@dataclass(frozen=True)
class WorldSpec:
    """Generator parameters (defaults suit CPU-sized models)."""

    image_size: int = 64
    min_objects: int = 3
    max_objects: int = 4
    pairs: tuple[tuple[str, str], ...] = DEFAULT_PAIRS
    pair_prob: float = 0.8
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = field(default=tuple(COLOURS))


def _polygon(shape: str, cx: int, cy: int, r: int) -> np.ndarray:
    if shape == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        radii = [r] * 3
    elif shape == "diamond":
        angles = np.deg2rad([-90, 0, 90, 180])
        radii = [r, 0.7 * r, r, 0.7 * r]
    elif shape == "hexagon":
        angles = np.deg2rad(np.arange(6) * 60)
        radii = [r] * 6
    elif shape == "star":
        angles = np.deg2rad(np.arange(10) * 36 - 90)
        radii = [r if i % 2 == 0 else 0.45 * r for i in range(10)]
    else:
        raise ValueError(shape)
    pts = [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a, rad in zip(angles, radii, strict=True)]
    return np.round(np.array(pts)).astype(np.int32)


def draw_object(img: np.ndarray, obj: SceneObject) -> None:
    """Draw one object in place on an RGB uint8 image."""
    (cx, cy), r, col = obj.center, obj.radius, COLOURS[obj.colour]
    if obj.shape == "circle":
        cv2.circle(img, (cx, cy), r, col, -1, lineType=cv2.LINE_AA)
    elif obj.shape == "ring":
        cv2.circle(img, (cx, cy), r, col, max(2, r // 3), lineType=cv2.LINE_AA)
    elif obj.shape == "square":
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), col, -1)
    elif obj.shape == "cross":
        w = max(2, r // 3)
        cv2.rectangle(img, (cx - r, cy - w), (cx + r, cy + w), col, -1)
        cv2.rectangle(img, (cx - w, cy - r), (cx + w, cy + r), col, -1)
    else:
        cv2.fillPoly(img, [_polygon(obj.shape, cx, cy, r)], col, lineType=cv2.LINE_AA)


def sample_scene(rng: random.Random, spec: WorldSpec) -> list[SceneObject]:
    """Draw the object list of one scene (distinct shapes, co-occurrence pairs applied)."""
    n = rng.randint(spec.min_objects, spec.max_objects)
    shapes: list[str] = []
    while len(shapes) < n:
        s = rng.choice([x for x in spec.shapes if x not in shapes])
        shapes.append(s)
        for a, b in spec.pairs:
            if s == a and b not in shapes and len(shapes) < n and rng.random() < spec.pair_prob:
                shapes.append(b)
    size = spec.image_size
    objs = []
    for s in shapes:
        r = rng.randint(max(3, size // 12), max(4, size // 6))
        objs.append(
            SceneObject(s, rng.choice(spec.colours), (rng.randint(r, size - r - 1), rng.randint(r, size - r - 1)), r)
        )
    return objs


def render(objs: list[SceneObject], spec: WorldSpec, rng: random.Random) -> np.ndarray:
    """Render a scene to an RGB uint8 array ``[H, W, 3]`` on a dark, slightly varying background."""
    img = np.zeros((spec.image_size, spec.image_size, 3), np.uint8)
    img[:] = rng.randint(0, 40)
    for o in objs:
        draw_object(img, o)
    return img


def generate(n_images: int, seed: int, spec: WorldSpec = WorldSpec()) -> list[tuple[np.ndarray, list[SceneObject]]]:
    """``n_images`` scenes, deterministic in ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_images):
        objs = sample_scene(rng, spec)
        out.append((render(objs, spec, rng), objs))
    return out
