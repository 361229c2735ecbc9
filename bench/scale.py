"""Scale benchmark: every method at the real dimensions of each family's 7B-class checkpoint, side by side.

    python -m bench.scale --family llava --size 7b --device cuda --json llava7b.json
    python -m bench.scale --family qwen_vl --size tiny --device cpu        # smoke test (< 3 min, 2 cores)

The model is random-init (weights do not change the work) with the real shapes of the checkpoint people run:

| family | checkpoint | vision tower | LM (layers × width, heads / KV, MLP, vocabulary) | visual tokens |
|---|---|---|---|---|
| ``llava`` | LLaVA-1.5-7B | CLIP ViT-L/14-336, 24 × 1024 | Llama 32 × 4096, 32 / 32, 11008, 32064 | 576 |
| ``qwen_vl`` | Qwen2-VL-7B | ViT 32 × 1280, 2×2 merge | Qwen2 28 × 3584, 28 / 4, 18944, 152064 | 576 (672 px) |
| ``internvl`` | InternVL3-8B-hf | InternViT 24 × 1024, 448 px | Qwen2 28 × 3584, 28 / 4, 18944, 151674 | 256 (1 tile) |

Built on the device in ``--dtype`` (bfloat16 on CUDA), with the project's tokenizer (the LM's extra vocabulary
rows cost what they cost in the real model). ``--size tiny`` uses the test suite's tiny shapes with a 6-layer LM.

In one run, interleaved, each figure the median of ``--repeats`` (≥ 5) runs:

1. **overhead** ``overhead.<batch>.ratio``: wall time of the harness (``harness.engine.evaluate``: image loading,
   prompt template, batching, generation, parsing, per-sample JSONL, metrics, results file) over a bare loop of
   ``processor`` + ``model.generate`` + ``batch_decode`` on the same POPE-style samples, at batch 1 and 16 (wall
   time: the harness's own host work is what is being measured). Each run covers ``--batches-per-run`` (4)
   batches, at least ``--min-samples`` (8) samples: a run's fixed cost (metrics, results file) is then shared
   as in a real run instead of charged to one batch, which is how the 2026-12-04 table measured batch 16.
   ``overhead.<batch>.inline_ratio``: the same with ``prefetch=0`` (images decoded in line, as the bare loop
   does), so the share the engine's image prefetch thread hides (``prefetch=auto``: on a GPU only) is read off
   beside it; where ``auto`` loads in line (the CPU) it is the same runs as ``ratio``.
2. **throughput** ``throughput.<batch>.samples_per_s`` of the harness at each ``--batch-sizes`` (the same runs),
   and ``breakdown.<batch>``: where one batch's time goes (the inputs, i.e. template, image processor and
   tokenizer on the host; the prefill; each decoding step; the rest of the harness batch), so a missed
   throughput target says whether host work or the model is short.
3. **methods** ``methods.<name>.ratio``: generation time of a batch of 16 requests, 16 new tokens, under each
   method over ``none`` (CUDA events), and the CPU-countable proxy of GPU cost (:mod:`bench.opcount`): ATen ops,
   kernel launches (ops that are not views) and host syncs per cached decoding step (``ops_per_step``,
   ``launches_per_step``, ``syncs_per_step``; ``none``'s beside them) and per prefill; ``peak_memory_ratio``: the
   peak memory of the (untimed) warm-up generation over none's (``max_memory_allocated`` on CUDA, the allocator's
   peak on the CPU, :mod:`bench.memcount`). CARVE's two recording passes are given the same 16 tokens (a random model
   never stops early).
4. **pruning** ``pruning.<setting>.speedup`` and ``peak_memory_ratio``: prefill (vision tower + LM, last-token
   logits) of a batch of 8 under FastV and FasterVLM at R = 50/75/90 % over ``none``; peak memory above the weights
   (``max_memory_allocated`` on CUDA; on the CPU the allocator's peak of live bytes, :mod:`bench.memcount`,
   measured once per setting in an untimed call).

Built for a one-shot device run: each part's table is printed and the ``--json`` file rewritten as soon as the part
ends (a time limit keeps what was measured); a method or setting that raises is reported as ``{"error": ...}``
and the others are still measured; a part that raises goes to ``errors`` and the next part runs; the exit status
is nonzero when anything failed.

Targets on one H200 (issue 25): VAR ≤ 1.15×, IRI ≤ 1.05×, CCA and MMA ≤ 1.05×, CARVE ≤ 3×, the two-view methods
VCD and RITUAL ≤ 2.1× (both views in one batched forward; issue 29), VHR reported (one text-only prefill per batch,
the paper: "negligible"); harness overhead
≤ 1.05× at batch 1 and 16; batch 16 ≥ 10× batch 1 throughput; FastV prefill ≥ 1.4× at R=50 % and ≥ 2.5× at
R=90 %; FasterVLM ≥ 1.5× at R=75 % and ≥ 2.5× at R=90 % with peak memory ≤ 1.1× none's. Proxy targets (CPU,
tests): no host sync per decoding step beyond none's for VAR, IRI, CCA, MMA, FastV, FasterVLM; ops per decoding
step ≤ 2× none's (VAR ≤ 3×); every pruning setting's prefill peak ≤ 1.1× none's (allocator peak,
``tests/test_memcount.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from adapters.base import ADAPTERS, Adapter
from bench.memcount import allocation_peak
from bench.methods import _synthetic_fcct
from bench.opcount import count_steps
from bench.overhead import _task, time_harness, time_plain
from harness.calls import AdapterCalls
from harness.engine import RunSettings
from harness.provenance import environment
from methods.base import METHODS, UnsupportedError
from shapes.assets import tokenizer_corpus
from shapes.export import export_pope
from shapes.scene import WorldSpec, generate
from shapes.tiny import TINY, InternVLSize, LlavaSize, QwenVLSize, TinySize
from tasks.base import Request


@dataclasses.dataclass(frozen=True)
class Scale:
    """A family's shapes at one size: tower and LM, plus what the tiny size classes leave at their defaults."""

    size: TinySize
    image: int  # side of the square test images, pixels
    text_intermediate: int | None = None  # LM MLP width (None: the tiny default 4 × hidden)
    vocab: int | None = None  # LM vocabulary rows (None: the tokenizer's)
    untied: bool = False  # separate LM head and input embedding (all three real checkpoints)


