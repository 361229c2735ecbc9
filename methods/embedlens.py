r"""EmbedLens — which visual tokens carry meaning, probed against the LM's vocabulary; and two interventions.

"What Do Visual Tokens Really Encode?", CVPR 2026, arXiv 2603.00510; official code ``EIT-NLP/EmbedLens``
(``llava_llama_token_pruning.py``: ``find_useless_tokens``, ``remove_specified_tokens``, ``visual_tokens_entry``).
The model-free parts live in :mod:`methods.embedlens_probe`.

**Probe.** Each visual token's projector output ``v_j`` (its LM input embedding, site ``projector.out``) is compared
with every row ``E_t`` of the LM's input embedding table by cosine similarity; its ``top_k`` nearest ids are kept.
A token is a *ViT sink*, *LLM sink* or *dead* token when one of its nearest ids is that group's marker id
(priority in that order), otherwise *alive*. Published markers (LLaVA-1.5-7B's Vicuna vocabulary only):
ViT-sink 1141, LLM-sink 26673, dead 30296. Any other model is calibrated once
(``python -m methods.calibrate embedlens --model <option>``, see there for the reference criteria), which writes
``embedlens_markers.json`` beside the checkpoint.

Every run writes a per-image map (``embedlens/maps/<image digest>.png``: the image with each patch tinted by its
category) and one line per image to ``embedlens/tokens.jsonl``; the results file gets the category fractions over
all distinct images seen (``method_report``), so a resumed run reports the same numbers.

**Interventions** (``mode``):

* ``probe``: classify only; the model's computation is untouched.
* ``drop``: tokens of the ``drop`` groups never enter the LM; the others keep their original positions (gaps),
  as ``remove_specified_tokens`` does.
* ``inject``: the ``drop`` groups are removed and the alive visual tokens are absent from layers
  ``0 … entry_layer−1``; at ``entry_layer`` they enter with their raw projector outputs (``visual_tokens_entry``).
  Every token keeps its full-prompt position (the official code's renumbering of the text-only phase is not
  documented [U]; with nothing dropped, positions coincide with it after entry).

Families: LLaVA (the paper's). Others are refused before loading: the probe itself is family-agnostic, but the
marker calibration's pixel criterion for dead tokens reads LLaVA's square patch grid.

Hyperparameters:
    mode ("probe" | "drop" | "inject", default "probe").
    drop (list[str], default [vit_sink, llm_sink, dead]): groups removed by ``drop`` / ``inject``.
    entry_layer (int | "middle", default "middle"): ``inject``'s entry layer; "middle" = L // 2.
    top_k (int, default 3): nearest vocabulary ids per token.
    markers ("auto" | dict, default "auto"): group → token id; "auto": ``markers_file``, else
        ``embedlens_markers.json`` beside the checkpoint, else the published ids for the checkpoint's hub id.
    markers_file (str | None, default None): a calibration file elsewhere.
    maps (bool, default True): write per-image PNG maps.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

import torch

from adapters.base import Adapter
from methods.base import METHODS, LayerError, Method, UnsupportedError
from methods.embedlens_probe import GROUPS, MARKER_GROUPS, PUBLISHED_MARKERS, classify, nearest_vocab, save_map
from methods.intervention import attach

MARKER_FILE = "embedlens_markers.json"
MODES = ("probe", "drop", "inject")


def image_digest(image: Any) -> str:
    """A short content hash of a PIL image (map file names; distinct-image counting)."""
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()[:16]


@METHODS.register("embedlens")
class EmbedLens(Method):
    """EmbedLens probe, maps and interventions (see module docstring)."""

    name: ClassVar[str] = "embedlens"
    families: ClassVar[tuple[str, ...]] = ("llava",)

    def __init__(
        self,
        mode: str = "probe",
        drop: list[str] | tuple[str, ...] = ("vit_sink", "llm_sink", "dead"),
        entry_layer: int | str = "middle",
        top_k: int = 3,
        markers: str | dict[str, int | None] = "auto",
        markers_file: str | None = None,
        maps: bool = True,
    ) -> None:
        drop = list(drop)
        super().__init__(mode=mode, drop=drop, entry_layer=entry_layer, top_k=top_k, markers=markers,
                         markers_file=markers_file, maps=maps)  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"EmbedLens mode must be one of {MODES}, got {mode!r}")
        if unknown := set(drop) - set(MARKER_GROUPS):
            raise ValueError(f"unknown EmbedLens groups {sorted(unknown)}; droppable: {MARKER_GROUPS}")
        self.mode, self.drop, self.entry_layer, self.top_k = mode, drop, entry_layer, top_k
        self.markers_cfg, self.markers_file, self.maps = markers, markers_file, maps
        self.markers: dict[str, int | None] = {}
        self._cache: tuple[Any, list[torch.Tensor]] | None = None
        self._seen: set[str] = set()

    # ------------------------------------------------------------------ before loading
    def check(self, adapter: Adapter) -> None:
        """Resolve the marker ids (calibration file, published ids) or fail naming the calibration command."""
        super().check(adapter)
        if self.mode == "inject" and self.entry_layer != "middle" and (n := adapter.lm_depth()) is not None:
            self._entry(n)  # the entry layer within the LM, before the model loads
        if isinstance(self.markers_cfg, dict) or hasattr(self.markers_cfg, "items"):
            self.markers = {str(k): (None if v is None else int(v)) for k, v in dict(self.markers_cfg).items()}
            return
        path = Path(self.markers_file) if self.markers_file else Path(adapter.path) / MARKER_FILE
        if path.is_file():
            self.markers = json.loads(path.read_text())["markers"]
        elif adapter.path in PUBLISHED_MARKERS:
            self.markers = dict(PUBLISHED_MARKERS[adapter.path])
        else:
            raise UnsupportedError(
                f"EmbedLens has no marker token ids for {adapter.path} (published ids exist only for "
                f"{sorted(PUBLISHED_MARKERS)}); calibrate them with `python -m methods.calibrate embedlens --model "
                f"<option>` (writes {MARKER_FILE} beside the checkpoint) or pass method.markers_file"
            )

    def _entry(self, n: int) -> int:
        """The entry layer on an ``n``-layer LM ("middle": n // 2); must be in 1..n−1."""
        layer = n // 2 if self.entry_layer == "middle" else int(self.entry_layer)
        if not 1 <= layer < n:
            raise LayerError(f"EmbedLens entry_layer {layer} must be in 1..{n - 1} (the LM has {n} layers)")
        return layer

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        """Classify every prompt's visual tokens; drop / delay them as the mode says."""
        index = Path(self.output_dir or ".") / "embedlens" / "tokens.jsonl"
        if self.output_dir is not None and index.is_file():  # a resumed run: images already mapped
            self._seen |= {json.loads(line)["image"] for line in index.read_text().splitlines()}
        claims = set() if self.mode == "probe" else {"tokens"}
        handle = self.enter_context(attach(self.adapter, self.name, claims))
        if self.mode == "probe":
            handle.on_batch(lambda batch: self.categories(batch.inputs))
            return
        handle.drop_input(self._keep)
        if self.mode == "inject":
            self.layer = layer = self._entry(self.adapter.num_layers("lm"))
            handle.enter_at(layer, self._alive)

    def categories(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per row, the category code (:data:`GROUPS` order) of each visual token; maps written once per image."""
        if self._cache is not None and self._cache[0] is inputs["input_ids"]:
            return self._cache[1]
        counts = self.adapter.image_token_mask(inputs).sum(-1).tolist()
        codes = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
        if sum(counts):
            feats = self.adapter.image_features(inputs)  # [n_visual_total, d], LM order
            ids, _ = nearest_vocab(feats, self.adapter.site("lm.embed").weight, self.top_k)  # [n, k]
            codes = classify(ids, self.markers)  # [n]
        rows = list(codes.split(counts))
        self._cache = (inputs["input_ids"], rows)
        self._write(inputs, rows)
        return rows

    def _keep(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Keep mask ``[batch, prompt]``: everything but the visual tokens of the dropped groups."""
        visual = self.adapter.image_token_mask(inputs)
        dropped = torch.zeros_like(visual)
        codes = [GROUPS.index(g) for g in self.drop]
        for row, cat in enumerate(self.categories(inputs)):
            dropped[row, visual[row].nonzero().flatten()] = torch.isin(cat, torch.tensor(codes, device=cat.device))
        return ~dropped

    def _alive(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The alive visual tokens, ``[batch, prompt]`` (they enter at ``entry_layer``)."""
        visual = self.adapter.image_token_mask(inputs)
        alive = torch.zeros_like(visual)
        for row, cat in enumerate(self.categories(inputs)):
            alive[row, visual[row].nonzero().flatten()] = cat == GROUPS.index("alive")
        return alive

    # ------------------------------------------------------------------ maps and report
    def _write(self, inputs: dict[str, torch.Tensor], rows: list[torch.Tensor]) -> None:
        if self.output_dir is None or "harness_images" not in inputs:
            return
        root = Path(self.output_dir) / "embedlens"
        images = iter(inputs["harness_images"])
        lines = []
        for cat, vmap in zip(rows, self.adapter.visual_token_map(inputs), strict=True):
            for i in vmap[:, 0].unique().tolist():
                image, sel = next(images), (vmap[:, 0] == i) & (vmap[:, 2] >= 0)
                digest = image_digest(image)
                if digest in self._seen:
                    continue
                self._seen.add(digest)
                grid = (int(vmap[sel, 2].max()) + 1, int(vmap[sel, 3].max()) + 1)
                if self.maps:
                    save_map(root / "maps" / f"{digest}.png", image, cat[sel], grid)
                counts = torch.bincount(cat[sel], minlength=len(GROUPS)).tolist()
                lines.append(json.dumps({"image": digest, "counts": dict(zip(GROUPS, counts, strict=True))}))
        if lines:
            root.mkdir(parents=True, exist_ok=True)
            with open(root / "tokens.jsonl", "a") as f:
                f.write("\n".join(lines) + "\n")

    def report(self) -> dict[str, Any]:
        """Category fractions over every distinct image in ``embedlens/tokens.jsonl`` (resumed runs included)."""
        out: dict[str, Any] = {"mode": self.mode, "markers": self.markers, "top_k": self.top_k}
        if self.mode == "inject":
            out["entry_layer"] = getattr(self, "layer", None)
        path = Path(self.output_dir or ".") / "embedlens" / "tokens.jsonl"
        per_image: dict[str, dict[str, int]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                per_image[rec["image"]] = rec["counts"]
        total = {g: sum(c[g] for c in per_image.values()) for g in GROUPS}
        n = sum(total.values())
        out |= {"images": len(per_image), "visual_tokens": n,
                "fractions": {g: round(total[g] / n, 4) if n else 0.0 for g in GROUPS}}  # fmt: skip
        if self.mode != "probe" and n:
            out["dropped_fraction"] = round(sum(total[g] for g in self.drop) / n, 4)
        return out
