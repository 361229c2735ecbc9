"""FCCT calibration for IRI: ``python -m methods.calibrate fcct --model llava [--path DIR_OR_ID] [--n 64]``.

Traces per-layer recovery rates (:func:`methods.fcct.trace`) on fresh shapes-world probes and writes
``iri_fcct.json`` (and its heatmap) beside the checkpoint, or ``--out``.
"""

from __future__ import annotations

import json

from PIL import Image

from methods.calibrate import parser
from methods.fcct import FCCT_FILE, Probe, heatmap, trace
from shapes.scene import generate


def shapes_probes(n: int, seed: int = 0) -> list[Probe]:
    """``n`` probes from fresh shapes-world scenes (split ``fcct``): each scene's largest, most visible object."""
    probes = []
    for scene in generate(n, seed, split="fcct"):
        obj = max(scene.objects, key=lambda o: (o.visible >= 0.8, o.radius))
        (cx, cy), r = obj.center, obj.radius
        probes.append(Probe(Image.fromarray(scene.image), obj.shape, (cx - r, cy - r, cx + r, cy + r)))
    return probes


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    import adapters  # noqa: F401  (registers adapters)
    from harness.config import calibration_target

    ap = parser("fcct", "FCCT causal tracing: per-layer recovery rates for IRI", FCCT_FILE)
    ap.add_argument("--n", type=int, default=64, help="probes (fresh shapes-world scenes)")
    ap.add_argument("--noise", type=float, default=3.0, help="noise σ in units of the pixel values' std")
    ap.add_argument("--answer", default="Yes", help="the correct answer whose probability is traced")
    ap.add_argument("--min-gap", type=float, default=0.1, help="minimum P_clean - P_corrupted of a used probe")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    adapter, out = calibration_target(args.model, args.path, args.out, FCCT_FILE, "fcct_file")
    adapter.load()
    cal = trace(adapter, shapes_probes(args.n), args.answer, args.noise, args.batch_size, args.min_gap)
    out.write_text(json.dumps(cal, indent=1) + "\n")
    heatmap(cal, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in cal.items() if k != "rr"}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")
