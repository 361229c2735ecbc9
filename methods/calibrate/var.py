"""Calibrate VAR's sink dimensions on any model: ``python -m methods.calibrate var --model llava [--path P]``.

Writes ``var_sinks.json`` beside the checkpoint (or ``--out``); see :mod:`methods.var` for the rule.
"""

from __future__ import annotations

import json
from pathlib import Path

from methods.calibrate import parser
from methods.var import SINK_FILE, choose_sinks, measure_channels


def main(argv: list[str] | None = None) -> None:
    """CLI: calibrate a model's sink dimensions and write ``var_sinks.json``."""
    from PIL import Image

    import adapters  # noqa: F401  (registers adapters)
    from harness.config import REPO_ROOT, calibration_target

    ap = parser("var", "Measure massive-activation channels for VAR", SINK_FILE)
    ap.add_argument("--images", default=str(REPO_ROOT / "assets" / "shapes-world" / "pope" / "images"))
    ap.add_argument("--n", type=int, default=32, help="calibration images")
    ap.add_argument("--outlier", type=float, default=3.0)
    args = ap.parse_args(argv)
    adapter, out = calibration_target(args.model, args.path, args.out, SINK_FILE, "sink_file")
    adapter.load()
    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".png"))[: args.n]
    questions = ["Describe this image.", "Is there a circle in the image?", "What colour is the largest object?"]
    prompts = [adapter.format_prompt(questions[i % len(questions)]) for i in range(len(files))]
    images = [[Image.open(f).convert("RGB")] for f in files]
    result = choose_sinks(measure_channels(adapter, prompts, images), args.outlier)
    model = Path(adapter.path).name if Path(adapter.path).is_dir() else adapter.path
    result |= {"model": model, "images": len(files), "hidden_size": adapter.site("lm.embed").weight.shape[1]}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
