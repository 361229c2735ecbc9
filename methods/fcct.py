r"""FCCT — fine-grained cross-modal causal tracing, the offline calibration of IRI.

"Causal Tracing of Object Representations in Large Vision Language Models…", AAAI 2026, arXiv 2511.05923 (no
official code).

    python -m methods.calibrate fcct --model llava [--path DIR_OR_ID] [--n 64] [--noise 3.0] [--out FILE]

For yes-questions about an object that IS in the image ("Is there a {object} in the image?"), with ``P`` the
probability of the answer's first token (``--answer``, default "Yes") at the first generated position:

1. **Clean** run: ``P_clean``; every component's output is recorded.
2. **Corrupted** run: Gaussian noise on the whole image, ``pixel_values + σ·N(0, 1)`` with
   ``σ = noise × std(pixel_values)`` (the paper does not give its scale; ``noise = 3`` follows ROME's causal
   tracing), the same draw for every run of a sample: ``P_corr``.
3. **Patched** runs: corrupted input, but ONE component at ONE layer restored from the clean run at ONE token
   category's positions: ``P_patch``. Components: ``hidden`` (the hidden state entering layer l, site
   ``lm.layers.{l}.resid_pre``; layer 0 = the input embeddings), ``attn`` (``lm.layers.{l}.attn_out``), ``mlp``
   (``lm.layers.{l}.mlp_out``).
4. **Recovery rate** ``RR = Σ (P_patch − P_corr) / Σ (P_clean − P_corr)`` over the samples whose corruption
   matters (``P_clean − P_corr ≥ min_gap``; a ratio of sums, so near-zero gaps cannot blow it up).

Token categories (per prompt; positions, left padding excluded):
    early_visual / late_visual: visual tokens before the first / after the last object token (sequence order);
    object_visual: visual tokens whose cell (``adapter.tile_frames``) overlaps the object's box by ≥ 25 % of the
        cell (at least the cell holding its centre);
    early_text: instruction tokens before the object word; text_object: the object word's tokens;
    late_text: every token after the object word except the last; last: the last prompt token.

Output: ``iri_fcct.json`` (``rr[component][category]`` = one value per layer, the probabilities, sample counts,
σ) and a heatmap PNG beside it. Default probes: fresh shapes-world scenes of an ``fcct`` split (the largest object
of each, never the evaluation images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from adapters.base import Adapter
from adapters.geometry import box_overlap
from methods.intervention import Step, attach

COMPONENTS = ("hidden", "attn", "mlp")
CATEGORIES = ("early_visual", "object_visual", "late_visual", "early_text", "text_object", "late_text", "last")
FCCT_FILE = "iri_fcct.json"
QUESTION = "Is there a {} in the image?\nAnswer the question using a single word or phrase."
MIN_OVERLAP = 0.25


@dataclass(frozen=True)
class Probe:
    """One traced question: an image, the object asked about, its box ``(x0, y0, x1, y1)`` in pixels."""

    image: Image.Image
    word: str
    box: tuple[float, float, float, float]
    text: str = ""

    @property
    def question(self) -> str:
        """The prompt text (``text`` when given, else the standard yes/no question about ``word``)."""
        return self.text or QUESTION.format(self.word)


# ---------------------------------------------------------------------------------------------- categories
def _word_positions(adapter: Adapter, ids: torch.Tensor, span: tuple[int, int], word: str) -> list[int]:
    """Positions of ``word``'s tokens inside the instruction ``span`` of one row (its last occurrence)."""
    tok = getattr(adapter.processor, "tokenizer", adapter.processor)
    row = ids[span[0] : span[1]].tolist()
    for variant in (" " + word, word):
        sub = tok(variant, add_special_tokens=False)["input_ids"]
        hits = [i for i in range(len(row) - len(sub) + 1) if row[i : i + len(sub)] == sub]
        if sub and hits:
            return list(range(span[0] + hits[-1], span[0] + hits[-1] + len(sub)))
    raise ValueError(f"the object word {word!r} is not among the instruction's tokens")


def _object_tokens(cells: torch.Tensor, box: tuple[float, ...]) -> torch.Tensor:
    """Visual tokens whose cell ``[n, 4]`` overlaps ``box`` by ≥ MIN_OVERLAP (else the cell holding its centre)."""
    hit = box_overlap(cells, torch.tensor(box, dtype=torch.float64)) >= MIN_OVERLAP
    if hit.any():
        return hit
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return (cells[:, 0] <= cx) & (cx < cells[:, 2]) & (cells[:, 1] <= cy) & (cy < cells[:, 3])


