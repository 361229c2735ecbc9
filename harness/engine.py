"""The evaluation loop: batches of samples through an adapter under a method, records, resume, results.

``evaluate`` reads the task's samples, skips those already recorded in the output directory (resume), runs
the rest in batches of ``batch_size`` (left-padded by the adapter) inside the method's context, appends every
batch's records durably, then aggregates *all* stored records into metrics, writes ``results.json`` and prints
the lm-eval style table. Bad inputs (a malformed record, a missing or corrupt image) become per-sample error
records and are counted; with ``strict=True`` the first one stops the run with its file and line.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adapters.base import Adapter
from core.errors import UserError
from core.loggers import NoLogger
from core.paired import BASELINE_METHOD
from core.records import RecordStore
from core.results import make_table, sha256_json, sha256_text, write_json
from harness.backends import get_backend
from harness.cache import ResponseCache, is_greedy, scope
from harness.calls import AdapterCalls
from harness.distributed import Ranks, merge_shards, shard_path
from harness.paired import find_baseline, paired_block, paired_summary
from harness.prefetch import Media, load_media, prefetched
from harness.provenance import build_results, reset_peak_memory
from methods.base import Method
from tasks.base import ModelCalls, Response, Sample, Task


@dataclass
class RunSettings:
    """How a run is executed (none of these change a sample's output)."""

    output_dir: Path
    config_hash: str
    batch_size: int = 8
    strict: bool = False
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # fully resolved config, stored in results.json
    pair_hash: str | None = None  # config hash without the method: finds the method=none run to pair with
    progress: bool = True  # tqdm bar
    report: bool = True  # print the header and the results table at the end
    cache: ResponseCache | None = None  # responses shared across output directories (greedy runs)
    ranks: Ranks = field(default_factory=Ranks)  # data-parallel place under torchrun (rank 0 of 1 otherwise)
    backend: str = "hf"  # model.backend: a name in harness.backends.BACKENDS (hf, vllm)
    backend_options: dict[str, Any] = field(default_factory=dict)  # model.vllm: the engine's settings
    engine: dict[str, Any] | None = None  # what a backend's engine was started with (set when it starts)
    prefetch: int | str = "auto"  # batches whose images decode on a thread ahead of the model; see prefetch_depth

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UserError(f"batch_size={self.batch_size!r}: must be an int >= 1")
        if self.prefetch != "auto" and (
            isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0
        ):
            raise UserError(f"prefetch={self.prefetch!r}: must be an int >= 0 or 'auto'")

    def prefetch_depth(self, device: torch.device) -> int:
        """Batches to decode ahead: ``prefetch``, or for ``auto`` 1 on an accelerator and 0 on the CPU.

        On an accelerator the host waits on the device for most of a batch, so decoding the next batch's images
        meanwhile hides that work. On the CPU the model's own threads already use every core: a decoding thread
        only competes with them (measured: tiny LLaVA on 2 cores, up to 4.5 % slower with the thread than in line).
        """
        if self.prefetch == "auto":
            return 0 if device.type == "cpu" else 1
        return int(self.prefetch)


class OutputLockedError(UserError):
    """Another run holds the output directory."""


@contextlib.contextmanager
def output_lock(out: Path, ranks: Ranks) -> Iterator[None]:
    """Hold ``<out>/.lock`` for the run (rank 0 takes it; every rank learns whether it could).

    An OS file lock (``filelock.FileLock``: ``fcntl.flock`` on Unix): the kernel releases it when the holder dies,
    so a killed run never leaves a stale lock. A second run on the same directory stops at once with one line
    instead of generating every sample a second time. Lock files on some network file systems do not lock.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(out / ".lock")) if ranks.main else None
    held = True
    if lock is not None:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            held = False
    if not ranks.broadcast(held):
        raise OutputLockedError(
            f"output_dir {out} is in use by another run (it holds {out / '.lock'}); wait for that run to finish, "
            "or give this one another output_dir"
        )
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def error_kind(reason: str) -> str:
    """The kind of a per-sample error, for ``errors.by_reason``.

    The text before the first ``": "``, without what varies per sample (a value after ``, got``, a path).
    """
    head = reason.split(": ", 1)[0].split(", got ", 1)[0].strip()
    return head or "error"


def _base_record(sample: Sample, config_hash: str) -> dict[str, Any]:
    return {
        "sample_id": sample.sample_id,
        "index": sample.index,
        "split": sample.split,
        "image_id": sample.image_id,
        "source": sample.source,
        "doc": sample.doc,
        "target": sample.target,
        "doc_hash": sha256_json(sample.doc),
        "target_hash": sha256_text(sample.target),
        "config_hash": config_hash,
    }


def _error_record(sample: Sample, reason: str, config_hash: str) -> dict[str, Any]:
    return {
        **_base_record(sample, config_hash),
        "prompt": None,
        "prompt_hash": None,
        "raw_output": None,
        "error": reason,
    }


def run_batch(
    task: Task, model: ModelCalls, batch: list[Sample], settings: RunSettings, media: Media | None = None
) -> list[dict[str, Any]]:
    """Answer one batch through ``task.respond``; returns its records in sample order (errors included).

    ``media`` are the batch's loaded images (:func:`harness.prefetch.load_media`), loaded here when not given.
    """
    records: dict[str, dict[str, Any]] = {}
    good: list[tuple[Sample, list[Any]]] = []
    if media is None:
        media = load_media(batch, settings.strict)
    for sample, (images, reason) in zip(batch, media, strict=True):
        if reason is not None:
            records[sample.sample_id] = _error_record(sample, reason, settings.config_hash)
        else:
            good.append((sample, images))
    if good:
        for sample, resp, wall_s in _respond(task, model, good, settings.cache):
            records[sample.sample_id] = {
                **_base_record(sample, settings.config_hash),
                "prompt": resp.prompt,
                "prompt_hash": sha256_text(resp.prompt),
                "raw_output": resp.raw_output,
                **resp.fields,
                **task.score(sample, resp),
                "wall_s": wall_s,
                "cached": wall_s is None,
                "error": None,
            }
    return [records[s.sample_id] for s in batch]


def _respond(
    task: Task, model: ModelCalls, good: list[tuple[Sample, list[Any]]], cache: ResponseCache | None
) -> list[tuple[Sample, Response, float | None]]:
    """Responses of a batch: from the cache where stored, else from ``task.respond``.

    Each comes with its share of the batch's wall time (``None`` for a cached one).
    """
    keys = {s.sample_id: cache.key(s.sample_id, sha256_json(s.doc)) for s, _ in good} if cache else {}
    stored = cache.get_many(list(keys.values())) if cache else {}
    todo = [(s, im) for s, im in good if keys.get(s.sample_id) not in stored]
    fresh: dict[str, Response] = {}
    wall_s = None
    if todo:
        t0 = time.perf_counter()
        responses = task.respond(todo, model)
        if len(responses) != len(todo):
            raise RuntimeError(f"{task.name}.respond returned {len(responses)} responses for {len(todo)} samples")
        wall_s = round((time.perf_counter() - t0) / len(todo), 5)  # the sample's share of the batch's wall time
        fresh = {s.sample_id: r for (s, _), r in zip(todo, responses, strict=True)}
        if cache:
            cache.put_many({keys[sid]: {"prompt": r.prompt, "raw_output": r.raw_output, "fields": r.fields}
                            for sid, r in fresh.items()})  # fmt: skip
    out = []
    for sample, _ in good:
        if sample.sample_id in fresh:
            out.append((sample, fresh[sample.sample_id], wall_s))
        else:
            hit = stored[keys[sample.sample_id]]
            out.append((sample, Response(hit["raw_output"], hit["prompt"], hit["fields"]), None))
    return out


def _generate_pending(
    task: Task, adapter: Adapter, method: Method, batches: list[list[Sample]], store: RecordStore, settings: RunSettings
) -> tuple[list[dict[str, Any]], float]:
    """Run every pending batch; returns this invocation's error records and the generation wall time."""
    errors: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    total = sum(len(b) for b in batches)
    live = _needs_model(batches, settings.cache)
    model = _model_calls(adapter, method, settings, load=live)  # loads the model: a failure is reported bar-free
    depth = settings.prefetch_depth(adapter.device)
    ahead = getattr(model, "prefetching", None) if depth and live else None  # optional in ModelCalls
    with (
        tqdm(total=total, desc=f"{task.name}/{method.name}", unit="sample", disable=not settings.progress) as bar,
        torch.inference_mode(),
        method.bind(adapter) if live else contextlib.nullcontext(),
        ahead() if ahead is not None else contextlib.nullcontext() as prepare,
        prefetched(batches, settings.strict, depth, prepare) as media,
    ):
        for batch, loaded in zip(batches, media, strict=True):
            records = run_batch(task, model, batch, settings, loaded)
            store.append(records)
            errors += [r for r in records if r["error"]]
            bar.update(len(batch))
    return errors, time.perf_counter() - t0


def _model_calls(adapter: Adapter, method: Method, settings: RunSettings, load: bool) -> ModelCalls:
    """What the task calls: the backend's model calls (``model.backend``), loaded when ``load``.

    Without ``load`` (every response comes from the cache) the HF calls stand in, never loaded or called.
    """
    if not load:
        return AdapterCalls(adapter, settings.batch_size, method)
    return get_backend(settings.backend).open(adapter, method, settings)


def check_backend(method: Method, settings: RunSettings) -> None:
    """Refuse an unknown backend, or a method or setting the backend cannot run, before anything loads."""
    get_backend(settings.backend).check(method, settings)


def _needs_model(batches: list[list[Sample]], cache: ResponseCache | None) -> bool:
    """False when the cache holds every pending sample's response: the model is then never loaded."""
    if cache is None:
        return True
    return not cache.has_all([cache.key(s.sample_id, sha256_json(s.doc)) for batch in batches for s in batch])


def _pending(samples: list[Sample], store: RecordStore | None, ranks: Ranks) -> list[Sample]:
    """Samples without a successful record, the same list on every rank (rank 0 decides and broadcasts).

    Rank 0 first merges shard files a killed data-parallel run left behind, so their records count as done, and
    forgets records made from other data than the samples now hold (:meth:`RecordStore.forget_stale`).
    """
    ids = None
    if store is not None:
        merge_shards(store, {s.sample_id: s.index for s in samples})
        stale = store.forget_stale({s.sample_id: (sha256_json(s.doc), sha256_text(s.target)) for s in samples})
        if stale:
            warnings.warn(
                f"{store.path}: {len(stale)} record(s) were made from other data than the task's files now hold "
                f"(e.g. sample {stale[0]!r}: its question, image or target changed); they are generated again",
                stacklevel=2,
            )
        ids = [s.sample_id for s in samples if not store.done(s.sample_id)]
    ids = set(ranks.broadcast(ids))
    return [s for s in samples if s.sample_id in ids]


@dataclass
class Generated:
    """What the generation phase of a run produced, over all ranks."""

    errors: list[dict[str, Any]]
    seconds: float  # wall time of the generation phase (the slowest rank's)
    report: dict[str, Any] | None  # the method's report (``{"ranks": [...]}`` when the ranks' reports differ)
    per_rank: list[int]  # samples each rank generated


def _run_shards(
    task: Task,
    adapter: Adapter,
    method: Method,
    pending: list[Sample],
    store: RecordStore | None,
    settings: RunSettings,
) -> Generated | None:
    """Generate this rank's share of ``pending``; on rank 0, merge every rank's records into ``store``.

    Returns what all ranks generated on rank 0, ``None`` on the others.
    """
    ranks = settings.ranks
    batches = ranks.my_batches(pending, settings.batch_size)
    errors, seconds = [], 0.0
    if batches:
        shard = RecordStore(shard_path(Path(settings.output_dir) / _records_name(task), ranks.rank),
                            settings.config_hash) if ranks.parallel else store  # fmt: skip
        errors, seconds = _generate_pending(task, adapter, method, batches, shard, settings)
    mine = (errors, seconds, sum(len(b) for b in batches))
    if not ranks.parallel:
        return Generated(errors, seconds, method.report(), [mine[2]])
    gathered = ranks.gather(mine)  # also the barrier: every rank has finished generating
    reports = ranks.gather(method.report())  # file-based reports (EmbedLens) now see every rank's files
    if not ranks.main:
        return None
    merge_shards(store, {s.sample_id: s.index for s in pending})
    return Generated(
        errors=[e for errs, _, _ in gathered for e in errs],
        seconds=max(sec for _, sec, _ in gathered),
        report=reports[0] if all(r == reports[0] for r in reports) else {"ranks": reports},
        per_rank=[n for _, _, n in gathered],
    )


def _records_name(task: Task) -> str:
    return f"samples_{task.name}.jsonl"


def evaluate(task: Task, adapter: Adapter, method: Method, settings: RunSettings, logger: Any = None) -> dict[str, Any]:
    """Evaluate ``method`` on ``adapter`` over ``task``; resumable, data-parallel under torchrun.

    Returns the results document (an empty dict on ranks other than 0, which only generate).
    """
    logger = logger or NoLogger()
    t_start = time.perf_counter()
    reset_peak_memory()  # this run's peaks, not those of the runs before it in this process (a multirun)
    torch.manual_seed(settings.seed)
    method.check(adapter)  # unsupported combinations fail before any weight is loaded
    method.check_generation(dict(getattr(task, "gen_kwargs", None) or {}))
    check_backend(method, settings)
    ranks = settings.ranks
    ranks.init()
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, ranks):
        return _evaluate_locked(task, adapter, method, settings, logger, out, t_start)


