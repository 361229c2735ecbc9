"""Benchmark: visual-token pruning — prefill speed-up and peak memory over ``none``, and accuracy retained.

    python -m bench.pruning                          # CPU: speed on a 576-token LLaVA, POPE on the shipped one
    python -m bench.pruning --device cuda --layers 32 --batch-size 8

**Speed.** A random-init LLaVA with LLaVA-1.5's token counts (336 px images in 14 px patches: 576 visual tokens)
and an LM of ``--layers`` layers runs the prefill (one ``adapter.forward`` over the prompt, last-token logits,
vision tower included) on the same batch under every setting, interleaved ``--repeats`` times; the median time is
compared with ``none``'s. Peak memory: on CUDA ``max_memory_allocated`` during the prefill; on the CPU the
allocator's peak of live bytes in one more, untimed prefill per setting (:mod:`bench.memcount`: exact).

**Accuracy.** Shapes-world POPE (all three splits, or ``--pope-limit`` per split) on the shipped tiny LLaVAs
(``--accuracy-models``: ``llava``, 64 visual tokens, and ``llava_144``, the same recipe at 96 px, 144 tokens) under
each setting; retained = setting's accuracy / ``none``'s. Two diagnostics fill FasterVLM's 90 % budget with other
scores: ``object oracle`` (every ground-truth object's best-covered token first: what a perfect [CLS] could keep)
and ``random`` (chance, the floor the [CLS] ranking has to beat).

**Selection against the world's ground truth.** For FasterVLM's budgets on the POPE images: the share of kept
tokens whose cell lies on an object (precision) and the share of objects with at least one kept token (coverage),
beside a random choice of as many tokens (``--coverage-images``, 0 to skip).

Targets (issue 7): FastV R=50 % ≥ 1.4× faster prefill, R=90 % ≥ 2.5×; FasterVLM at 90 % keeps ≥ 90 % of the
baseline POPE accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from adapters.geometry import box_overlap
from adapters.llava import LlavaAdapter
from bench.overhead import MID, TINY, cli
from bench.scale import prefill_peak
from harness.provenance import environment
from methods.base import METHODS
from methods.fcct import MIN_OVERLAP
from methods.pruning import budget
from shapes.assets import WORLD_DIR, tokenizer_corpus
from shapes.export import pope_scenes
from shapes.scene import WorldSpec, generate
from shapes.tiny import build_tiny_llava

SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "fastv R=50%": ("fastv", {"ratio": 0.5}),
    "fastv R=75%": ("fastv", {"ratio": 0.75}),
    "fastv R=90%": ("fastv", {"ratio": 0.9}),
    "fastervlm R=50%": ("fastervlm", {"ratio": 0.5}),
    "fastervlm R=75%": ("fastervlm", {"ratio": 0.75}),
    "fastervlm R=90%": ("fastervlm", {"ratio": 0.9}),
}
#: Accuracy-only diagnostics: FasterVLM's 90 % budget filled by other scores (:func:`replaced_scores` kind): the
#: ground-truth objects (an upper bound for [CLS]-style selection) and chance (the floor [CLS] has to beat).
ORACLE: dict[str, tuple[str, dict[str, Any], str]] = {
    "object oracle R=90%": ("fastervlm", {"ratio": 0.9}, "objects"),
    "random R=90%": ("fastervlm", {"ratio": 0.9}, "random"),
}
ORACLE_SETTINGS = list(ORACLE)


def _prefill(adapter: LlavaAdapter, setting: str, inputs: dict[str, torch.Tensor]) -> tuple[float, int | None]:
    """Seconds of one prefill and, on CUDA, its peak memory above the level before it (None on the CPU)."""
    name, kw = SETTINGS[setting]
    cuda = adapter.device.type == "cuda"
    with torch.inference_mode(), METHODS.get(name)(**kw).bind(adapter):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        adapter.forward(inputs, logits_to_keep=1)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds, torch.cuda.max_memory_allocated() - base if cuda else None


def speed(args: argparse.Namespace, settings: list[str]) -> dict[str, Any]:
    """Median prefill time and peak memory per setting, interleaved, on a 576-visual-token LLaVA."""
    size = dataclasses.replace(TINY if args.tiny else MID, text_layers=args.layers)
    work = Path(tempfile.mkdtemp(prefix="bench-pruning-"))
    adapter = LlavaAdapter(name="bench", path=str(build_tiny_llava(work / "m", tokenizer_corpus(), size, seed=0)),
                           device=args.device, dtype=args.dtype)  # fmt: skip
    adapter.load()
    from PIL import Image

    scenes = generate(args.batch_size, 5, WorldSpec(image_size=size.image_size, min_objects=3))
    prompts = [adapter.format_prompt("Is there a red circle in the image? Answer yes or no.")] * args.batch_size
    inputs = adapter.build_inputs(prompts, [[Image.fromarray(s.image)] for s in scenes])
    for s in settings:  # warm-up
        _prefill(adapter, s, inputs)
    times: dict[str, list[float]] = {s: [] for s in settings}
    memory: dict[str, list[int]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for s in settings:
            t, m = _prefill(adapter, s, inputs)
            times[s].append(t)
            if m is not None:
                memory[s].append(m)
    if adapter.device.type != "cuda":
        memory = {s: [prefill_peak(adapter, METHODS.get(SETTINGS[s][0])(**SETTINGS[s][1]), inputs)] for s in settings}
    base_t, base_m = statistics.median(times["none"]), statistics.median(memory["none"])
    return {
        "model": {"visual_tokens": size.n_visual_tokens, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                  "lm_layers": args.layers, "params": sum(p.numel() for p in adapter.model.parameters()),
                  "device": str(adapter.device), "dtype": args.dtype, "batch_size": args.batch_size},
        "settings": {s: {"prefill_s": statistics.median(times[s]), "speedup": base_t / statistics.median(times[s]),
                         "peak_mb": statistics.median(memory[s]) / 2**20,
                         "memory_ratio": statistics.median(memory[s]) / base_m if base_m > 0 else None}
                     for s in settings},
    }  # fmt: skip


def _shipped(model: str, device: str) -> LlavaAdapter:
    """A loaded shipped tiny LLaVA (``conf/model`` option ``model``)."""
    from shapes.assets import SHIPPED

    if model not in SHIPPED or SHIPPED[model].family != "llava":
        raise ValueError(f"--accuracy-models takes shipped LLaVA options, got {model!r}")
    adapter = LlavaAdapter(name=model, path=str(SHIPPED[model].path), device=device)
    adapter.load()
    return adapter


def _pope_scenes() -> tuple[Path, dict[int, dict[str, Any]]]:
    """The shipped shapes-world export and its scenes (objects with centres and radii) by index."""
    metadata = json.loads((WORLD_DIR / "metadata.json").read_text())
    return WORLD_DIR, {s["index"]: s for s in pope_scenes(metadata)}


def object_overlaps(adapter: LlavaAdapter, inputs: dict[str, torch.Tensor], scene: dict[str, Any]) -> torch.Tensor:
    """``[n_objects, n_tokens]``: share of each visual token's cell covered by each object's box (one image)."""
    cells = adapter.token_cells(inputs)[0][0]  # [n, 4]
    boxes = [(cx - r, cy - r, cx + r, cy + r) for o in scene["objects"] for (cx, cy), r in [(o["center"], o["radius"])]]
    return torch.stack([box_overlap(cells, torch.tensor(b, dtype=torch.float64)) for b in boxes])


def object_oracle_scores(overlaps: torch.Tensor) -> torch.Tensor:
    """Scores whose top-k is the object-aware choice (ground truth, not a pruning method).

    Every object's best-covered token comes first, then each one's second best, and so on (round robin over the
    objects in scene order); tokens on no object score 0.

    Args:
        overlaps: ``[n_objects, n]`` cell coverage by each object.

    Returns:
        ``[n]`` scores, higher = kept earlier.
    """
    n_obj, n = overlaps.shape
    order = overlaps.argsort(dim=1, descending=True, stable=True)  # [n_objects, n]
    scores = torch.zeros(n, dtype=torch.float64)
    rank = 0
    for t in range(n):
        for j in range(n_obj):
            i = order[j, t]
            if scores[i] == 0 and overlaps[j, i] > 0:
                scores[i] = 2 * n * n_obj - rank
                rank += 1
    return scores


@contextlib.contextmanager
def replaced_scores(adapter: LlavaAdapter, world: Path, scenes: dict[int, dict[str, Any]], kind: str) -> Iterator[None]:
    """Within the block, FasterVLM's [CLS] scores of each POPE image are replaced (images recognised by pixels).

    Args:
        adapter: A loaded LLaVA adapter.
        world: Shapes-world export.
        scenes: Its scenes by index (object boxes).
        kind: ``"objects"``: :func:`object_oracle_scores`, a bound on what any [CLS]-style score could select;
            ``"random"``: uniform scores drawn once per image (seeded by the scene index), the chance baseline.
    """
    table: dict[bytes, torch.Tensor] = {}
    key = lambda pv: hashlib.sha1(pv.float().cpu().numpy().tobytes()).digest()  # noqa: E731
    for path in sorted((world / "pope" / "images").glob("shapes_*.png")):
        index = int(path.stem.split("_")[1])
        inputs = adapter.build_inputs([adapter.format_prompt("x")], [[Image.open(path).convert("RGB")]])
        overlaps = object_overlaps(adapter, inputs, scenes[index])  # [objects, n]
        if kind == "objects":
            scores = object_oracle_scores(overlaps).float()
        else:
            scores = torch.rand(overlaps.shape[1], generator=torch.Generator().manual_seed(index))
        table[key(inputs["pixel_values"][0])] = scores
    adapter.vision_cls_attention = lambda inputs: [table[key(pv)] for pv in inputs["pixel_values"]]
    try:
        yield
    finally:
        del adapter.vision_cls_attention  # back to the class's method


def accuracy(args: argparse.Namespace, settings: list[str]) -> dict[str, Any]:
    """Shapes-world POPE accuracy of each setting on each shipped LLaVA, and the share of ``none``'s kept."""
    from harness.engine import RunSettings, evaluate
    from tasks.pope import POPETask

    world, scenes = _pope_scenes()
    data = world / "pope"
    out: dict[str, Any] = {}
    for model in args.accuracy_models:
        adapter = _shipped(model, args.device)
        rows: dict[str, Any] = {}
        for s in settings + ORACLE_SETTINGS:
            name, kw = (SETTINGS | ORACLE)[s][:2]
            task = POPETask(questions=str(data / "shapes_pope_{split}.json"), image_root=str(data / "images"),
                            limit=args.pope_limit, n_boot=200)  # fmt: skip
            oracle = replaced_scores(adapter, world, scenes, ORACLE[s][2]) if s in ORACLE else contextlib.nullcontext()
            with oracle:
                res = evaluate(
                    task,
                    adapter,
                    METHODS.get(name)(**kw),
                    RunSettings(
                        Path(tempfile.mkdtemp(prefix="bench-pope-")),
                        config_hash=s,
                        batch_size=16,
                        progress=False,
                        report=False,
                    ),
                )
            rows[s] = {"accuracy": res["results"]["pope"]["accuracy,pope_official"],
                       "n": res["n-samples"]["pope"]["effective"]}  # fmt: skip
        base = rows["none"]["accuracy"]
        for v in rows.values():
            v["retained"] = v["accuracy"] / base if base else None
        out[model] = {"visual_tokens": math.prod(adapter.grid_shape()), "settings": rows}
    return out


