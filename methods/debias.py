r"""Attention debiasing for attention-scored visual-token pruners.

"Attention debiasing for token pruning", arXiv 2508.17807; official code ``intcomp/attention-bias``. Not a
registered method: a plug-in that FastV / FasterVLM call on their importance scores before taking the top-k.

Model. The raw importance score of visual token ``i`` (flattened row-major index within its image grid / tile,
``0 … L−1``) is ``a_i = b_i · â_i``: a content score ``â_i`` times a content-agnostic positional (recency) bias
``b_i``. With ``x_i = i / (L−1)`` (``x = 0`` when ``L = 1``):

1. **Calibration.** Average scores per index over many images, ``ā_i = mean_images a_i``, and fit a curve
   ``f(x)`` to ``(x_i, ā_i)`` by least squares. Families (:data:`FAMILIES`):
   ``exp``: ``f = μ·exp(σx)`` (paper default; fitted on ``log ā`` by linear least squares, then refined by
   Gauss-Newton on the linear-space squared residuals); ``cubic``: ``f = c0 + c1x + c2x² + c3x³`` (the released
   FastV weights are ``1/w = 1 + 1.734x − 4.826x² + 4.884x³``); ``linear``: ``f = c0 + c1x`` (polynomials by
   ordinary least squares). The fit's ``R² = 1 − Σ(ā − f)² / Σ(ā − mean ā)²`` is reported in linear space.
2. **Positional debias.** ``w_i = f(0) / f(x_i)`` (so ``w_0 = 1``); the debiased score is ``a_i · w_i``, i.e.
   ``â_i`` up to a constant. ``x`` is normalised, so a curve fitted at one grid length applies to any length.
3. **Padding suppression** (after step 2). With ``c_i ∈ [0, 1]`` the fraction of the token's patch covered by real
   image (1 without letterbox padding), scores of tokens whose padding fraction ``1 − c_i > pad_threshold`` are
   zeroed (kept iff ``c_i ≥ 1 − pad_threshold``); a budget larger than the kept count shrinks to it
   (:func:`effective_budget`).
4. **Sink suppression** (optional). Scores of tokens flagged by the caller's boolean sink mask are zeroed.

Hyperparameters:
    family (str, default "exp"): curve family of the fit, one of :data:`FAMILIES`.
    pad_threshold (float, default 0.5): largest padding fraction a kept token may have.
    sinks (bool mask | None, default None): tokens to zero; None zeroes none.

Fitted curves live in ``attn_debias.json`` (:data:`TREND_FILE`) beside the checkpoint, one entry per
:func:`trend_key` (e.g. ``fastv/layer1/last``), written by ``python -m methods.calibrate debias``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FAMILIES: tuple[str, ...] = ("exp", "cubic", "linear")
TREND_FILE = "attn_debias.json"
CALIBRATE_CMD = "python -m methods.calibrate debias --model <option> --pruner <name>"
_N_PARAMS = {"exp": 2, "cubic": 4, "linear": 2}
_GN_STEPS = 50  # Gauss-Newton refinement steps of the exp fit (stops early when the residual stops falling)


def _tensor(x: Any) -> torch.Tensor:
    """``x`` itself when it is a tensor (on its device), else a host tensor of it."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, device="cpu")