QWEN_7B_LM = dict(text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, max_positions=32768)
SCALES: dict[str, dict[str, Scale]] = {
    "llava": {
        "7b": Scale(LlavaSize(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                              text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32, max_positions=4096),
                    image=336, text_intermediate=11008, vocab=32064, untied=True),
        "tiny": Scale(LlavaSize(text_layers=6), image=64),
    },
    "qwen_vl": {
        "7b": Scale(QwenVLSize(image_pixels=672 * 672, patch_size=14, merge_size=2, vision_hidden=1280,
                               vision_layers=32, vision_heads=16, **QWEN_7B_LM),
                    image=672, text_intermediate=18944, vocab=152064, untied=True),
        "tiny": Scale(QwenVLSize(text_layers=6), image=64),
    },
    "internvl": {
        "7b": Scale(InternVLSize(image_size=448, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
                                 max_tiles=1, **QWEN_7B_LM),
                    image=448, text_intermediate=18944, vocab=151674, untied=True),
        "tiny": Scale(InternVLSize(text_layers=6, max_tiles=1), image=64),
    },
}  # fmt: skip

#: method settings timed against none: (registered method, hyperparameters). Random weights have no massive
#: activations, so VAR gets explicit sink dims and a tau at which sinks exist; IRI a synthetic FCCT file.
METHOD_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    "var": ("var", {"sink_dims": [0, 1], "tau": 3.0}),
    "cca": ("cca", {}),
    "mma": ("mma", {}),
    "iri": ("iri", {}),
    "carve": ("carve", {}),
    "fastv": ("fastv", {"ratio": 0.5}),
    "fastervlm": ("fastervlm", {"ratio": 0.9}),
    "vcd": ("vcd", {}),
    "ritual": ("ritual", {}),
    "vhr": ("vhr", {}),
}
PRUNING_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("none", {}),
    **{f"fastv R={r}%": ("fastv", {"ratio": r / 100}) for r in (50, 75, 90)},
    **{f"fastervlm R={r}%": ("fastervlm", {"ratio": r / 100}) for r in (50, 75, 90)},
}
QUESTIONS = ("Is there a red circle in the image?", "Is there a star?", "What is in the picture? Be brief.")


