"""Which image-processor backend transformers builds for each shipped checkpoint, here.

transformers 5.x builds the torchvision-backed image processor where torchvision imports and the PIL one
(``...Pil``) otherwise. GPU machines have torchvision; this project's CPU development environment does not (its
only torchvision wheel cannot load beside the CPU torch). ``make test-torchvision`` starts with this check so the
tests it runs cannot pass on the PIL path by accident.

    python -m checks.image_backend                          # print the class and backend per shipped checkpoint
    python -m checks.image_backend --expect torchvision     # and exit 1 unless every one uses that backend
"""

from __future__ import annotations

import argparse
import sys

from adapters.base import ADAPTERS
from adapters.hf_compat import image_processing
from shapes.assets import SHIPPED


def backends() -> dict[str, dict[str, str | None] | None]:
    """``{option: {"class", "backend"}}`` for every shipped checkpoint's processor (weights are not loaded)."""
    out = {}
    for option, shipped in SHIPPED.items():
        adapter = ADAPTERS.get(shipped.family)(name=option, path=str(shipped.path))
        out[option] = image_processing(adapter.load_processor())
    return out


def main(argv: list[str] | None = None) -> int:
    """Print every shipped checkpoint's image processor; with ``--expect``, fail on another backend."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expect", choices=["torchvision", "pil"], help="exit 1 unless every checkpoint uses it")
    args = ap.parse_args(argv)
    found = backends()
    for option, info in found.items():
        print(f"{option}: {info}")
    wrong = [o for o, info in found.items() if args.expect and (info or {}).get("backend") != args.expect]
    if wrong:
        print(f"expected the {args.expect} backend; not used by: {', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