def _grid(n: int) -> torch.Tensor:
    """Normalised positions ``x_i = i / (n−1)`` as float64, ``[0.]`` for ``n = 1``."""
    if n == 1:
        return torch.zeros(1, dtype=torch.float64, device="cpu")
    return torch.arange(n, dtype=torch.float64, device="cpu") / (n - 1)  # [n]


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        close = difflib.get_close_matches(str(family), FAMILIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown trend family {family!r}{hint}; choose one of {list(FAMILIES)}")


@dataclass
class PositionalTrend:
    """A fitted positional-bias curve ``f(x)`` over normalised token positions ``x ∈ [0, 1]``.

    Construction validates the family and the number of (finite) params and raises ValueError otherwise.

    Attributes:
        family: one of :data:`FAMILIES`.
        params: exp ``[mu, sigma]``; cubic ``[c0, c1, c2, c3]``; linear ``[c0, c1]``.
        r2: coefficient of determination of the fit in linear space (NaN when unknown).
        meta: free-form JSON-serialisable provenance (pruner, layer, rule, n_images, n_positions, ...).
    """

    family: str
    params: list[float]
    r2: float = float("nan")
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_family(self.family)
        want, raw = _N_PARAMS[self.family], self.params
        try:
            self.params = [float(v) for v in raw]
        except (TypeError, ValueError):
            self.params = []
        if len(self.params) != want or not all(math.isfinite(v) for v in self.params):
            raise ValueError(f"{self.family} trend needs {want} finite params, got {raw!r}")

    def curve(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluates ``f(x)`` (float64, same shape as ``x``)."""
        x = torch.as_tensor(x, dtype=torch.float64, device="cpu")  # host-side: a handful of positions
        if self.family == "exp":
            return self.params[0] * torch.exp(self.params[1] * x)
        return sum(c * x**k for k, c in enumerate(self.params)) + torch.zeros_like(x)

    def weights(self, n: int) -> torch.Tensor:
        """Debiasing weights ``w_i = f(0) / f(i/(n−1))`` for a grid of ``n`` tokens, ``[n]`` float32, ``w_0 = 1``.

        Raises:
            ValueError: ``n < 1``, or ``f`` is not finite and positive at every grid position.
        """
        if n < 1:
            raise ValueError(f"weights need n >= 1 tokens, got {n}")
        f = self.curve(_grid(n))  # [n]
        if not bool(torch.isfinite(f).all()) or bool((f <= 0).any()):
            raise ValueError(
                f"{self.family} trend with params {self.params} is not positive and finite on all {n} positions "
                f"(min {float(f.min()):.4g}); recalibrate or choose another family"
            )
        return (f[0] / f).float()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (NaN R² stored as null)."""
        r2 = None if math.isnan(self.r2) else float(self.r2)
        return {"family": self.family, "params": [float(v) for v in self.params], "r2": r2, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PositionalTrend:
        """Builds a trend from :meth:`to_dict` output, validating family and parameter count.

        Raises:
            ValueError: missing fields, unknown family, or a wrong number of (or non-finite) params.
        """
        if not isinstance(d, dict) or "family" not in d or "params" not in d:
            raise ValueError(f"a positional trend needs 'family' and 'params' fields, got {d!r}")
        r2 = d.get("r2")
        return cls(d["family"], d["params"], float("nan") if r2 is None else float(r2), dict(d.get("meta") or {}))


def _fit_exp(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """``μ·exp(σx)``: log-space linear least squares, then Gauss-Newton on linear-space residuals."""
    design = torch.stack([torch.ones_like(x), x], dim=1)  # [L, 2]
    log_mu, sigma = torch.linalg.lstsq(design, y.log().unsqueeze(1)).solution.squeeze(1).tolist()
    mu = math.exp(log_mu)
    sse = float(((mu * torch.exp(sigma * x) - y) ** 2).sum())
    for _ in range(_GN_STEPS):
        e = torch.exp(sigma * x)  # [L]
        jac = torch.stack([e, mu * x * e], dim=1)  # [L, 2]
        step = torch.linalg.lstsq(jac, (y - mu * e).unsqueeze(1)).solution.squeeze(1)  # [2]
        mu_new, sigma_new = mu + float(step[0]), sigma + float(step[1])
        sse_new = float(((mu_new * torch.exp(sigma_new * x) - y) ** 2).sum())
        if not mu_new > 0 or not sse_new < sse:
            break
        converged = sse - sse_new <= 1e-12 * sse
        mu, sigma, sse = mu_new, sigma_new, sse_new
        if converged:
            break
    return [mu, sigma]


def fit_trend(mean_scores: torch.Tensor, family: str = "exp", **meta: Any) -> PositionalTrend:
    """Fits ``f(x)`` to per-position mean scores by least squares.

    Args:
        mean_scores: ``[L]`` mean score per flattened token position over calibration images (positive for exp).
        family: curve family, one of :data:`FAMILIES`.
        **meta: provenance stored in :attr:`PositionalTrend.meta` (``n_positions`` is added).

    Returns:
        The fitted trend with its linear-space R².

    Raises:
        ValueError: unknown family, ``L < 2``, non-finite values, or non-positive values under exp.
    """
    _check_family(family)
    y = _tensor(mean_scores).double().flatten()  # [L]
    if y.numel() < 2:
        raise ValueError(f"fitting a trend needs at least 2 positions, got {y.numel()}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("mean_scores contain NaN or inf; check the calibration scores")
    if family == "exp" and bool((y <= 0).any()):
        raise ValueError(f"the exp family needs positive mean scores (min {float(y.min()):.4g}); try 'cubic'")
    x = _grid(y.numel())  # [L]
    if family == "exp":
        params = _fit_exp(x, y)
    else:
        vander = torch.stack([x**k for k in range(_N_PARAMS[family])], dim=1)  # [L, P]
        params = torch.linalg.lstsq(vander, y.unsqueeze(1)).solution.squeeze(1).tolist()
    trend = PositionalTrend(family, params, meta={**meta, "n_positions": y.numel()})
    sse, sst = float(((trend.curve(x) - y) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    trend.r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else float("nan"))
    return trend


def _keep_mask(content: torch.Tensor, pad_threshold: float) -> torch.Tensor:
    """Tokens whose padding fraction ``1 − c`` is at most ``pad_threshold``, ``[n]`` bool."""
    if not 0.0 <= pad_threshold <= 1.0:
        raise ValueError(f"pad_threshold must lie in [0, 1], got {pad_threshold}")
    return _tensor(content).flatten().double() >= 1.0 - pad_threshold - 1e-6  # [n]; tolerance for float32 c


def debias_scores(
    scores: torch.Tensor,
    trend: PositionalTrend | None,
    content: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    pad_threshold: float = 0.5,
) -> torch.Tensor:
    """Debiases one image grid's / tile's visual-token scores: positional weights, then padding and sink zeroing.

    Args:
        scores: ``[n]`` importance scores in raster order.
        trend: fitted curve; None skips the positional step.
        content: ``[n]`` content fractions in [0, 1]; None means no padding.
        sinks: ``[n]`` bool mask of sink tokens to zero; None zeroes none.
        pad_threshold: largest padding fraction a kept token may have.

    Returns:
        ``[n]`` float32 debiased scores.
    """
    out = _tensor(scores).float().flatten().clone()  # [n]
    n = out.numel()
    for name, t in (("content", content), ("sinks", sinks)):
        if t is not None and _tensor(t).numel() != n:
            raise ValueError(f"{name} has {_tensor(t).numel()} entries but scores have {n}")
    if trend is not None:
        out = out * trend.weights(n).to(out.device)
    if content is not None:
        out[~_keep_mask(content, pad_threshold).to(out.device)] = 0.0
    if sinks is not None:
        out[_tensor(sinks).flatten().bool().to(out.device)] = 0.0
    return out


def effective_budget(k: int, content: torch.Tensor | None, pad_threshold: float = 0.5) -> int:
    """The budget ``k`` capped at the number of content (non-padding) tokens; ``k`` itself when content is None."""
    if k < 0:
        raise ValueError(f"budget k must be >= 0, got {k}")
    if content is None:
        return int(k)
    return min(int(k), int(_keep_mask(content, pad_threshold).sum()))


def trend_key(pruner: str, layer: int | None, rule: str) -> str:
    """Key of a trend in :data:`TREND_FILE`, e.g. ``fastv/layer1/last`` or ``fastervlm/cls``."""
    return "/".join([pruner, *([f"layer{layer}"] if layer is not None else []), rule])


def save_trend(path: str | Path, key: str, trend: PositionalTrend) -> None:
    """Stores ``trend`` under ``key`` in the JSON file ``path``, keeping its other keys; writes atomically."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = trend.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_trend(path: str | Path, key: str) -> PositionalTrend:
    """Loads the trend stored under ``key`` in ``path``.

    Raises:
        FileNotFoundError: no such file (the message names the calibration command).
        KeyError: no such key (the message lists the keys present and the calibration command).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no attention-debias file {path}; calibrate first: {CALIBRATE_CMD}")
    data = json.loads(path.read_text())
    if key not in data:
        raise KeyError(f"no trend {key!r} in {path} (present: {sorted(data)}); calibrate it: {CALIBRATE_CMD}")
    return PositionalTrend.from_dict(data[key])