def token_categories(adapter: Adapter, inputs: dict[str, Any], probes: list[Probe]) -> dict[str, torch.Tensor]:
    """The seven categories' position masks ``{category: [batch, seq] bool}``, plus ``all`` and ``none``."""
    ids = inputs["input_ids"]
    batch, seq = ids.shape
    visual = adapter.image_token_mask(inputs).cpu()  # [batch, seq]
    real = inputs["attention_mask"].bool().cpu()
    out = {name: torch.zeros(batch, seq, dtype=torch.bool) for name in CATEGORIES}
    pos = torch.arange(seq)
    rows = zip(probes, adapter.instruction_spans(inputs), adapter.token_cells(inputs), strict=True)
    for b, (probe, span, (cells, _images)) in enumerate(rows):
        vis_pos = visual[b].nonzero().flatten()
        obj = torch.zeros(seq, dtype=torch.bool)
        obj[vis_pos[_object_tokens(cells, probe.box)]] = True
        first, last = obj.nonzero().min(), obj.nonzero().max()
        out["object_visual"][b] = obj
        out["early_visual"][b] = visual[b] & (pos < first)
        out["late_visual"][b] = visual[b] & (pos > last)
        words = _word_positions(adapter, ids[b].cpu(), span, probe.word)
        out["text_object"][b, words] = True
        out["early_text"][b] = (pos >= span[0]) & (pos < words[0])
        out["late_text"][b] = (pos > words[-1]) & (pos < seq - 1)
        out["last"][b, seq - 1] = True
    out["all"] = real  # checks: every real token (full restoration) and none (the corrupted run)
    out["none"] = torch.zeros(batch, seq, dtype=torch.bool)
    return out


# ---------------------------------------------------------------------------------------------- tracing
class _Patcher:
    """Records every component in the clean run and restores one (component, layer, positions) when patching."""

    def __init__(self) -> None:
        self.mode: str | None = None  # "record" | "patch" | None
        self.clean: dict[tuple[str, int], torch.Tensor] = {}
        self.target: tuple[str, int, torch.Tensor] | None = None  # component, layer, positions [batch, seq]

    def site(self, component: str, layer: int):
        def fn(x: torch.Tensor, step: Step) -> torch.Tensor | None:  # x: [batch, seq, d]
            if self.mode == "record":
                self.clean[(component, layer)] = x.detach().clone()
            elif self.mode == "patch" and self.target[:2] == (component, layer):
                where = self.target[2].to(x.device)[..., None]  # [batch, seq, 1]
                return torch.where(where, self.clean[(component, layer)], x)
            return None

        return fn


def answer_prob(adapter: Adapter, inputs: dict[str, Any], answer_id: int) -> torch.Tensor:
    """``P(answer token)`` at the first generated position, ``[batch]``."""
    logits = adapter.forward(inputs, logits_to_keep=1).logits[:, -1].float()  # [batch, vocab]
    return torch.softmax(logits, -1)[:, answer_id].cpu()


def corrupt(inputs: dict[str, Any], noise: float, seed: int) -> tuple[dict[str, Any], float]:
    """``inputs`` with Gaussian noise ``σ = noise × std(pixel_values)`` on the pixels; returns ``(inputs, σ)``."""
    pixels = inputs["pixel_values"]
    sigma = noise * float(pixels.float().std())
    gen = torch.Generator().manual_seed(seed)
    draw = torch.randn(pixels.shape, generator=gen).to(pixels.device, pixels.dtype)
    return {**inputs, "pixel_values": pixels + sigma * draw}, sigma


def trace_batch(
    adapter: Adapter, probes: list[Probe], answer_id: int, noise: float, seed: int,
    categories: tuple[str, ...] = CATEGORIES, components: tuple[str, ...] = COMPONENTS,
) -> dict[str, Any]:  # fmt: skip
    """Clean, corrupted and every patched probability for one batch of probes.

    Returns:
        ``{"clean": [b], "corrupted": [b], "patched": {component: {category: [layers, b]}}, "sigma": σ}``.
    """
    prompts = [adapter.format_prompt(p.question) for p in probes]
    inputs = adapter.build_inputs(prompts, [[p.image] for p in probes])
    cats = token_categories(adapter, inputs, probes)
    n_layers = adapter.num_layers("lm")
    patcher = _Patcher()
    with torch.inference_mode(), attach(adapter, "fcct", {"resid", "outputs"}) as handle:
        for layer in range(n_layers):
            handle.resid_pre([layer], patcher.site("hidden", layer))
            handle.attn_out([layer], patcher.site("attn", layer))
            handle.mlp_out([layer], patcher.site("mlp", layer))
        patcher.mode = "record"
        clean = answer_prob(adapter, inputs, answer_id)
        noisy, sigma = corrupt(inputs, noise, seed)
        patcher.mode = None
        corrupted = answer_prob(adapter, noisy, answer_id)
        patcher.mode = "patch"
        patched = {comp: {cat: torch.zeros(n_layers, len(probes)) for cat in categories} for comp in components}
        for comp in components:
            for cat in categories:
                for layer in range(n_layers):
                    patcher.target = (comp, layer, cats[cat])
                    patched[comp][cat][layer] = answer_prob(adapter, noisy, answer_id)
    return {"clean": clean, "corrupted": corrupted, "patched": patched, "sigma": sigma}