# ---------------------------------------------------------------------------------------------- the model
def _instantiate(scale: Scale, device: torch.device, dtype: torch.dtype) -> Callable[[type, Any], Any]:
    """A ``build`` for :mod:`shapes.tiny`'s makers: real MLP width and vocabulary, built on the device."""

    def build(model_cls: type, config: Any) -> Any:
        text = config.text_config
        if scale.text_intermediate:
            text.intermediate_size = scale.text_intermediate
        if scale.vocab:
            text.vocab_size = scale.vocab
        if scale.untied:
            text.tie_word_embeddings = config.tie_word_embeddings = False
        with torch.device(device):
            return model_cls._from_config(config, dtype=dtype)

    return build


def build_adapter(family: str, size: str, device: str, dtype: str, work: Path, lm_layers: int | None = None,
                  vision_layers: int | None = None) -> Adapter:  # fmt: skip
    """A loaded adapter on a random-init model of ``family`` at ``size`` (the depths overridable for smoke tests)."""
    scale = SCALES[family][size]
    depth = {"text_layers": lm_layers, "vision_layers": vision_layers}
    if any(depth.values()):
        sizes = dataclasses.replace(scale.size, **{k: v for k, v in depth.items() if v})
        scale = dataclasses.replace(scale, size=sizes)
    adapter = ADAPTERS.get(family)(name=f"{family}-{size}", path=str(work), device=device, dtype=dtype)
    make = TINY[family][1]
    torch_dtype = adapter.torch_dtype
    model, processor = make(
        tokenizer_corpus(), scale.size, seed=0, build=_instantiate(scale, adapter.device, torch_dtype)
    )
    processor.save_pretrained(work)
    model.config.save_pretrained(work)
    adapter.load_processor()
    adapter.model = model.eval()
    return adapter


# ---------------------------------------------------------------------------------------------- timing
@contextlib.contextmanager
def _clock(device: torch.device) -> Iterator[list[float]]:
    """Seconds of the block: CUDA events on a GPU (recorded on the current stream), else the wall clock."""
    out: list[float] = []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield out
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1000)
    else:
        t0 = time.perf_counter()
        yield out
        out.append(time.perf_counter() - t0)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _requests(adapter: Adapter, n: int, side: int) -> list[Request]:
    scenes = generate(n, 5, WorldSpec(image_size=side, min_objects=3))
    return [Request(QUESTIONS[i % 3] + " Answer yes or no.", [Image.fromarray(s.image)]) for i, s in enumerate(scenes)]


def _method(name: str, extra: dict[str, dict[str, Any]], table: dict) -> Any:
    registered, kw = table[name]
    return METHODS.get(registered)(**(kw | extra.get(name, {})))


def _failure(exc: BaseException) -> str:
    """One line for a setting or part that raised (the traceback goes to stderr, i.e. the run's log)."""
    traceback.print_exception(exc)
    return f"{type(exc).__name__}: {exc}"[:500]


def _warm_up(names: list[str], run_one: Callable[[str], Any]) -> dict[str, str]:
    """Run each setting once (allocator, kernels); those that raise are returned with why, ``none``'s re-raised.

    A GPU-only bug in one method (the 2026-12-04 run: FastV indexed a CUDA tensor with a host index) then costs that
    method's figures, not every figure of a one-shot device run.
    """
    failed: dict[str, str] = {}
    for name in names:
        try:
            run_one(name)
        except Exception as exc:  # any failure of a method under test is a finding to report, not a reason to stop
            if name == "none":
                raise
            failed[name] = _failure(exc)
            _release_cache()
    return failed