def selection_stats(scores: torch.Tensor, objects: torch.Tensor, k: int, rng: torch.Generator) -> dict[str, float]:
    """Top-``k`` of ``scores [n]`` against the objects' token masks ``[n_objects, n]``, and ``k`` random tokens.

    Returns precision (kept tokens on any object) and coverage (objects with a kept token) of both choices.
    """
    on_object = objects.any(0)  # [n]
    out = {}
    for name, idx in (
        ("top", torch.topk(scores, k).indices),
        ("random", torch.randperm(len(scores), generator=rng)[:k]),
    ):
        out[f"precision_{name}"] = on_object[idx].float().mean().item()
        out[f"coverage_{name}"] = objects[:, idx].any(1).float().mean().item()
    return out


def coverage(args: argparse.Namespace) -> dict[str, Any]:
    """FasterVLM's kept tokens on each shipped LLaVA's POPE images against the scenes' objects (module doc)."""
    world, scenes = _pope_scenes()
    files = sorted((world / "pope" / "images").glob("shapes_*.png"))[: args.coverage_images]
    ratios = sorted({kw["ratio"] for name, kw in SETTINGS.values() if name == "fastervlm"})
    out: dict[str, Any] = {}
    for model in args.accuracy_models:
        adapter = _shipped(model, args.device)
        rng = torch.Generator().manual_seed(0)
        rows: dict[float, list[dict[str, float]]] = {r: [] for r in ratios}
        for path in files:
            with torch.inference_mode():
                inputs = adapter.build_inputs(
                    [adapter.format_prompt("Describe the image.")], [[Image.open(path).convert("RGB")]]
                )
                scores = adapter.vision_cls_attention(inputs)[0].float()  # [n]
            objects = object_overlaps(adapter, inputs, scenes[int(path.stem.split("_")[1])]) >= MIN_OVERLAP
            for r in ratios:
                k = budget(len(scores), r, None)
                rows[r].append({"kept": k, "tokens": len(scores), **selection_stats(scores, objects, k, rng)})
        mean = lambda rs: {k: statistics.mean(x[k] for x in rs) for k in rs[0]}  # noqa: E731
        out[model] = {f"fastervlm R={round(r * 100)}%": {"images": len(files), **mean(rs)} for r, rs in rows.items()}
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Speed and accuracy tables, printed side by side."""
    import methods  # noqa: F401  (registers methods)

    settings = list(SETTINGS)
    report = {"speed": speed(args, settings), "environment": environment()}
    if not args.skip_accuracy:
        report["accuracy"] = accuracy(args, settings)
    if args.coverage_images:
        report["coverage"] = coverage(args)
    _print(report)
    return report


def _print(r: dict[str, Any]) -> None:
    m = r["speed"]["model"]
    acc = r.get("accuracy", {})
    print(f"\nprefill: LLaVA random-init {m['params'] / 1e6:.1f} M params, {m['lm_layers']} LM layers, "
          f"{m['visual_tokens']} visual tokens ({m['prompt_tokens']} prompt tokens), batch {m['batch_size']}, "
          f"{m['device']} {m['dtype']}; POPE: shipped tiny LLaVAs "
          + ", ".join(f"{k} ({v['visual_tokens']} visual tokens)" for k, v in acc.items()))  # fmt: skip
    head = "".join(f" POPE acc {k} | retained |" for k in acc)
    print(f"| setting | prefill s | speed-up | peak MB | memory ratio |{head}")
    print("|---|---|---|---|---|" + "---|---|" * len(acc))
    for s in list(r["speed"]["settings"]) + (ORACLE_SETTINGS if acc else []):
        v = r["speed"]["settings"].get(s)
        cols = "– | – | – | –"
        if v:
            mem = f"{v['memory_ratio']:.2f}" if v["memory_ratio"] is not None else "n/a"
            cols = f"{v['prefill_s']:.3f} | {v['speedup']:.2f}× | {v['peak_mb']:.1f} | {mem}"
        pope = "".join(
            f" {a['settings'][s]['accuracy']:.3f} | {a['settings'][s]['retained']:.3f} |" for a in acc.values()
        )
        print(f"| {s} | {cols} |{pope}")
    for model, cov in r.get("coverage", {}).items():
        n = next(iter(cov.values()))["tokens"]
        print(
            f"\n| FasterVLM selection ({model}) | kept of {n} | on-object: top | random | objects covered: top "
            "| random |\n|---|---|---|---|---|---|"
        )
        for s, v in cov.items():
            print(
                f"| {s} | {v['kept']} | {v['precision_top']:.3f} | {v['precision_random']:.3f} | "
                f"{v['coverage_top']:.3f} | {v['coverage_random']:.3f} |"
            )


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description="pruning: prefill speed-up, peak memory and POPE accuracy retained")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--layers", type=int, default=16, help="LM layers of the speed model (FastV K=2)")
    ap.add_argument("--pope-limit", type=int, default=None, help="POPE questions per split (default: all)")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--coverage-images", type=int, default=120, help="POPE images for the selection check (0: skip)")
    ap.add_argument(
        "--accuracy-models",
        type=lambda s: s.split(","),
        default=["llava", "llava_144"],
        help="shipped LLaVA options for POPE accuracy and the selection check (comma-separated)",
    )
    cli(ap, run)


if __name__ == "__main__":
    main()
