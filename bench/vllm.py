r"""vLLM vs HF throughput: the same POPE questions, the same batch size, one process, both backends of the harness.

    python -m bench.vllm --model llava                      # shipped tiny LLaVA, CPU (make bench-vllm)
    python -m bench.vllm --model llava --path llava-hf/llava-1.5-7b-hf --dtype bfloat16 --device cuda \\
        --batch 16 --n 200 --json llava7b-vllm.json                 # a real checkpoint on a GPU

Needs vLLM (``make test-vllm`` builds ``.venv-vllm``, where ``make bench-vllm`` runs this). What is timed, per
backend, is the model calls of :meth:`tasks.base.Task.respond` over the POPE questions (``--n`` per split,
random / popular / adversarial, images decoded beforehand, batches of ``--batch``): for ``hf``
:class:`harness.calls.AdapterCalls` (``model.generate`` with left padding), for ``vllm``
:class:`integrations.vllm_backend.VLLMCalls` (one ``LLM.generate`` per batch, as ``model.backend=vllm`` runs; the
engine could schedule all requests at once, but the harness cuts batches the same way for both). Each backend
first answers one warm-up batch (not timed); then the timed pass runs ``--repeats`` times, and the median is
reported. Start-up (weights, engine) is reported apart. Greedy, POPE's ``max_new_tokens`` (128; the tiny models
stop after one or two tokens). The answers of the two backends are compared too (``same_answers``).

The vLLM engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless already set), eager
(``--compile`` lets vLLM compile), with a ``--kv-cache-mib`` KV cache on the CPU (vLLM's CPU default takes most of
the machine's memory). Numbers and the machine: docs/benchmarks.md (vLLM section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from harness.calls import AdapterCalls
from harness.prefetch import load_images
from shapes.assets import WORLD_DIR
from tasks.pope import POPETask

#: --model → adapter class path and shipped checkpoint (conf/model/<name>.yaml)
MODELS = {"llava": "adapters.llava.LlavaAdapter", "qwen_vl": "adapters.qwen_vl.QwenVLAdapter",
          "internvl": "adapters.internvl.InternVLAdapter"}  # fmt: skip


def _adapter(args: argparse.Namespace) -> Any:
    import importlib

    from shapes.assets import MODEL_DIRS

    module, cls = MODELS[args.model].rsplit(".", 1)
    path = args.path or str(MODEL_DIRS[args.model])
    return getattr(importlib.import_module(module), cls)(
        name=args.model, path=path, device=args.device, dtype=args.dtype
    )


def _batches(args: argparse.Namespace) -> tuple[POPETask, list[list[tuple[Any, list[Any]]]]]:
    """The POPE task and its samples (images decoded) cut into batches of ``args.batch``."""
    task = POPETask(
        questions=str(WORLD_DIR / "pope" / "shapes_pope_{split}.json"),
        image_root=str(WORLD_DIR / "pope" / "images"),
        splits=["random", "popular", "adversarial"],
        limit=args.n,
        gen_kwargs={"max_new_tokens": 128, "do_sample": False},  # conf/task/pope.yaml
    )
    good = [(s, load_images(s, strict=True)[0]) for s in task.samples()]
    return task, [good[i : i + args.batch] for i in range(0, len(good), args.batch)]


def _time(task: POPETask, calls: Any, batches: list, repeats: int) -> tuple[float, list[str]]:
    """Median wall seconds of answering every batch, and the answers (of the last pass)."""
    task.respond(batches[0], calls)  # warm-up
    times, answers = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        answers = [r.raw_output for b in batches for r in task.respond(b, calls)]
        times.append(time.perf_counter() - t0)
    return statistics.median(times), answers


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Both backends on the same batches; returns the figures."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from integrations.vllm_backend import VLLMCalls, vllm_version

    task, batches = _batches(args)
    n = sum(len(b) for b in batches)
    out: dict[str, Any] = {
        "model": args.model, "path": args.path, "dtype": args.dtype, "device": args.device, "samples": n,
        "batch": args.batch, "repeats": args.repeats, "vllm_version": vllm_version(), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs" + (
            f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "load_avg_1m_before": round(os.getloadavg()[0], 2),  # other work on the machine slows both backends
    }  # fmt: skip
    with torch.inference_mode():
        hf_adapter = _adapter(args)
        t0 = time.perf_counter()
        hf_adapter.load()
        hf_start = time.perf_counter() - t0
        hf_s, hf_answers = _time(task, AdapterCalls(hf_adapter, args.batch), batches, args.repeats)
        hf_adapter.model = None  # free the HF weights before the engine starts
        engine = {"kv_cache_memory_bytes": args.kv_cache_mib * 2**20} if args.kv_cache_mib else {}
        vl = VLLMCalls(_adapter(args), batch_size=args.batch, enforce_eager=not args.compile, engine_kwargs=engine)
        t0 = time.perf_counter()
        vl.load()
        vl_start = time.perf_counter() - t0
        vl_s, vl_answers = _time(task, vl, batches, args.repeats)
    out["hf"] = {"start_s": round(hf_start, 2), "seconds": round(hf_s, 3), "samples_per_s": round(n / hf_s, 2)}
    out["vllm"] = {"start_s": round(vl_start, 2), "seconds": round(vl_s, 3), "samples_per_s": round(n / vl_s, 2)}
    out["speedup"] = round(hf_s / vl_s, 2)
    out["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    out["same_answers"] = sum(a == b for a, b in zip(hf_answers, vl_answers, strict=True))
    return out


def parser() -> argparse.ArgumentParser:
    """The CLI."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="llava")
    ap.add_argument("--path", default=None, help="checkpoint (default: the shipped one)")
    ap.add_argument("--n", type=int, default=20, help="questions per POPE split")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-cache-mib", type=int, default=256, help="vLLM's KV cache (0: vLLM's default)")
    ap.add_argument("--compile", action="store_true", help="let vLLM compile the model (default: enforce_eager)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run and print (and write ``--json``)."""
    args = parser().parse_args(argv)
    r = run(args)
    print(json.dumps(r, indent=1))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    return r


if __name__ == "__main__":
    main()
