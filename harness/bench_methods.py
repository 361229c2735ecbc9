"""Benchmark: each method's time per sample over ``none``, side by side on the same inputs, in one run.

    python -m harness.bench_methods                         # mid-size random LLaVA, 576 visual tokens, CPU/GPU
    python -m harness.bench_methods --device cuda --batch-size 16 --layers 32

A random-init LLaVA with realistic token counts (336 px images in 14 px patches: 576 visual tokens, as LLaVA-1.5)
and an LM of ``--layers`` layers generates ``--max-new-tokens`` tokens (``min_new_tokens`` too) for the same
batch of prompts and images under every method; methods are interleaved ``--repeats`` times and the median wall
time compared with ``none``'s. Targets (issue 5): VAR ≤ 1.15×, CCA and MMA ≤ 1.05×.

VAR is given explicit sink dims and a tau that makes sinks exist (random weights have no massive activations);
its cost does not depend on how many rows it selects (every eligible row is evaluated).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from adapters.llava import LlavaAdapter
from adapters.tiny import build_tiny_llava
from harness.assets import tokenizer_corpus
from harness.bench import MID, TINY, cli
from harness.results import environment
from methods.base import METHODS
from tasks.shapes import WorldSpec, generate

METHOD_ARGS: dict[str, dict[str, Any]] = {
    "none": {},
    "var": {"sink_dims": [0, 1], "tau": 3.0},
    "cca": {},
    "mma": {},
}


def _timed(adapter: LlavaAdapter, name: str, inputs: dict[str, torch.Tensor], new: int) -> float:
    method = METHODS.get(name)(**METHOD_ARGS[name])
    with method.bind(adapter):
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        adapter.generate_ids(inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and one batch, time every method interleaved, print and return the figures."""
    import dataclasses

    import methods  # noqa: F401  (registers methods)

    size = dataclasses.replace(TINY if args.tiny else MID, text_layers=args.layers)
    work = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    ckpt = build_tiny_llava(work / "model", tokenizer_corpus(), size, seed=0)
    adapter = LlavaAdapter(name="bench", path=str(ckpt), device=args.device, dtype=args.dtype)
    adapter.load()
    scenes = generate(args.batch_size, 5, WorldSpec(image_size=size.image_size, min_objects=3))
    from PIL import Image

    questions = ["Is there a red circle in the image?", "Is there a star?", "What is in the picture? Be brief."]
    prompts = [adapter.format_prompt(questions[i % 3] + " Answer yes or no.") for i in range(args.batch_size)]
    inputs = adapter.build_inputs(prompts, [[Image.fromarray(s.image)] for s in scenes])
    names = ["none", *args.methods]
    for name in names:  # warm-up
        _timed(adapter, name, inputs, args.max_new_tokens)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(_timed(adapter, name, inputs, args.max_new_tokens))
    base = statistics.median(times["none"])
    report = {
        "model": {
            "visual_tokens": size.n_visual_tokens,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "lm_layers": args.layers,
            "params": sum(p.numel() for p in adapter.model.parameters()),
            "device": str(adapter.device),
            "dtype": args.dtype,
        },
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "methods": {
            n: {
                "s_per_sample": statistics.median(t) / args.batch_size,
                "ratio": statistics.median(t) / base,
                "runs_s": t,
            }
            for n, t in times.items()
        },
        "environment": environment(),
    }
    _print(report)
    return report


def _print(r: dict[str, Any]) -> None:
    m = r["model"]
    print(
        f"\nLLaVA random-init, {m['params'] / 1e6:.1f} M params, {m['lm_layers']} LM layers, {m['visual_tokens']} "
        f"visual tokens ({m['prompt_tokens']} prompt tokens), {m['device']} {m['dtype']}, batch {r['batch_size']}, "
        f"{r['max_new_tokens']} new tokens, median of {r['repeats']}"
    )
    print("| method | s/sample | ratio to none |\n|---|---|---|")
    for name, t in r["methods"].items():
        print(f"| {name} | {t['s_per_sample']:.4f} | {t['ratio']:.3f} |")


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description="time per sample of each method over none, same inputs, one run")
    ap.add_argument("--methods", nargs="+", default=["var", "cca", "mma"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8, help="LM layers (VAR edits layers 2..L-2)")
    cli(ap, run)


if __name__ == "__main__":
    main()
