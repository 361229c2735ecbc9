r"""IRI — Intermediate Representation Injection.

"Causal Tracing of Object Representations in Large Vision Language Models…", AAAI 2026, arXiv 2511.05923 (no
official code). Calibration: :mod:`methods.fcct`.

Causal tracing (FCCT) shows that the last token's attention (MHSA) and MLP outputs in middle layers carry the
object evidence the answer depends on, and that it fades in later layers. IRI re-injects it: in every forward
(the last prompt position in prefill, then every generated token), with ``a^(l)`` the last token's attention
output at layer l (site ``lm.layers.{l}.attn_out``, after the output projection, before the residual add):

    ã^(l) = a^(l) + λ_a · Σ_{k ∈ S_a, k < l} RR^attn_k · a^(k)          for every target layer l ∈ T_a
    ã^(l) ← ã^(l) · ‖a^(l)‖₂ / ‖ã^(l)‖₂                                  (renormalised to the original norm)

and the same for the MLP outputs (``lm.layers.{l}.mlp_out``) with ``λ_m``, ``RR^mlp``, ``S_m``, ``T_m``. ``RR`` is
the last-token recovery rate per layer from the FCCT calibration (negative rates count as 0); the causal gate
``k < l`` means a target only receives what earlier layers produced in the same forward. ``a^(k)`` is the source's
own output (before any injection into it). No extra forward passes: the source outputs are read on the way.

Layer choice (the paper: "top-k1 sources, top-k2 targets by RR", exact rule unpublished): sources = the ``sources``
layers with the highest RR among layers 0 … L−2 (a source must have a layer above it); targets = the ``targets``
layers with the highest RR among the layers above the lowest source.

Hyperparameters:
    lambda_attn, lambda_mlp ("auto" | float, default "auto"): λ_a, λ_m. "auto": the published values for the
        checkpoint (:data:`PUBLISHED_LAMBDAS`), else LLaVA-1.5-7B's 0.26 / 0.16 (the paper's main setting).
    sources, targets ("auto" | int, default "auto"): k1 = 3 and k2 = 10 of 32 layers, scaled to the LM
        (``max(1, round(3·L/32))``, ``max(1, round(10·L/32))``).
    use_rr (bool, default True): weight sources by RR (False: weight 1, the paper's "w/o RR" ablation).
    renorm (bool, default True): rescale to the original norm (False: the "w/o renormalisation" ablation).
    components (list, default [attn, mlp]): which outputs are injected (the paper's "w/o MLP" / "w/o MHSA").
    fcct_file (str | None, default None): calibration file; default ``iri_fcct.json`` beside the checkpoint,
        written by ``python -m methods.calibrate fcct --model <option>``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

from adapters.base import Adapter
from methods.base import METHODS, DeviceTally, Method, UnsupportedError
from methods.fcct import FCCT_FILE
from methods.intervention import Step, attach

log = logging.getLogger(__name__)

#: (λ_a, λ_m) reported per checkpoint (methods.md §7: LLaVA-1.5-7B; Qwen-VL-Chat and LLaVA-NeXT have no adapter)
PUBLISHED_LAMBDAS: dict[str, tuple[float, float]] = {"llava-hf/llava-1.5-7b-hf": (0.26, 0.16)}
DEFAULT_LAMBDAS = (0.26, 0.16)
PARTS = ("attn", "mlp")


def load_fcct(path: str, fcct_file: str | None) -> tuple[dict[str, Any], str]:
    """The FCCT calibration of checkpoint ``path`` and where it came from; fails before loading when absent."""
    file = Path(fcct_file) if fcct_file else Path(path) / FCCT_FILE
    if not file.is_file():
        raise UnsupportedError(
            f"IRI needs the FCCT recovery rates of {path!r} ({file} not found). Trace them with "
            f"`python -m methods.calibrate fcct --model <option> --path {path} [--out FILE]` and pass "
            "method.fcct_file=FILE if it is not beside the checkpoint"
        )
    return json.loads(file.read_text()), str(file)


def choose_layers(rr: list[float], n_sources: int, n_targets: int) -> tuple[list[int], list[int]]:
    """``(sources, targets)`` from per-layer recovery rates (see the module docstring)."""
    order = sorted(range(len(rr)), key=lambda layer: -rr[layer])
    sources = sorted([layer for layer in order if layer < len(rr) - 1][:n_sources])
    if not sources:
        return [], []
    targets = sorted([layer for layer in order if layer > sources[0]][:n_targets])
    return sources, targets


def inject(
    out: torch.Tensor,  # [batch, d] the target's last-token output
    recorded: dict[int, torch.Tensor],  # source layer → [batch, d]
    weights: dict[int, float],
    layer: int,
    lam: float,
    renorm: bool,
) -> torch.Tensor:
    """``a + λ Σ_{k<layer} w_k a^(k)``, rescaled to ``‖a‖`` per row when ``renorm``; float32 ``[batch, d]``."""
    a = out.float()
    add = sum((weights[k] * recorded[k].float() for k in recorded if k < layer), torch.zeros_like(a))
    new = a + lam * add
    if renorm:
        new = new * (a.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return new


@METHODS.register("iri")
class IRI(Method):
    """Inject RR-weighted last-token attention/MLP outputs of causal source layers into later target layers."""

    name: ClassVar[str] = "iri"

    def __init__(
        self,
        lambda_attn: str | float = "auto",
        lambda_mlp: str | float = "auto",
        sources: str | int = "auto",
        targets: str | int = "auto",
        use_rr: bool = True,
        renorm: bool = True,
        components: list[str] | tuple[str, ...] = PARTS,
        fcct_file: str | None = None,
    ) -> None:
        components = list(components)
        if not components or any(c not in PARTS for c in components):
            raise ValueError(f"components must be a non-empty subset of {PARTS}, got {components}")
        for name, v in (("sources", sources), ("targets", targets)):
            if v != "auto" and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be 'auto' or a positive int, got {v!r}")
        super().__init__(lambda_attn=lambda_attn, lambda_mlp=lambda_mlp, sources=sources, targets=targets,
                         use_rr=use_rr, renorm=renorm, components=components, fcct_file=fcct_file)  # fmt: skip
        self.calibration: dict[str, Any] = {}
        self.source = ""
        self.plan: dict[str, dict[str, Any]] = {}
        self._injected = DeviceTally(1)  # relative change ‖ã − a‖ / ‖a‖ summed over the prompt-end rows
        self._rows = 0  # rows injected (target layer × row), counted on the host
        self._measured = 0  # of which prompt-end rows (prefill), where the change is measured

    def check(self, adapter: Adapter) -> None:
        """Load the FCCT calibration before the model loads (fails with the tracing command when missing)."""
        super().check(adapter)
        self.calibration, self.source = load_fcct(adapter.path, self.hparams["fcct_file"])
        self._check_depth(adapter.lm_depth())

    def _check_depth(self, n_layers: int | None) -> None:
        """The calibration must come from an LM of this depth (its per-layer rates index the layers)."""
        traced = self.calibration.get("layers")
        if n_layers is not None and traced != n_layers:
            raise UnsupportedError(
                f"{self.source} was traced on a {traced}-layer LM; this one has {n_layers}: trace this checkpoint "
                "with `python -m methods.calibrate fcct --model <option>` or pass its method.fcct_file"
            )

    def _lambdas(self, path: str) -> tuple[float, float]:
        published = PUBLISHED_LAMBDAS.get(path, DEFAULT_LAMBDAS)
        hp = self.hparams
        given = (hp["lambda_attn"], hp["lambda_mlp"])
        return tuple(float(p if v == "auto" else v) for v, p in zip(given, published, strict=True))

    def install(self) -> None:
        """Plan sources/targets per component from the calibration and hook their outputs."""
        n_layers = self.adapter.num_layers("lm")
        self._check_depth(n_layers)
        cal = self.calibration
        hp = self.hparams
        k1 = max(1, round(3 * n_layers / 32)) if hp["sources"] == "auto" else hp["sources"]
        k2 = max(1, round(10 * n_layers / 32)) if hp["targets"] == "auto" else hp["targets"]
        handle = self.enter_context(attach(self.adapter, self.name, {"outputs"}))
        for part, lam in zip(PARTS, self._lambdas(self.adapter.path), strict=True):
            if part not in hp["components"]:
                continue
            rr = [max(0.0, float(v)) for v in cal["rr"][part]["last"]]
            sources, targets = choose_layers(rr, k1, k2)
            weights = {k: (rr[k] if hp["use_rr"] else 1.0) for k in sources}
            self.plan[part] = {"lambda": lam, "sources": sources, "targets": targets, "weights": weights}
            if not targets:
                log.warning(
                    "IRI: no %s target layer above the sources on %s; nothing injected", part, self.adapter.path
                )
                continue
            layers = sorted(set(sources) | set(targets))
            hook = getattr(handle, f"{part}_out")
            summed: dict[int, torch.Tensor] = {}  # source layer -> Σ w_k a^(k) over the sources up to it (this forward)
            for layer in layers:
                hook([layer], self._site(part, layer, summed))

    def _site(self, part: str, layer: int, summed: dict[int, torch.Tensor]):
        """The output hook of one layer: record it (a source), inject into it (a target), or both.

        Cost per forward (what a decoding step launches, issue 25): a source adds its weighted output to the running
        sum of the sources below it (one fused add), a target reads that sum (the causal gate k < l is which
        source's sum it reads, fixed at install) and is rewritten in place: the injection, two norms and the
        renormalised row written into the output in one product (6 launches), with no host sync and no copy of
        the layer's output. The activity (‖ã − a‖ / ‖a‖) is measured at the prompt's last token only, in prefill,
        where its two extra kernels are not paid per generated token. The result equals :func:`inject` up to
        float round-off (tested).
        """
        plan, lam, renorm = self.plan[part], self.plan[part]["lambda"], self.hparams["renorm"]
        below = max((k for k in plan["sources"] if k < layer), default=None)  # the highest source under this layer
        weight = plan["weights"].get(layer)

        def fn(out: torch.Tensor, step: Step) -> None:  # out: [batch, seq, d]
            last = out[:, -1]  # [batch, d]: the last prompt token in prefill, the new token when decoding
            # Sums and norms run in float32. ``last`` is not cast to float32 first (in bf16 that is a kernel per
            # site): a sum with the float32 ``summed`` promotes inside its one kernel, a norm is told its dtype.
            if weight is not None:  # a source: its own output, before any injection into it
                # a new tensor (never a view of out): w·a, or the sum below plus w·a in one kernel
                summed[layer] = weight * last.float() if below is None else torch.add(summed[below], last, alpha=weight)
            if layer in plan["targets"]:
                self._rows += last.shape[0]
                if below is not None:
                    new = torch.add(last, summed[below], alpha=lam)  # a + λ·Σ w_k a^(k), float32
                    scale = None
                    if renorm:  # ‖a‖ / ‖new‖ per row, [batch, 1]
                        norm = torch.linalg.vector_norm(last, dim=-1, keepdim=True, dtype=torch.float32)
                        scale = norm / torch.linalg.vector_norm(new, dim=-1, keepdim=True).clamp_min(1e-12)
                    if step.prefill:  # measure, before ``last`` is written
                        self._measure(last.float(), new if scale is None else new * scale)
                    if scale is None:
                        last.copy_(new)  # in place: the output's last row
                    else:
                        torch.mul(new, scale, out=last)  # ã, rounded once to the output's dtype, in place

        return fn

    def _measure(self, a: torch.Tensor, new: torch.Tensor) -> None:
        """Tally ‖ã − a‖ / ‖a‖ per row (``[batch, d]`` each, float32), divided and summed when read."""
        self._measured += a.shape[0]
        self._injected.add_ratio(0, (new - a).norm(dim=-1, keepdim=True), a.norm(dim=-1, keepdim=True))

    def describe(self) -> dict[str, Any]:
        """Adds the calibration file, the resolved layers / weights / λ and how much was injected."""
        (change,) = self._injected.tolist()
        measured = self._measured
        return super().describe() | {
            "resolved": {"fcct_file": self.source, "plan": self.plan},
            "activity": {
                "injections": int(self._rows),  # target layer x row, prefill and every generated token
                # ‖ã − a‖ / ‖a‖ at the prompt's last token (prefill), averaged over target layers and rows
                "mean_relative_change_at_prompt_end": round(change / measured, 6) if measured else 0.0,
            },
        }
