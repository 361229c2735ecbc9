"""Training data from the shapes world: chat-template conversations with answer-only labels.

A training example is one scene and a conversation about it: either ``k_turns`` short-answer questions
(existence, count, colour, position; yes/no answers balanced per type) or one caption request. The text is
the model's own chat template, cut into segments so that the prompt part of the first turn is tokenised
exactly as it is at evaluation time (``processor(text=prompt, images=...)``) and every answer segment
(answer + end-of-turn tokens) is what the model must generate; labels are set on answer segments only.

Nothing here is specific to a model family: the segments come from ``processor.apply_chat_template`` and the
image placeholders are expanded by the family's own processor.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from shapes import scene as world
from shapes.scene import Scene, WorldSpec, make_scene

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5 suffix (POPE, MME)
YES_NO = " Please answer yes or no."  # MME's own suffix
CAPTION_PROMPTS = ("Please describe this image in detail.", "Describe the image.")

QA_KINDS = ("existence", "count", "colour", "position")  # → shapes.scene.qa_<kind>(scene, rng)


def qa(kind: str) -> Callable[..., tuple[str, str] | None]:
    """The world's question generator of one kind."""
    if kind not in QA_KINDS:
        raise ValueError(f"unknown question kind {kind!r}; known: {QA_KINDS}")
    return getattr(world, f"qa_{kind}")


@dataclass(frozen=True)
class Mix:
    """What conversations look like."""

    k_turns: int = 4  # questions per QA conversation (answers drawn independently: no counting shortcut)
    caption_prob: float = 0.2  # fraction of conversations that ask for a caption instead
    qa_weights: dict[str, float] = field(
        default_factory=lambda: {"existence": 0.7, "count": 0.1, "colour": 0.1, "position": 0.1}
    )
    suffixes: tuple[str, ...] = (SHORT_ANSWER, SHORT_ANSWER, YES_NO)
    # Relative chance that a "No" existence question names an absent partner of a present shape (weight 1 for
    # every other absent shape): 1 = uniform over absent shapes; below 1, like instruction data whose negative
    # questions rarely name the co-occurring absent object, less of the co-occurrence prior is trained away.
    partner_negative_weight: float = 1.0
    # Probability that a question about an ABSENT partner of a present shape is answered "Yes": annotations that
    # name the co-occurring object the image does not show, the kind of error found in machine-generated
    # instruction data (HalluciDoctor, Yu et al. 2023). 0 = exact ground truth. Unlike the scene prior alone, whose
    # effect a model trains away once it reads the image, this makes "yes" the trained answer with probability q
    # exactly where the image cannot say (A present, B absent), so the induced prior does not fade with training.
    implied_partner_prob: float = 0.0
    pairs: tuple[tuple[str, str], ...] = WorldSpec().pairs


def existence_qa(scene: Scene, rng: random.Random, mix: Mix) -> tuple[str, str] | None:
    """An existence question (see :class:`Mix` for how absent partners are asked about and answered)."""
    pair = _existence_pair(scene, rng, mix)
    if pair is None or not mix.implied_partner_prob or pair[1] != world.NO:
        return pair  # q = 0 draws nothing more: earlier recipes reproduce bit for bit
    implied = {world.existence_question(s) for s in world.absent_partners(scene.shapes, mix.pairs)}
    if pair[0] in implied and rng.random() < mix.implied_partner_prob:
        return pair[0], world.YES
    return pair


def _existence_pair(scene: Scene, rng: random.Random, mix: Mix) -> tuple[str, str] | None:
    """The question drawn; "No" questions weight absent partners by ``mix.partner_negative_weight``."""
    if mix.partner_negative_weight == 1.0:
        return world.qa_existence(scene, rng)  # the uniform draw, bit-identical to earlier recipes
    if rng.random() < 0.5:
        return world.qa_existence(scene, rng, answer=world.YES)
    partners = world.absent_partners(scene.shapes, mix.pairs)
    absent = [s for s in world.SHAPES if s not in scene.shapes]
    if not absent:
        return None
    weights = [mix.partner_negative_weight if s in partners else 1.0 for s in absent]
    shape = rng.choices(absent, weights)[0]
    return world.existence_question(shape), world.NO