def _evaluate_locked(
    task: Task, adapter: Adapter, method: Method, settings: RunSettings, logger: Any, out: Path, t_start: float
) -> dict[str, Any]:
    ranks = settings.ranks
    samples = task.samples()
    if not samples:
        raise UserError(f"task {task.name}: no samples to evaluate (empty data file(s)?); check the task's data paths")
    if ranks.main:
        _refuse_shrinking(out / "results.json", samples, settings)
    method.output_dir = out
    store = RecordStore(out / _records_name(task), settings.config_hash) if ranks.main else None
    pending = _pending(samples, store, ranks)
    generated = _run_shards(task, adapter, method, pending, store, settings)
    if generated is None:
        return {}
    errors, gen_seconds = generated.errors, generated.seconds
    wanted = {s.sample_id for s in samples}
    ok = sorted((r for sid, r in store.records.items() if sid in wanted), key=lambda r: r["index"])
    results = build_results(
        results=task.aggregate(ok + errors, seed=settings.seed) if ok else {},  # errors: splits with none scored
        higher_is_better={task.name: task.higher_is_better},
        versions={task.name: task.version},
        **{"n-samples": {task.name: {"original": len(samples), "effective": len(ok), "errors": len(errors)}}},
        errors={
            "count": len(errors),
            "by_reason": dict(Counter(error_kind(r["error"]) for r in errors)),
            "samples": [{"sample_id": r["sample_id"], "source": r["source"], "error": r["error"]} for r in errors[:50]],
        },
        resumed={"skipped": len(samples) - len(pending), "generated": len(pending), "dropped_on_load": store.dropped},
        config=settings.config,
        config_hash=settings.config_hash,
        pair_hash=settings.pair_hash,
        model={
            **adapter.describe(),
            "backend": settings.backend,
            **({"engine": settings.engine} if settings.engine else {}),
        },
        method=method.describe(),
        task=task.describe(),
        timings={
            "model_load_s": adapter.load_seconds,
            "generation_s": round(gen_seconds, 3),
            "samples_per_s": round(len(pending) / gen_seconds, 3) if gen_seconds else None,
            "batch_size": settings.batch_size,
            "samples_per_process": generated.per_rank,
            "total_s": round(time.perf_counter() - t_start, 3),
        },
        samples_file=store.path.name,
        sample_set=sample_set(samples, set(store.records)),
    )
    if settings.cache is not None:
        results["cache"] = settings.cache.describe()
    if generated.report is not None:
        results["method_report"] = generated.report
    if ok and method.name != BASELINE_METHOD and settings.pair_hash:
        baseline = find_baseline(out, settings.pair_hash, results["sample_set"]["sha256"])
        if baseline is not None:
            results["paired"] = paired_block(task, ok, baseline, store.path.name, settings.seed)
    results_path = out / "results.json"
    write_json(results_path, results)
    logger.log_results(results, results_path, store.path)
    if settings.report:
        print(_header(results, settings))
        print(make_table(results) if ok else "no successful samples: nothing to score")
        for line in _unscored_splits(samples, ok):
            print(line)
        if "paired" in results:
            print(paired_summary(results["paired"]))
    return results