def recovery(parts: list[dict[str, Any]], min_gap: float = 0.1) -> dict[str, Any]:
    """Recovery rates from :func:`trace_batch` results: ``RR = Σ(P_patch − P_corr) / Σ(P_clean − P_corr)``."""
    clean = torch.cat([p["clean"] for p in parts])
    corrupted = torch.cat([p["corrupted"] for p in parts])
    used = (clean - corrupted) >= min_gap  # [n]
    gap = float((clean - corrupted)[used].sum())
    comps = parts[0]["patched"]

    def rate(comp: str, cat: str) -> list[float]:
        patched = torch.cat([p["patched"][comp][cat] for p in parts], 1)  # [layers, n]
        if gap <= 0:
            return [float("nan")] * patched.shape[0]
        return [round(float(v), 5) for v in (patched - corrupted)[:, used].sum(1) / gap]

    rr = {comp: {cat: rate(comp, cat) for cat in comps[comp]} for comp in comps}
    return {
        "rr": rr,
        "p_clean": round(float(clean.mean()), 5),
        "p_corrupted": round(float(corrupted.mean()), 5),
        "samples": len(clean),
        "samples_used": int(used.sum()),
        "min_gap": min_gap,
    }


def trace(adapter: Adapter, probes: list[Probe], answer: str = "Yes", noise: float = 3.0, batch_size: int = 8,
          min_gap: float = 0.1, seed: int = 0, categories: tuple[str, ...] = CATEGORIES) -> dict[str, Any]:  # fmt: skip
    """FCCT over ``probes`` on a loaded adapter; the calibration document (see the module docstring)."""
    answer_id = adapter.answer_token_id(answer)
    parts = [trace_batch(adapter, probes[i : i + batch_size], answer_id, noise, seed + i, categories)
             for i in range(0, len(probes), batch_size)]  # fmt: skip
    result = recovery(parts, min_gap)
    if result["samples_used"] == 0:
        raise ValueError(f"no probe loses ≥ {min_gap} of P({answer!r}) under noise {noise}: nothing to trace "
                         f"(P_clean {result['p_clean']}, P_corrupted {result['p_corrupted']})")  # fmt: skip
    sigmas = [p["sigma"] for p in parts]
    return {"model": adapter.path, "answer": answer, "noise": noise, "sigma": round(float(np.mean(sigmas)), 5),
            "layers": adapter.num_layers("lm"), "components": list(COMPONENTS), "categories": list(categories),
            **result}  # fmt: skip


# ---------------------------------------------------------------------------------------------- outputs
def heatmap(cal: dict[str, Any], path: Path, cell: int = 28) -> None:
    """One panel per component (rows = categories, columns = layers), RR clipped to [0, 1], JET colours."""
    cats, n_layers = cal["categories"], cal["layers"]
    label_w, gap = 110, 12
    panels = []
    for comp in cal["components"]:
        rr = np.nan_to_num(np.array([cal["rr"][comp][c] for c in cats], dtype=np.float64))  # [cats, layers]
        colours = cv2.applyColorMap((np.clip(rr, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
        grid = cv2.resize(colours, (n_layers * cell, len(cats) * cell), interpolation=cv2.INTER_NEAREST)
        panel = np.full((len(cats) * cell + 2 * cell, label_w + n_layers * cell, 3), 255, np.uint8)
        panel[cell : cell + len(cats) * cell, label_w:] = grid
        cv2.putText(panel, f"{comp}  (RR, 0..1)", (4, cell - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        for i, c in enumerate(cats):
            cv2.putText(panel, c, (2, cell + i * cell + cell // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1)
        step = max(1, n_layers // 8)
        for layer in range(0, n_layers, step):
            x = label_w + layer * cell + 4
            cv2.putText(panel, str(layer), (x, panel.shape[0] - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1)
        panels.append(panel)
    spacer = np.full((panels[0].shape[0], gap, 3), 255, np.uint8)
    image = np.concatenate([x for p in panels for x in (p, spacer)][:-1], 1)
    cv2.imwrite(str(path), image)  # BGR colours as cv2 expects
