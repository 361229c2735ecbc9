"""Benchmark: each method's time per sample over ``none``, side by side on the same inputs, in one run.

    python -m bench.methods                         # mid-size random LLaVA, 576 visual tokens, CPU/GPU
    python -m bench.methods --device cuda --batch-size 16 --layers 32
    python -m bench.methods --shipped --methods carve iri   # shipped LLaVA on shipped POPE questions

A random-init LLaVA with realistic token counts (336 px images in 14 px patches: 576 visual tokens, as LLaVA-1.5)
and an LM of ``--layers`` layers answers the same batch of requests (text + image) under every method, through the
task path (:class:`harness.calls.AdapterCalls`, so multi-pass methods pay for their passes), generating
``--max-new-tokens`` tokens (``min_new_tokens`` too); methods are interleaved ``--repeats`` times and the median wall
time compared with ``none``'s. Targets: VAR ≤ 1.15×, CCA and MMA ≤ 1.05× (issue 5), CARVE ≤ 3×, IRI ≈ 1× (issue 8).

VAR is given explicit sink dims and a tau that makes sinks exist (random weights have no massive activations);
its cost does not depend on how many rows it selects (every eligible row is evaluated). IRI is given a synthetic
FCCT file (its cost does not depend on the rates). CARVE on a random model is its worst case: both attention passes
run all ``max_new_tokens`` (32) steps, as a random model rarely ends early. ``--shipped`` measures the realistic case
instead: the shipped LLaVA (and its committed FCCT file) on the first ``--batch-size`` × ``--batches`` questions
of the shipped POPE adversarial split in file order (six per image, so CARVE's general pass is shared), with
POPE's own generation settings (greedy, up to 128 tokens, stopping at EOS), each method with a fresh state.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from adapters.llava import LlavaAdapter
from bench.overhead import MID, TINY, cli
from harness.calls import AdapterCalls
from harness.config import REPO_ROOT
from harness.provenance import environment
from methods.base import METHODS
from shapes.assets import tokenizer_corpus
from shapes.scene import WorldSpec, generate
from shapes.tiny import build_tiny_llava
from tasks.base import Request

METHOD_ARGS: dict[str, dict[str, Any]] = {
    "none": {},
    "var": {"sink_dims": [0, 1], "tau": 3.0},
    "cca": {},
    "mma": {},
    "carve": {},
    "iri": {},
}
SHIPPED = REPO_ROOT / "assets" / "shapes-llava"
POPE = REPO_ROOT / "assets" / "shapes-world" / "pope"
SUFFIX = "\nAnswer the question using a single word or phrase."


def _timed(adapter: LlavaAdapter, name: str, batches: list[list[Request]], gen: dict[str, Any], extra: dict) -> float:
    method = METHODS.get(name)(**(METHOD_ARGS[name] | extra.get(name, {})))
    with torch.inference_mode(), method.bind(adapter):
        calls = AdapterCalls(adapter, len(batches[0]), method)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for batch in batches:
            calls.generate(batch, **gen)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _synthetic_fcct(path: Path, layers: int) -> str:
    """An FCCT file with a mid-layer bump of last-token recovery (timing does not depend on the values)."""
    rr = [round(max(0.0, 1 - abs(layer - layers / 2) / (layers / 2)), 3) for layer in range(layers)]
    path.write_text(json.dumps({"layers": layers, "rr": {"attn": {"last": rr}, "mlp": {"last": rr}}}))
    return str(path)


def _random_setup(args: argparse.Namespace, work: Path) -> tuple[LlavaAdapter, list[list[Request]], dict, dict]:
    import dataclasses

    size = dataclasses.replace(TINY if args.tiny else MID, text_layers=args.layers)
    ckpt = build_tiny_llava(work / "model", tokenizer_corpus(), size, seed=0)
    adapter = LlavaAdapter(name="bench", path=str(ckpt), device=args.device, dtype=args.dtype)
    scenes = generate(args.batch_size, 5, WorldSpec(image_size=size.image_size, min_objects=3))
    questions = ["Is there a red circle in the image?", "Is there a star?", "What is in the picture? Be brief."]
    batch = [Request(questions[i % 3] + " Answer yes or no.", [Image.fromarray(s.image)]) for i, s in enumerate(scenes)]
    gen = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens, "do_sample": False}
    return adapter, [batch], gen, {"iri": {"fcct_file": _synthetic_fcct(work / "fcct.json", args.layers)}}


def _shipped_setup(args: argparse.Namespace) -> tuple[LlavaAdapter, list[list[Request]], dict, dict]:
    adapter = LlavaAdapter(name="shapes-llava", path=str(SHIPPED), device=args.device, dtype=args.dtype)
    lines = (POPE / "shapes_pope_adversarial.json").read_text().splitlines()[: args.batch_size * args.batches]
    rows = [json.loads(line) for line in lines]
    requests = [Request(r["text"] + SUFFIX, [Image.open(POPE / "images" / r["image"]).convert("RGB")]) for r in rows]
    batches = [requests[i : i + args.batch_size] for i in range(0, len(requests), args.batch_size)]
    return adapter, batches, {"max_new_tokens": 128, "do_sample": False}, {}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and the batches, time every method interleaved, print and return the figures."""
    import methods  # noqa: F401  (registers methods)

    work = Path(tempfile.mkdtemp(prefix="bench-methods-"))
    adapter, batches, gen, extra = _shipped_setup(args) if args.shipped else _random_setup(args, work)
    adapter.load()
    names = ["none", *args.methods]
    for name in names:  # warm-up
        _timed(adapter, name, batches[:1], gen, extra)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(_timed(adapter, name, batches, gen, extra))
    base = statistics.median(times["none"])
    n_samples = sum(len(b) for b in batches)
    probe = adapter.build_inputs([adapter.format_prompt(batches[0][0].text)], [batches[0][0].images])
    report = {
        "model": {
            "name": "shipped shapes-llava" if args.shipped else "random-init LLaVA",
            "visual_tokens": int(adapter.image_token_mask(probe).sum()),
            "prompt_tokens": int(probe["input_ids"].shape[1]),
            "lm_layers": adapter.num_layers("lm"),
            "params": sum(p.numel() for p in adapter.model.parameters()),
            "device": str(adapter.device),
            "dtype": args.dtype,
        },
        "batch_size": args.batch_size,
        "samples": n_samples,
        "generation": gen,
        "repeats": args.repeats,
        "methods": {
            n: {
                "s_per_sample": statistics.median(t) / n_samples,
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
        f"\n{m['name']}, {m['params'] / 1e6:.1f} M params, {m['lm_layers']} LM layers, {m['visual_tokens']} "
        f"visual tokens ({m['prompt_tokens']} prompt tokens), {m['device']} {m['dtype']}, {r['samples']} samples in "
        f"batches of {r['batch_size']}, generation {r['generation']}, median of {r['repeats']}"
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
    ap.add_argument("--shipped", action="store_true", help="shipped LLaVA on shipped POPE questions (realistic)")
    ap.add_argument("--batches", type=int, default=6, help="--shipped: batches of POPE questions timed")
    cli(ap, run)


if __name__ == "__main__":
    main()
