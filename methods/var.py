r"""VAR — Visual Attention Redistribution.

Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal Models", ICLR 2025,
arXiv 2503.03321; official code ``seilk/VisAttnSink`` (``src/logic/logic.py``: DimProspector, HeadFork,
VARProcessor).

Some tokens (BOS, a few visual tokens) carry *massive activations* in a few fixed hidden dimensions and soak up
attention without contributing information ("attention sinks"). VAR finds them and, in image-centric heads, moves
part of their attention to the visual tokens that are not sinks. Per layer ``l`` in ``layers``:

1. **Sinks** (from the hidden state entering layer ``l``, prefill only). With ``D_sink`` the backbone's sink
   dimensions, ``φ(x) = max_{d ∈ D_sink} |x_d| / RMS(x)``, ``RMS(x) = sqrt(mean(x²) + ε)`` (no learned gain);
   ``S_l = {j : φ(x_j) > τ}`` over the prompt's unpadded tokens (text sinks such as BOS included; generated tokens
   are never sinks). ``VS_l = S_l ∩ V`` with ``V`` the visual tokens.
2. **Image-centric heads**, per (head, query row) on the post-softmax row ``α``: visual mass
   ``s = Σ_{j∈V} α_j ≥ visual_mass`` and visual non-sink ratio ``r = Σ_{j∈V∖VS_l} α_j / s ≥ ρ``. Rows: in prefill the
   query rows AFTER the last visual token (the instruction), at decoding every new token; never visual or
   system rows. A sample whose layer has no visual sink is left unchanged.
3. **Redistribution** in the selected rows: every sink keeps ``(1 − p)`` of its weight,
   ``α'_j = (1 − p)·α_j`` for ``j ∈ S_l``; the budget ``Ω = p·Σ_{j∈S_l} α_j`` goes to the visual non-sinks in
   proportion to their weights, ``α'_j = α_j + Ω·α_j / Σ_{k∈V∖VS_l} α_k``; other text tokens are untouched, so every
   row still sums to 1. Applied in prefill and at every cached decoding step (query-row edit, not baked into KV).

Hyperparameters (paper meaning; official-code convention in brackets):
    p (float, default 0.4): fraction of sink attention MOVED. [The code's ``p`` is the KEPT fraction; its shipped
        ``p: 0.6`` moves 40 %, i.e. our 0.4.]
    rho (float, default 0.5): minimum visual non-sink ratio r of a selected row (paper ρ: 0.5 hallucination,
        0.8 general, 0.9 vision-centric). [The code compares the sink share 1 − r ≤ ``rho``, so code ``rho`` =
        1 − paper ρ; the shipped 0.5 is the same either way.]
    visual_mass (float, default 0.2): minimum visual attention mass s of a selected row [code ``summ``].
    tau (float | None, default None): sink threshold on φ, strict ``>`` as in the code. None: 20 (the paper's) for
        published sink dimensions, the calibrated value for calibrated ones.
    layers ("auto" | list[int], default "auto"): layers 2 … L−2 (the code skips layers 0–1, where no sinks are
        computed, and the last layer). On an LM with fewer than 4 layers "auto" is empty and VAR changes nothing.
    sink_dims ("auto" | list[int], default "auto"): ``D_sink``. "auto": ``sink_file`` if given, else
        ``var_sinks.json`` in the checkpoint directory (both written by the calibration below), else the published
        values for the checkpoint's hub id (:data:`PUBLISHED_SINK_DIMS`); none → the run fails before the model
        loads, naming the command.
    sink_file (str | None, default None): a calibration file elsewhere (e.g. for a hub id).

Calibration (any model, including the shipped tiny ones)::

    python -m methods.calibrate var --model llava [--path DIR_OR_ID] [--out FILE]

runs the model on shapes-world prompts and images, measures every hidden channel's largest ``|x_d| / RMS(x)`` over
the tokens entering layers ≥ 1, and calls a channel massive when that maximum is at least ``outlier`` (default 3)
times the median channel's (at most 2 channels, as published backbones have 1–2). τ is proposed as the geometric
mean of the median channel's maximum and the weakest massive channel's. A model without massive channels gets
``sink_dims: []``; VAR then finds no sinks and leaves attention unchanged (the results file says so).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from adapters.base import Adapter
from methods.base import METHODS, DeviceTally, Method, UnsupportedError, auto_or_list, check_layers
from methods.intervention import Batch, Step, attach

log = logging.getLogger(__name__)

#: published sink dimensions per backbone (methods.md §1: LLaMA-2 values read in the official code, Qwen2-VL /
#: InternVL2 from a secondary summary of the paper)
PUBLISHED_SINK_DIMS: dict[str, list[int]] = {
    "llava-hf/llava-1.5-7b-hf": [1415, 2533],
    "llava-hf/llava-1.5-13b-hf": [2100, 4743],
    "llava-hf/llava-v1.6-vicuna-13b-hf": [2100, 4743],
    "Qwen/Qwen2-VL-7B-Instruct": [458, 2570],
    "OpenGVLab/InternVL2-8B": [3584],
}
PUBLISHED_TAU = 20.0
SINK_FILE = "var_sinks.json"
EPS = 1e-6
_SMALLEST = float(torch.finfo(torch.float32).tiny) * 2.0**-23  # the smallest positive float32 (subnormal)


def sink_source(
    path: str, sink_dims: str | list[int], tau: float | None, sink_file: str | None = None
) -> tuple[list[int], float, str]:
    """Resolve ``(dims, tau, where from)`` without loading the model; raises when nothing is known."""
    if sink_dims != "auto":
        return [int(d) for d in sink_dims], float(tau if tau is not None else PUBLISHED_TAU), "given"
    file = Path(sink_file) if sink_file else Path(path) / SINK_FILE
    if sink_file and not file.is_file():
        raise FileNotFoundError(f"method.sink_file={sink_file} does not exist")
    if file.is_file():
        cal = json.loads(file.read_text())
        tau = tau if tau is not None else cal["tau"]
        return cal["sink_dims"], float(tau if tau is not None else PUBLISHED_TAU), str(file)
    if path in PUBLISHED_SINK_DIMS:
        return PUBLISHED_SINK_DIMS[path], float(tau if tau is not None else PUBLISHED_TAU), "published"
    raise UnsupportedError(
        f"VAR needs the sink dimensions of {path!r}: no {SINK_FILE} beside it and no published values "
        f"(known: {', '.join(PUBLISHED_SINK_DIMS)}). Measure them with `python -m methods.calibrate var "
        f"--model <option> --path {path} [--out FILE]` and pass method.sink_file=FILE if it is not beside the "
        "checkpoint, or pass method.sink_dims=[...]"
    )


def sink_scores(hidden: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """φ per token: ``max_{d∈dims} |x_d| / RMS(x)`` for ``hidden [batch, seq, d]`` → ``[batch, seq]``."""
    x = hidden.float()
    rms = x.pow(2).mean(-1, keepdim=True).add(EPS).sqrt()  # [batch, seq, 1]
    return (x[..., dims].abs() / rms).amax(-1)


def redistribute(
    probs: torch.Tensor,  # [batch, heads, q, k], rows sum to 1
    sinks: torch.Tensor,  # [batch, k] sink keys (text and visual)
    visual: torch.Tensor,  # [batch, k] visual keys
    rows: torch.Tensor,  # [batch, q] query rows VAR may edit
    p: float,
    rho: float,
    visual_mass: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move fraction ``p`` of the sink mass to visual non-sinks in image-centric (head, row) pairs.

    Returns:
        The edited probabilities and the boolean selection ``[batch, heads, q]``.
    """
    vis_sink, vis_non = visual & sinks, visual & ~sinks
    cols = torch.stack([visual, vis_non, sinks], -1).to(probs.dtype)  # [batch, k, 3]
    mass = probs @ cols[:, None]  # [batch, heads, q, 3]: visual, visual non-sink, sink mass per row
    s, non, sink_mass = mass.unbind(-1)
    ratio = non / s.clamp_min(1e-12)  # visual non-sink ratio r
    selected = (s >= visual_mass) & (ratio >= rho) & (non > 0) & rows[:, None, :] & vis_sink.any(-1)[:, None, None]
    omega = p * sink_mass  # [batch, heads, q]
    # Ω / non; a selected row has non > 0, an unselected one's (inf or nan) is discarded by the where below
    gain = (omega / non)[..., None]  # [batch, heads, q, 1]
    new = probs * (1 - p * sinks[:, None, None].to(probs.dtype)) + gain * probs * vis_non[:, None, None]
    return torch.where(selected[..., None], new, probs), selected