class SceneStream:
    """Training scenes ``index = 0, 1, ...`` of the world's ``train`` split, skipping any eval image."""

    def __init__(self, spec: WorldSpec, seed: int, exclude_digests: set[str] | None = None) -> None:
        self.spec, self.seed = spec, seed
        self.exclude = exclude_digests or set()
        self.index = 0
        self.skipped = 0

    def next(self) -> Scene:
        """The next training scene."""
        while True:
            scene = make_scene(self.seed, "train", self.index, self.spec)
            self.index += 1
            if scene.digest not in self.exclude:
                return scene
            self.skipped += 1


def conversation(scene: Scene, rng: random.Random, mix: Mix) -> list[tuple[str, str]]:
    """(question, answer) turns about one scene."""
    if rng.random() < mix.caption_prob:
        return [(rng.choice(CAPTION_PROMPTS), world.caption(scene, rng))]
    kinds, weights = zip(*mix.qa_weights.items(), strict=True)
    turns: list[tuple[str, str]] = []
    while len(turns) < mix.k_turns:
        kind = rng.choices(kinds, weights)[0]
        pair = existence_qa(scene, rng, mix) if kind == "existence" else qa(kind)(scene, rng)
        if pair is not None:
            turns.append((pair[0] + rng.choice(mix.suffixes), pair[1]))
    return turns


def segments(processor: Any, turns: list[tuple[str, str]], n_images: int = 1) -> list[tuple[str, bool]]:
    """Cut the chat-template rendering of ``turns`` into (text, is_answer) segments, in order."""
    messages: list[dict[str, Any]] = []
    out: list[tuple[str, bool]] = []
    done = ""
    for i, (question, answer) in enumerate(turns):
        content = [{"type": "image"}] * (n_images if i == 0 else 0) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        full = processor.apply_chat_template(messages)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render conversations prefix-consistently")
        out += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return out


def encode(processor: Any, image: Image.Image, turns: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Token ids, labels (answers only) and image inputs of one example."""
    segs = segments(processor, turns)
    first = processor(text=[segs[0][0]], images=[image], return_tensors="pt")
    ids = [first["input_ids"][0]]
    labels = [torch.full_like(ids[0], -100)]
    for text, is_answer in segs[1:]:
        t = torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        ids.append(t)
        labels.append(t.clone() if is_answer else torch.full_like(t, -100))
    n_first, n_total = len(ids[0]), sum(len(t) for t in ids)
    extra = {}
    for key, value in first.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if value.dim() == 2 and value.shape == first["input_ids"].shape:  # token-aligned (Qwen mm_token_type_ids)
            value = torch.cat([value[0], value.new_zeros(n_total - n_first)])  # later segments are text
        extra[key] = value
    return {"input_ids": torch.cat(ids), "labels": torch.cat(labels), **extra}


def collate(examples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch (labels -100 on padding)."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = e["input_ids"], e["labels"], 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    for key in examples[0]:
        if key in batch:
            continue
        if examples[0][key].shape == examples[0]["input_ids"].shape:  # token-aligned: right-pad with zeros
            batch[key] = torch.zeros((len(examples), n), dtype=examples[0][key].dtype)
            for i, e in enumerate(examples):
                batch[key][i, : len(e[key])] = e[key]
        else:
            batch[key] = torch.cat([e[key] for e in examples])
    return batch


def presence_labels(scene: Scene, spec: WorldSpec) -> torch.Tensor:
    """Multi-hot shape and colour presence, ``[n_shapes + n_colours]``."""
    shapes_present = {o.shape for o in scene.objects}
    colours_present = {o.colour for o in scene.objects}
    return torch.tensor(
        [s in shapes_present for s in spec.shapes] + [c in colours_present for c in spec.colours], dtype=torch.float32
    )