def _unscored_splits(samples: list[Sample], ok: list[dict[str, Any]]) -> list[str]:
    """A note per split whose every sample failed: its metrics, and those of rows over several splits, are n/a."""
    scored = {r["split"] for r in ok}
    sizes = Counter(s.split for s in samples)
    return [
        f"note: split {split!r}: none of its {n} samples could be scored (errors in results.json); its metrics and "
        "those combining splits are n/a, not computed over the other splits"
        for split, n in sizes.items()
        if ok and split not in scored
    ]


def _refuse_shrinking(results_path: Path, samples: list[Sample], settings: RunSettings) -> None:
    """Refuse a run that would replace a results file over more items with one over fewer.

    The default output directories of runs with different ``limit`` differ, so this guards a shared explicit
    ``output_dir``: a limited rerun there would overwrite the fuller run's ``results.json`` with fewer samples.
    """
    try:
        old = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    n_old = (old.get("sample_set") or {}).get("n")
    if isinstance(n_old, int) and n_old > len(samples):
        limit = (settings.config or {}).get("limit")
        raise UserError(
            f"{results_path} holds results over {n_old} samples; this run (limit={limit}) covers {len(samples)} and "
            "would replace them: use another output_dir (the default one keeps each limit apart)"
        )


def sample_set(samples: list[Sample], stored: set[str]) -> dict[str, Any]:
    """Identity of the evaluated items: count and SHA-256 over sorted ``sample_id, doc_hash, target_hash`` lines.

    Reports pair and aggregate only runs with equal hashes. ``ids`` lists the items too when the samples file also
    holds records of other items (a rerun with a smaller ``limit`` shares the directory), so that readers of the
    file can select this run's records.
    """
    lines = sorted(f"{s.sample_id}\t{sha256_json(s.doc)}\t{sha256_text(s.target)}" for s in samples)
    out: dict[str, Any] = {"n": len(samples), "sha256": sha256_text("\n".join(lines))}
    wanted = {s.sample_id for s in samples}
    if stored - wanted:
        out["ids"] = sorted(wanted)
    return out