@dataclass
class _Keys:
    """One layer's per-key factors of :func:`redistribute`, computed once in prefill (prompt keys only)."""

    # [batch, 1, prompt, 4]: visual, visual non-sink − ρ·visual, visual non-sink, p·sink indicators, so that one
    # product gives per row s, non − ρ·s, non and Ω = p·(sink mass)
    cols: torch.Tensor
    # [batch, 1, 1, 4]: what the four must reach for a selected row: s ≥ visual_mass (+inf for a sample without a
    # visual sink at this layer), non − ρ·s ≥ 0 (r ≥ ρ), non ≥ the smallest positive float (non > 0); Ω ≥ −inf
    # (no condition: the fourth column is there so one comparison covers the whole product)
    floor: torch.Tensor
    keep: torch.Tensor  # [batch, 1, 1, prompt]: 1 − p on sinks, 1 elsewhere
    vis_non: torch.Tensor  # [batch, 1, 1, prompt]: visual non-sink indicator


@METHODS.register("var")
class VAR(Method):
    """Visual attention redistribution from sink tokens to visual non-sinks in image-centric heads."""

    name: ClassVar[str] = "var"

    def __init__(
        self,
        p: float = 0.4,
        rho: float = 0.5,
        visual_mass: float = 0.2,
        tau: float | None = None,
        layers: str | list[int] = "auto",
        sink_dims: str | list[int] = "auto",
        sink_file: str | None = None,
    ) -> None:
        if not 0 <= p <= 1 or not 0 <= rho <= 1 or not 0 <= visual_mass <= 1:
            raise ValueError(f"p, rho and visual_mass are fractions in [0, 1]; got {p}, {rho}, {visual_mass}")
        auto_or_list("layers", layers)
        auto_or_list("sink_dims", sink_dims, "dimensions")
        super().__init__(
            p=p, rho=rho, visual_mass=visual_mass, tau=tau, layers=layers, sink_dims=sink_dims, sink_file=sink_file
        )
        self.dims: list[int] = []
        self.tau = PUBLISHED_TAU
        self.source = ""
        self.layers: list[int] = []
        self._counts = DeviceTally(4)  # sinks, visual sinks, selected pairs, eligible pairs (prompt rows)
        self._eligible = 0  # eligible pairs of generated rows (counted on the host)

    def check(self, adapter: Adapter) -> None:
        """Resolve the sink dimensions before the model loads (fails with the calibration command if unknown)."""
        super().check(adapter)
        hp = self.hparams
        check_layers(adapter, self.name, hp["layers"])
        self.dims, self.tau, self.source = sink_source(adapter.path, hp["sink_dims"], hp["tau"], hp["sink_file"])

    def install(self) -> None:
        """Attach to the intervention layer (see the module docstring for what is registered)."""
        n_layers = self.adapter.num_layers("lm")
        hidden = self.adapter.site("lm.embed").weight.shape[1]
        if any(not 0 <= d < hidden for d in self.dims):
            raise UnsupportedError(f"VAR: sink dims {self.dims} out of range for hidden size {hidden} ({self.source})")
        layers = self.hparams["layers"]
        self.layers = list(range(2, n_layers - 1)) if layers == "auto" else [int(x) for x in layers]
        if not self.dims or not self.layers:
            why = "no sink dimensions" if not self.dims else f"no layers (auto = 2..L-2, L = {n_layers})"
            log.warning("VAR has %s on %s: attention is left unchanged", why, self.adapter.path)
        handle = self.enter_context(attach(self.adapter, self.name, {"probs", "resid"}))
        handle.on_batch(self._prepare)
        handle.resid_pre(self.layers, self._find_sinks)
        handle.probs(self.layers, self._redistribute, first_row=self._first_row)

    def _prepare(self, batch: Batch) -> None:
        pos = torch.arange(batch.prompt_len, device=batch.visual.device)
        last_visual = torch.where(batch.visual, pos, -1).amax(-1)  # [batch]; -1 without an image
        # the first editable row, read once per batch (one host sync) instead of in every layer at every step
        first = int(last_visual.min()) + 1  # a row without image: -1 + 1 = 0
        hp = self.hparams
        # _Keys.floor's values, copied to the device once per batch rather than in every layer's prefill
        floor = torch.tensor([hp["visual_mass"], 0.0, _SMALLEST, -math.inf], device=batch.visual.device)  # [4]
        batch.state[self.name] = {"sinks": {}, "last_visual": last_visual, "first_row": first, "floor": floor}

    def _find_sinks(self, hidden: torch.Tensor, step: Step) -> None:
        """Prefill: the layer's sinks, and the per-key factors its redistribution reuses at every decoding step."""
        if step.offset != 0:  # cached decoding step: generated tokens are never sinks
            return
        batch = step.batch
        n = batch.prompt_len
        if self.dims:
            sinks = (sink_scores(hidden[:, :n], self.dims) > self.tau) & ~batch.padding  # [batch, prompt]
        else:
            sinks = torch.zeros_like(batch.padding)
        vis_sink, vis_non = batch.visual & sinks, batch.visual & ~sinks  # [batch, prompt]
        hp, visual, non = self.hparams, batch.visual.float(), vis_non.float()
        has_vis_sink = vis_sink.any(-1, keepdim=True)  # [batch, 1]
        floor = batch.state[self.name]["floor"]  # [4], made once per batch in _prepare
        batch.state[self.name]["sinks"][step.layer] = _Keys(
            cols=torch.stack([visual, non - hp["rho"] * visual, non, hp["p"] * sinks.float()], -1)[:, None],
            floor=torch.where(has_vis_sink, floor, math.inf)[:, None, None],  # [batch, 1, 1, 4]
            keep=(1 - hp["p"] * sinks.float())[:, None, None],  # [batch, 1, 1, prompt]
            vis_non=non[:, None, None],  # [batch, 1, 1, prompt]
        )
        self._counts.add(0, sinks, vis_sink)

    def _first_row(self, step: Step) -> int:
        """Rows up to the last visual token of every sample are never edited (fused SDPA runs them)."""
        return max(0, step.batch.state[self.name]["first_row"] - step.offset)

    def _redistribute(self, probs: torch.Tensor, step: Step) -> torch.Tensor:
        """:func:`redistribute` on the prompt keys, with the layer's key factors computed once in prefill.

        Generated keys are never sinks or visual, so their weights pass through. Edits ``probs`` in place (a
        fresh softmax output that only this method, holding the exclusive ``probs`` claim, sees). Equal to
        :func:`redistribute` (tested); per decoding step it launches about half the kernels and never syncs:
        every row of a cached step is a generated token, so every row is eligible without a comparison.
        """
        batch, state = step.batch, step.batch.state[self.name]
        keys: _Keys = state["sinks"][step.layer]
        prompt = probs[..., : batch.prompt_len]  # [batch, heads, q, prompt]
        mass = prompt @ keys.cols  # [batch, heads, q, 4]: s, non − ρ·s, non, Ω
        # s ≥ visual_mass, r ≥ ρ, non > 0 and a visual sink in the sample: one comparison against the floors
        selected = (mass >= keys.floor).all(-1, keepdim=True)  # [batch, heads, q, 1]
        if step.offset < batch.prompt_len:  # prompt rows (prefill, an uncached pass): after the last visual token
            rows = step.query_positions()[None, :] > state["last_visual"][:, None]  # [batch, q]
            selected &= rows[:, None, :, None]
            self._counts.add(2, selected, rows.sum() * probs.shape[1])
        else:  # every (row, head) of a generated token is eligible, known on the host
            self._counts.add(2, selected)
            self._eligible += selected.numel()
        # [batch, heads, q, 1]: Ω / non. A selected row has non ≥ the smallest positive float (no clamp: a clamp
        # would lose mass where 0 < non < the clamp); an unselected row's inf or nan is discarded by the where
        gain = mass[..., 3:] / mass[..., 2:3]
        # one factor per (row, key): keep (1 − p on sinks) plus the gain on visual non-sinks, 1 where not selected;
        # applied in place on the prompt keys (generated keys pass through)
        factor = torch.where(selected, torch.addcmul(keys.keep, gain, keys.vis_non), 1.0)
        prompt.mul_(factor)  # [batch, heads, q, prompt], a view of probs
        return probs

    def describe(self) -> dict[str, Any]:
        """Adds the resolved sink dims, tau, layers and what VAR actually did (sink counts, selected rows)."""
        sinks, vis_sinks, selected, eligible = self._counts.tolist()
        eligible += self._eligible
        return super().describe() | {
            "resolved": {"sink_dims": self.dims, "tau": self.tau, "sink_source": self.source, "layers": self.layers},
            "conventions": "p = fraction moved (official code: p_kept = 1 - p); rho = min visual non-sink ratio "
            "(official code: max sink share = 1 - rho)",
            "activity": {
                "sink_tokens": int(sinks),
                "visual_sink_tokens": int(vis_sinks),
                "selected_head_rows": int(selected),
                "selected_fraction": round(selected / eligible, 6) if eligible else 0.0,
            },
        }


