"""Calibrations the methods read from files beside a checkpoint, behind one entry point.

    python -m methods.calibrate var       --model llava   # VAR's sink dimensions          -> var_sinks.json
    python -m methods.calibrate fcct      --model llava   # IRI's per-layer recovery rates  -> iri_fcct.json
    python -m methods.calibrate debias    --model llava --pruner fastv|fastervlm  # trends  -> attn_debias.json
    python -m methods.calibrate embedlens --model llava   # EmbedLens' marker token ids     -> embedlens_markers.json

``python -m methods.calibrate NAME --help`` lists each one's options. The algorithms live with their methods
(:mod:`methods.var`, :mod:`methods.fcct`, :mod:`methods.debias`, :mod:`methods.embedlens`); these modules are the
command lines that run them on a model and write the file.
"""

from __future__ import annotations

import argparse

#: calibration name -> (module with ``main(argv)``, file it writes)
CALIBRATIONS: dict[str, tuple[str, str]] = {
    "var": ("methods.calibrate.var", "var_sinks.json"),
    "fcct": ("methods.calibrate.fcct", "iri_fcct.json"),
    "debias": ("methods.calibrate.debias", "attn_debias.json"),
    "embedlens": ("methods.calibrate.embedlens", "embedlens_markers.json"),
}


def parser(
    name: str, description: str, out_file: str, model_help: str = "conf/model option"
) -> argparse.ArgumentParser:
    """The options every calibration shares: ``--model``, ``--path`` and ``--out`` (default: beside the checkpoint)."""
    ap = argparse.ArgumentParser(prog=f"python -m methods.calibrate {name}", description=description)
    ap.add_argument("--model", default="llava", help=model_help)
    ap.add_argument("--path", default=None, help="checkpoint directory or hub id (default: the option's)")
    ap.add_argument("--out", default=None, help=f"output file (default: <checkpoint>/{out_file})")
    return ap