def _release_cache() -> None:
    """After a failure (an out-of-memory among them), give the failed setting's cached blocks back."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _supported(adapter: Adapter, name: str, extra: dict, table: dict) -> str | None:
    """``None`` when the setting runs on this adapter, else why not."""
    try:
        _method(name, extra, table).check(adapter)
    except UnsupportedError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------- 1, 2: engine
def engine_part(adapter: Adapter, scale: Scale, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Harness vs bare HF loop at ``--overhead-batches``; harness throughput at ``--batch-sizes``."""
    batches = sorted(set(args.overhead_batches) | set(args.batch_sizes))
    n_of = {bs: max(args.min_samples, bs * args.batches_per_run) for bs in batches}
    scenes = generate(4 * max(8, -(-max(n_of.values()) // 6)), 3, WorldSpec(image_size=scale.image, min_objects=3))
    export_pope(scenes, work / "data", seed=3)
    tasks = {bs: _task(work / "data", n_of[bs], args.max_new_tokens) for bs in batches}
    requests = {bs: _requests(adapter, bs, scale.image) for bs in args.batch_sizes}
    # where prefetch=auto already loads in line (the CPU), the harness runs are the in-line runs: not timed twice
    in_line = RunSettings(output_dir=work, config_hash="bench").prefetch_depth(adapter.device) == 0
    for bs in batches:  # warm-up: allocator, kernels, file cache
        time_harness(adapter, tasks[bs], bs, work)
        if bs in args.overhead_batches:
            time_plain(adapter, tasks[bs], bs)
            if not in_line:
                time_harness(adapter, tasks[bs], bs, work, prefetch=0)
        if bs in requests:
            time_batch(adapter, requests[bs], args.max_new_tokens)
    harness: dict[int, list[float]] = {bs: [] for bs in batches}
    plain: dict[int, list[float]] = {bs: [] for bs in args.overhead_batches}
    inline: dict[int, list[float]] = {bs: harness[bs] if in_line else [] for bs in args.overhead_batches}
    parts: dict[int, list[dict[str, float]]] = {bs: [] for bs in requests}
    for _ in range(args.repeats):
        for bs in batches:
            if bs in plain:
                plain[bs].append(time_plain(adapter, tasks[bs], bs))
                if not in_line:
                    inline[bs].append(time_harness(adapter, tasks[bs], bs, work, prefetch=0))
            harness[bs].append(time_harness(adapter, tasks[bs], bs, work))
            if bs in parts:
                parts[bs].append(time_batch(adapter, requests[bs], args.max_new_tokens))
    n = {bs: len(tasks[bs].samples()) for bs in batches}
    n_batches = {bs: -(-n[bs] // bs) for bs in batches}
    overhead = {bs: {"ratio": _median(harness[bs]) / _median(plain[bs]),
                     "inline_ratio": _median(inline[bs]) / _median(plain[bs]), "samples": n[bs],
                     "batches": n_batches[bs], "harness_s": harness[bs], "inline_s": inline[bs], "plain_s": plain[bs]}
                for bs in plain}  # fmt: skip
    throughput = {bs: {"samples_per_s": n[bs] / _median(harness[bs]), "samples": n[bs]} for bs in batches}
    base = throughput[min(batches)]["samples_per_s"]
    for t in throughput.values():
        t["speedup"] = t["samples_per_s"] / base
    breakdown = {bs: _breakdown(runs, _median(harness[bs]) / n_batches[bs], args.max_new_tokens)
                 for bs, runs in parts.items()}  # fmt: skip
    return {"overhead": overhead, "throughput": throughput, "breakdown": breakdown}


def time_batch(adapter: Adapter, requests: list[Request], new_tokens: int) -> dict[str, float]:
    """Seconds of one batch's parts: its inputs, its prefill, and its generation.

    The inputs are host work (template, image processor, tokenizer, the copy to the device); the prefill computes
    the last token's logits; the generation makes exactly ``new_tokens`` tokens, its prefill included.
    """
    t0 = time.perf_counter()
    inputs = adapter.build_inputs([adapter.format_prompt(r.text) for r in requests], [r.images for r in requests])
    inputs_s = time.perf_counter() - t0
    with torch.inference_mode():
        with _clock(adapter.device) as prefill:
            adapter.forward(inputs, logits_to_keep=1)
        with _clock(adapter.device) as generate:
            adapter.generate_ids(inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return {"inputs_s": inputs_s, "prefill_s": prefill[0], "generate_s": generate[0]}


def _breakdown(runs: list[dict[str, float]], batch_s: float, new_tokens: int) -> dict[str, float]:
    """Where a harness batch's time goes (medians): inputs, prefill, each decoding step, and the rest.

    ``rest_s`` is the harness's batch time (its median run over its batches) less the inputs and the generation:
    the image decoding the prefetch thread did not hide, parsing, records, metrics. It is negative where the
    prefetch thread hides the inputs themselves (they are timed here in line), or by timing noise when it is
    small. The batch-16 over batch-1 throughput target depends on the host parts (inputs, rest) that batching does
    not amortise.
    """
    inputs, prefill, generate = (_median([r[k] for r in runs]) for k in ("inputs_s", "prefill_s", "generate_s"))
    return {"batch_s": batch_s, "inputs_s": inputs, "prefill_s": prefill, "generate_s": generate,
            "decode_step_s": (generate - prefill) / max(1, new_tokens - 1),
            "rest_s": batch_s - inputs - generate}  # fmt: skip


# ---------------------------------------------------------------------------------------------- 3: methods
def _generate(adapter: Adapter, method: Any, batch: list[Request], gen: dict[str, Any]) -> float:
    with torch.inference_mode(), method.bind(adapter):
        calls = AdapterCalls(adapter, len(batch), method)
        with _clock(adapter.device) as seconds:
            calls.generate(batch, **gen)
    return seconds[0]


def generation_peak(adapter: Adapter, method: Any, batch: list[Request], gen: dict[str, Any]) -> int:
    """Peak memory of one ``generate`` under ``method`` above the level before it, in bytes (one untimed call).

    ``max_memory_allocated`` on CUDA; on the CPU the allocator's peak of live bytes (:mod:`bench.memcount`).
    """
    with torch.inference_mode(), method.bind(adapter):
        calls = AdapterCalls(adapter, len(batch), method)
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            calls.generate(batch, **gen)
            return torch.cuda.max_memory_allocated() - base
        with allocation_peak() as alloc:
            calls.generate(batch, **gen)
        return alloc.peak


def count_method(adapter: Adapter, method: Any, batch: list[Request], gen: dict[str, Any]) -> dict[str, float]:
    """ATen ops, launches and host syncs of one ``generate`` under ``method`` (:mod:`bench.opcount`), per call kind.

    Returns:
        ``ops_per_step`` / ``launches_per_step`` / ``syncs_per_step`` (median over cached decoding steps),
        ``prefill_ops`` / ``prefill_launches`` / ``prefill_syncs`` (summed over prefill calls), ``calls`` (model
        calls), ``sync_sites`` (decoding),
        ``prefill_sync_sites`` (input preparation and prefill: the input-time selections included).
    """
    with torch.inference_mode(), method.bind(adapter):
        calls = AdapterCalls(adapter, len(batch), method)
        with count_steps(adapter.model) as c:
            calls.generate(batch, **gen)
    return {"ops_per_step": c.decode_median("ops"), "launches_per_step": c.decode_median("launches"),
            "syncs_per_step": c.decode_median("syncs"), "prefill_ops": c.prefill_total("ops"),
            "prefill_launches": c.prefill_total("launches"), "prefill_syncs": c.prefill_total("syncs"),
            "calls": len(c.steps), "sync_sites": _sites(c.decode),
            "prefill_sync_sites": _sites([c.tallies[0], *c.prefill])}  # fmt: skip


def _sites(tallies: list[Any]) -> dict[str, int]:
    """Sync sites summed over ``tallies``."""
    sites: dict[str, int] = {}
    for t in tallies:
        for k, v in t.sync_sites.items():
            sites[k] = sites.get(k, 0) + v
    return sites


def methods_part(adapter: Adapter, scale: Scale, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every method's generation time over none's, and its ops and syncs per decoding step."""
    import methods  # noqa: F401  (registers methods)

    layers = adapter.num_layers("lm")
    extra = {"iri": {"fcct_file": _synthetic_fcct(work / "fcct.json", layers)},
             "carve": {"max_new_tokens": args.max_new_tokens}}  # fmt: skip
    batch = _requests(adapter, args.methods_batch, scale.image)
    gen = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.max_new_tokens, "do_sample": False}
    names = [n for n in ["none", *args.methods] if n in METHOD_SETTINGS]
    unsupported = {n: why for n in names if (why := _supported(adapter, n, extra, METHOD_SETTINGS))}
    names = [n for n in names if n not in unsupported]
    peaks: dict[str, int] = {}  # each warm-up generation's peak memory (no extra call: a one-shot GPU run's time)

    def warm_up(name: str) -> None:
        peaks[name] = generation_peak(adapter, _method(name, extra, METHOD_SETTINGS), batch, gen)

    failed = _warm_up(names, warm_up)
    names = [n for n in names if n not in failed]
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            times[name].append(_generate(adapter, _method(name, extra, METHOD_SETTINGS), batch, gen))
    count_gen = gen | {"max_new_tokens": args.count_tokens, "min_new_tokens": args.count_tokens}
    counts = {n: count_method(adapter, _method(n, extra, METHOD_SETTINGS), batch[: args.count_batch], count_gen)
              for n in names}  # fmt: skip
    base, none = _median(times["none"]), counts["none"]
    out: dict[str, Any] = {}
    for n in names:
        c = counts[n]
        out[n] = {"ratio": _median(times[n]) / base, "seconds": times[n], **c,
                  "ops_ratio": c["ops_per_step"] / none["ops_per_step"],
                  "launches_ratio": c["launches_per_step"] / none["launches_per_step"],
                  "extra_syncs_per_step": c["syncs_per_step"] - none["syncs_per_step"],
                  "peak_memory_mb": peaks[n] / 2**20,
                  "peak_memory_ratio": peaks[n] / peaks["none"] if peaks["none"] else None}  # fmt: skip
    for n, why in unsupported.items():
        out[n] = {"unsupported": why}
    for n, why in failed.items():
        out[n] = {"error": why}
    return {
        "methods": out,
        "methods_setup": {
            "batch": len(batch),
            "new_tokens": args.max_new_tokens,
            "count_batch": args.count_batch,
            "count_tokens": args.count_tokens,
        },
    }


# ---------------------------------------------------------------------------------------------- 4: pruning
def _prefill(adapter: Adapter, method: Any, inputs: dict[str, torch.Tensor]) -> tuple[float, int | None]:
    """Seconds of one prefill and, on CUDA, its peak memory above the level before it (None on the CPU)."""
    cuda = adapter.device.type == "cuda"
    with torch.inference_mode(), method.bind(adapter):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with _clock(adapter.device) as seconds:
            adapter.forward(inputs, logits_to_keep=1)
        memory = torch.cuda.max_memory_allocated() - base if cuda else None
    return seconds[0], memory


def prefill_peak(adapter: Adapter, method: Any, inputs: dict[str, torch.Tensor]) -> int:
    """The allocator's peak of one prefill on the CPU (:mod:`bench.memcount`; exact, so measured once, untimed)."""
    with torch.inference_mode(), method.bind(adapter), allocation_peak() as alloc:
        adapter.forward(inputs, logits_to_keep=1)
    return alloc.peak


def pruning_part(adapter: Adapter, scale: Scale, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prefill time and peak memory of every pruning setting over none's, interleaved."""
    import methods  # noqa: F401  (registers methods)

    requests = _requests(adapter, args.prefill_batch, scale.image)
    prompts = [adapter.format_prompt(r.text) for r in requests]
    inputs = adapter.build_inputs(prompts, [r.images for r in requests])
    names = list(PRUNING_SETTINGS)
    unsupported = {n: why for n in names if (why := _supported(adapter, n, {}, PRUNING_SETTINGS))}
    names = [n for n in names if n not in unsupported]
    failed = _warm_up(names, lambda n: _prefill(adapter, _method(n, {}, PRUNING_SETTINGS), inputs))
    names = [n for n in names if n not in failed]
    times: dict[str, list[float]] = {n: [] for n in names}
    memory: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            t, m = _prefill(adapter, _method(name, {}, PRUNING_SETTINGS), inputs)
            times[name].append(t)
            if m is not None:
                memory[name].append(m)
    if adapter.device.type != "cuda":
        memory = {n: [prefill_peak(adapter, _method(n, {}, PRUNING_SETTINGS), inputs)] for n in names}
    base_t, base_m = _median(times["none"]), _median(memory["none"])
    out: dict[str, Any] = {n: {"speedup": base_t / _median(times[n]), "seconds": times[n],
                               "peak_memory_mb": _median(memory[n]) / 2**20,
                               "peak_memory_ratio": _median(memory[n]) / base_m if base_m > 0 else None}
                           for n in names}  # fmt: skip
    for n, why in unsupported.items():
        out[n] = {"unsupported": why}
    for n, why in failed.items():
        out[n] = {"error": why}
    return {
        "pruning": out,
        "pruning_setup": {"batch": len(requests), "prompt_tokens": int(inputs["input_ids"].shape[1])},
    }


# ---------------------------------------------------------------------------------------------- driver
PARTS = {"engine": engine_part, "methods": methods_part, "pruning": pruning_part}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, run the parts asked for, print and return the figures.

    Each part's table is printed, and the ``--json`` file rewritten, as soon as the part ends, so a run stopped by a
    time limit keeps what it measured; a part that raises is recorded under ``errors`` and the next part runs.
    """
    if args.repeats < 5:
        raise SystemExit(f"--repeats must be >= 5 (medians of fewer moved by 20 % between runs), got {args.repeats}")
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    t0 = time.perf_counter()
    adapter = build_adapter(args.family, args.size, args.device, args.dtype, work, args.lm_layers, args.vision_layers)
    scale = SCALES[args.family][args.size]
    probe = adapter.build_inputs(
        [adapter.format_prompt(QUESTIONS[0])], [[_requests(adapter, 1, scale.image)[0].images[0]]]
    )
    report: dict[str, Any] = {
        "model": {"family": args.family, "size": args.size, "lm_layers": adapter.num_layers("lm"),
                  "params": sum(p.numel() for p in adapter.model.parameters()),
                  "visual_tokens": int(adapter.image_token_mask(probe).sum()),
                  "prompt_tokens": int(probe["input_ids"].shape[1]),
                  "device": str(adapter.device), "dtype": args.dtype,
                  "gpu": torch.cuda.get_device_name() if adapter.device.type == "cuda" else None},
        "repeats": args.repeats,
        "build_s": time.perf_counter() - t0,
        "environment": environment(),
        "parts_done": [],
        "errors": {},
    }  # fmt: skip
    print_header(report)
    save(report, args.json)
    for part in args.parts:
        t = time.perf_counter()
        try:
            figures = PARTS[part](adapter, scale, args, work)
        except Exception as exc:  # the other parts' figures are still worth having (a one-shot device run)
            report["errors"][part] = _failure(exc)
            _release_cache()
        else:
            report |= figures
            report["errors"] |= {f"{key}.{name}": v["error"] for key, rows in figures.items() if isinstance(rows, dict)
                                 for name, v in rows.items() if isinstance(v, dict) and "error" in v}  # fmt: skip
            report["parts_done"].append(part)
            PRINTERS[part](report)
            sys.stdout.flush()
        report[f"{part}_s"] = time.perf_counter() - t
        save(report, args.json)
    return report


def save(report: dict[str, Any], path: Path | None) -> None:
    """Write the figures so far to ``path`` (whole or not at all: a kill mid-write leaves the previous file)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)


def print_header(r: dict[str, Any]) -> None:
    """The model line every table below refers to."""
    m = r["model"]
    print(f"\n{m['family']} {m['size']}: {m['params'] / 1e9:.2f} B params, {m['lm_layers']} LM layers, "
          f"{m['visual_tokens']} visual / {m['prompt_tokens']} prompt tokens, {m['device']} {m['dtype']} "
          f"{m['gpu'] or ''}, median of {r['repeats']}", flush=True)  # fmt: skip


def _skipped(name: str, t: dict[str, Any], columns: int) -> bool:
    """Print the row of a setting that did not run (unsupported here, or failed); True if it did not."""
    why = "unsupported" if "unsupported" in t else f"error: {t['error']}" if "error" in t else None
    if why:
        print(f"| {name} | {why.replace('|', '/')} |{' |' * (columns - 2)}")
    return why is not None


def print_engine(r: dict[str, Any]) -> None:
    """Harness over the plain loop, and throughput by batch size."""
    print(f"| batch | harness / plain HF | in line / plain HF | harness samples/s | speed-up over batch "
          f"{min(r['throughput'])} |\n|---|---|---|---|---|")  # fmt: skip
    for bs, t in r["throughput"].items():
        o = r["overhead"].get(bs, {})
        ratios = [f"{o[k]:.3f}" if k in o else "" for k in ("ratio", "inline_ratio")]
        print(f"| {bs} | {' | '.join(ratios)} | {t['samples_per_s']:.2f} | {t['speedup']:.2f}x |")
    print_breakdown(r)


def print_breakdown(r: dict[str, Any]) -> None:
    """One harness batch's time, in parts (milliseconds)."""
    print("| batch | harness batch | inputs (host) | prefill | decoding step | generation | rest (host) |\n"
          "|---|---|---|---|---|---|---|")  # fmt: skip
    for bs, t in r["breakdown"].items():
        keys = ("batch_s", "inputs_s", "prefill_s", "decode_step_s", "generate_s", "rest_s")
        ms = [f"{1000 * t[k]:.1f}" for k in keys]
        print(f"| {bs} | {' | '.join(ms)} |")


def print_methods(r: dict[str, Any]) -> None:
    """Every method's time over none's, and the CPU proxy beside it."""
    print("| method | time / none | ops per decoding step (/ none) | launches per step (/ none) | syncs per step "
          "(none's) | prefill ops, launches, syncs | peak memory / none |\n|---|---|---|---|---|---|---|")  # fmt: skip
    none = r["methods"]["none"]
    for n, t in r["methods"].items():
        if not _skipped(n, t, 7):
            memory = t.get("peak_memory_ratio")
            print(f"| {n} | {t['ratio']:.3f} | {t['ops_per_step']:.0f} ({t['ops_ratio']:.2f}x) | "
                  f"{t['launches_per_step']:.0f} ({t['launches_ratio']:.2f}x) | {t['syncs_per_step']:.0f} "
                  f"({none['syncs_per_step']:.0f}) | {t['prefill_ops']}, {t['prefill_launches']}, "
                  f"{t['prefill_syncs']} | {'' if memory is None else f'{memory:.2f}x'} |")  # fmt: skip


def print_pruning(r: dict[str, Any]) -> None:
    """Prefill speed-up and peak memory of every pruning setting."""
    print("| setting | prefill speed-up | peak memory / none |\n|---|---|---|")
    for n, t in r["pruning"].items():
        if not _skipped(n, t, 3):
            ratio = t["peak_memory_ratio"]
            print(f"| {n} | {t['speedup']:.2f}x | {'' if ratio is None else f'{ratio:.2f}x'} |")


PRINTERS = {"engine": print_engine, "methods": print_methods, "pruning": print_pruning}


def parser() -> argparse.ArgumentParser:
    """The command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--family", choices=sorted(SCALES), default="llava")
    ap.add_argument("--size", choices=["7b", "tiny"], default="7b")
    ap.add_argument("--device", default="auto", help="cuda | cpu | auto")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lm-layers", type=int, default=None, help="override the LM depth (smoke tests)")
    ap.add_argument("--vision-layers", type=int, default=None, help="override the tower depth (smoke tests)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--overhead-batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--min-samples", type=int, default=8, help="samples per engine run (at least the batch size)")
    ap.add_argument("--batches-per-run", type=int, default=4,
                    help="engine runs cover at least this many batches, so the run's fixed cost (results file, "
                    "metrics) is spread as in a real run, not charged to a single batch")  # fmt: skip
    ap.add_argument("--methods", nargs="+", default=[n for n in METHOD_SETTINGS if n != "none"])
    ap.add_argument("--methods-batch", type=int, default=16)
    ap.add_argument("--count-batch", type=int, default=4, help="requests in the op-counting run")
    ap.add_argument("--count-tokens", type=int, default=4, help="new tokens in the op-counting run")
    ap.add_argument("--prefill-batch", type=int, default=8)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    import adapters  # noqa: F401  (registers adapters)

    args = parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    report = run(args)
    if report["errors"]:
        failed = ", ".join(f"{part} ({why})" for part, why in report["errors"].items())
        raise SystemExit(f"bench.scale: part(s) failed, the others' figures are kept: {failed}")
    return report


if __name__ == "__main__":
    main()