# ---------------------------------------------------------------------------------------------- calibration
def measure_channels(
    adapter: Adapter, prompts: list[str], images: list[list[Any]], batch_size: int = 8
) -> torch.Tensor:
    """Per hidden channel, the largest ``|x_d| / RMS(x)`` over unpadded tokens entering layers ≥ 1, ``[d]``."""
    best: torch.Tensor | None = None
    for i in range(0, len(prompts), batch_size):
        inputs = adapter.build_inputs(prompts[i : i + batch_size], images[i : i + batch_size])
        with torch.inference_mode():
            hidden = adapter.forward(inputs, output_hidden_states=True).hidden_states  # (L + 1) × [batch, seq, d]
        keep = inputs["attention_mask"].bool()
        for h in hidden[1:-1]:  # entering layers 1 … L−1 (the last entry is after the final norm)
            x = h.float()[keep]  # [tokens, d]
            ratio = (x.abs() / x.pow(2).mean(-1, keepdim=True).add(EPS).sqrt()).amax(0)
            best = ratio if best is None else torch.maximum(best, ratio)
    if best is None:
        raise ValueError("calibration needs at least one prompt and an LM with at least 2 layers")
    return best


def choose_sinks(channel_max: torch.Tensor, outlier: float = 3.0, max_dims: int = 2) -> dict[str, Any]:
    """Massive channels (max ≥ ``outlier`` × the median channel's max, at most ``max_dims``) and a proposed τ."""
    median = float(channel_max.median())
    order = torch.argsort(channel_max, descending=True)
    dims = [int(d) for d in order[:max_dims] if channel_max[d] >= outlier * median]
    tau = math.sqrt(median * min(float(channel_max[d]) for d in dims)) if dims else None
    top = [(int(d), round(float(channel_max[d]), 3)) for d in order[:8]]
    return {"sink_dims": dims, "tau": tau, "median_channel_max": round(median, 4), "top_channels": top,
            "outlier": outlier, "massive": bool(dims)}  # fmt: skip