def from_config(cfg: Any, output_dir: str | Path | None = None) -> tuple[Task, Adapter, Method, RunSettings]:
    """Task, adapter (not loaded), method and run settings from a composed top-level config."""
    from omegaconf import OmegaConf

    from harness.config import build_adapter, config_hash, instantiate, pair_hash

    settings = RunSettings(
        output_dir=Path(output_dir or cfg.output_dir),
        config_hash=config_hash(cfg),
        pair_hash=pair_hash(cfg),
        batch_size=cfg.batch_size,
        prefetch=cfg.get("prefetch", "auto"),
        strict=cfg.strict,
        seed=cfg.seed,
        config=OmegaConf.to_container(cfg, resolve=True),
        ranks=Ranks.from_env(),
        backend=cfg.model.get("backend", "hf"),
        backend_options=OmegaConf.to_container(cfg.model.get("vllm") or {}, resolve=True),
    )
    settings.progress = cfg.progress and settings.ranks.main  # one bar, not one per rank
    adapter = build_adapter(cfg.model)
    adapter.device_name = settings.ranks.device(adapter.device_name)
    adapter.check_device()  # before the task reads its data and the model loads
    adapter.check_checkpoint()  # a config of the adapter's family (read once; the methods' checks reuse it)
    task = instantiate(cfg.task, drop=("name",), strict=cfg.strict, limit=cfg.limit)
    if cfg.get("cache"):
        if is_greedy(task.gen_kwargs):
            parts = (settings.config[k] for k in ("model", "method", "task"))
            settings.cache = ResponseCache(cfg.cache, scope(*parts))
        else:
            print(f"response cache off: {task.name} samples (do_sample=true), answers are not reproducible")
    return task, adapter, instantiate(cfg.method, drop=("name",)), settings


def _header(results: dict[str, Any], settings: RunSettings) -> str:
    m, meth, n = results["model"], results["method"], next(iter(results["n-samples"].values()))
    return (
        f"\nmodel: {m['name']} ({m['path']}), method: {meth['name']}, batch_size: {settings.batch_size}, "
        f"samples: {n['effective']} scored / {n['original']} ({n['errors']} errors), "
        f"output: {settings.output_dir}"
    )
