"""Benchmark: the harness against a plain HF ``generate`` loop, side by side on the same inputs, in one run.

    python -m bench.overhead                      # mid-size random LLaVA, 576 visual tokens, CPU or GPU
    python -m bench.overhead --device cuda --n-samples 256 --batch-sizes 1 4 16 64

What it prints:

1. **Overhead** at one batch size: seconds per sample of ``harness.engine.evaluate`` (image loading, prompt
   template, left-padded batching, generation, parsing, durable per-sample JSONL, metrics with bootstrap,
   results file) against a bare loop of ``processor(...)`` + ``model.generate`` + ``batch_decode`` over the
   same prompts, images and batches. The two are interleaved ``--repeats`` times and the medians compared.
   Target: the harness adds at most 5 %.
2. **Throughput** of the harness at each of ``--batch-sizes`` (samples/s, and speed-up over batch size 1).

The model is random-init (weights do not matter for speed) with realistic token counts: a 336 px image in
14 px patches gives 576 visual tokens per sample, as LLaVA-1.5 has. Every sample generates exactly
``--max-new-tokens`` tokens (``min_new_tokens`` is set too) so both paths do the same work.
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

from adapters.llava import LlavaAdapter
from harness.engine import RunSettings, evaluate
from harness.provenance import environment
from methods.none import NoMethod
from shapes.assets import tokenizer_corpus
from shapes.export import export_pope
from shapes.scene import WorldSpec, generate
from shapes.tiny import LlavaSize, build_tiny_llava
from tasks.pope import POPETask

MID = LlavaSize(
    image_size=336,
    patch_size=14,
    vision_hidden=256,
    vision_layers=4,
    vision_heads=4,
    text_hidden=512,
    text_layers=4,
    text_heads=8,
    text_kv_heads=8,
)
TINY = LlavaSize()


def _task(data: Path, n_per_split: int, max_new_tokens: int) -> POPETask:
    return POPETask(
        questions=str(data / "shapes_pope_{split}.json"),
        image_root=str(data / "images"),
        splits=["random"],
        limit=n_per_split,
        n_boot=1000,
        gen_kwargs={"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "do_sample": False},
    )


def time_harness(
    adapter: LlavaAdapter, task: POPETask, batch_size: int, workdir: Path, prefetch: int | str = "auto"
) -> float:
    """Wall seconds of one full ``evaluate`` (fresh output directory, model already loaded).

    ``prefetch``: the run setting (default ``auto``, what a run gets; 0: images decoded in line, as the bare loop).
    """
    out = Path(tempfile.mkdtemp(dir=workdir))
    t0 = time.perf_counter()
    evaluate(
        task,
        adapter,
        NoMethod(),
        RunSettings(
            output_dir=out, config_hash="bench", batch_size=batch_size, progress=False, report=False, prefetch=prefetch
        ),
    )
    return time.perf_counter() - t0


@torch.inference_mode()
def time_plain(adapter: LlavaAdapter, task: POPETask, batch_size: int) -> float:
    """Wall seconds of a bare HF loop over the same prompts and images, in the same batches."""
    model, proc = adapter.model, adapter.processor
    samples = task.samples()
    t0 = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        prompts = [
            proc.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.text}]}],
                add_generation_prompt=True,
            )
            for s in batch
        ]
        images = [im for s in batch for im in s.images()]
        inputs = proc(text=prompts, images=images, padding=True, return_tensors="pt").to(adapter.device)
        out = model.generate(**inputs, **task.gen_kwargs)
        proc.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and data, measure, print and return the figures."""
    size = TINY if args.tiny else MID
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    ckpt = build_tiny_llava(work / "model", tokenizer_corpus(), size, seed=0)
    data = work / "data"
    scenes = generate(4 * max(8, -(-args.n_samples // 6)), 3, WorldSpec(image_size=size.image_size, min_objects=3))
    export_pope(scenes, data, seed=3)
    adapter = LlavaAdapter(name="bench", path=str(ckpt), device=args.device, dtype=args.dtype)
    adapter.load()
    task = _task(data, args.n_samples, args.max_new_tokens)
    n = len(task.samples())
    time_plain(adapter, task, args.batch_size)  # warm-up both paths (allocator, kernels, OS file cache)
    time_harness(adapter, task, args.batch_size, work)
    harness_s, plain_s = [], []
    for _ in range(args.repeats):
        plain_s.append(time_plain(adapter, task, args.batch_size))
        harness_s.append(time_harness(adapter, task, args.batch_size, work))
    h, p = statistics.median(harness_s), statistics.median(plain_s)
    report: dict[str, Any] = {
        "model": {
            "visual_tokens": size.n_visual_tokens,
            "params": sum(x.numel() for x in adapter.model.parameters()),
            "device": str(adapter.device),
            "dtype": args.dtype,
        },
        "n_samples": n,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "overhead": {
            "batch_size": args.batch_size,
            "harness_s_per_sample": h / n,
            "plain_s_per_sample": p / n,
            "ratio": h / p,
            "harness_runs_s": harness_s,
            "plain_runs_s": plain_s,
        },
        "throughput": {},
        "environment": environment(),
    }
    for bs in args.batch_sizes:
        secs = time_harness(adapter, task, bs, work)
        report["throughput"][bs] = {"samples_per_s": n / secs, "s_per_sample": secs / n}
    _print(report)
    return report


def _print(r: dict[str, Any]) -> None:
    o = r["overhead"]
    print(
        f"\nLLaVA random-init, {r['model']['params'] / 1e6:.1f} M params, {r['model']['visual_tokens']} visual "
        f"tokens, {r['model']['device']} {r['model']['dtype']}, {r['n_samples']} samples, "
        f"{r['max_new_tokens']} new tokens each, median of {r['repeats']}"
    )
    print(
        f"| batch | harness s/sample | plain HF s/sample | harness / plain |\n|---|---|---|---|\n"
        f"| {o['batch_size']} | {o['harness_s_per_sample']:.4f} | {o['plain_s_per_sample']:.4f} | "
        f"{o['ratio']:.3f} ({(o['ratio'] - 1) * 100:+.1f} %) |"
    )
    base = r["throughput"].get(min(r["throughput"]), None) if r["throughput"] else None
    print("| batch | samples/s | speed-up vs smallest batch |\n|---|---|---|")
    for bs, t in r["throughput"].items():
        print(f"| {bs} | {t['samples_per_s']:.2f} | {t['samples_per_s'] / base['samples_per_s']:.2f}x |")


def cli(ap: argparse.ArgumentParser, run_fn: Any) -> dict[str, Any]:
    """Add the options every benchmark shares, parse, run ``run_fn(args)`` and write ``--json`` if asked."""
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tiny", action="store_true", help="64 px / 64 visual tokens model (smoke test)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    report = run_fn(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return report


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description="harness vs plain HF generate, and throughput by batch size")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8, help="batch size of the overhead comparison")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    cli(ap, run)


if __name__ == "__main__":
    main()
