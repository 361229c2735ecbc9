"""Data-parallel evaluation under ``torchrun``: which samples each rank answers, and merging the ranks' records.

``torchrun --nproc_per_node N run.py …`` starts N copies of ``run.py``; torchrun sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` and this module joins them in one ``torch.distributed`` process group. Only small Python objects
travel between ranks (sample ids, error records, timings), so the group always uses the ``gloo`` backend, on CPU
and GPU machines alike; each rank's model sits on ``cuda:LOCAL_RANK`` when CUDA is there.

How a run is split (:func:`harness.engine.evaluate`):

1. Rank 0 folds the shard files of an earlier, killed run into its view of what is done and broadcasts the ids of
   the pending samples; every rank cuts the same list into batches of ``batch_size`` (exactly the batches a
   one-process run would form) and takes every ``world``-th batch, starting at its rank. Equal batches mean equal
   padding, so outputs match a one-process run token for token.
2. Rank ``r`` appends its records to ``samples_<task>.rank<r>.jsonl`` (the same durable :class:`RecordStore`).
   A killed run leaves these files; the next run (any number of ranks) counts their records as done, so resume
   works per shard.
3. After a barrier rank 0 appends every shard's records to ``samples_<task>.jsonl`` in sample order, deletes the
   shard files, scores, and writes ``results.json``; the other ranks write nothing else.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from core.records import RecordStore, read_records

#: how long a rank waits for the others at a barrier (the slowest shard's generation time must fit in it)
TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the data-parallel group (``rank 0 of 1`` for a plain run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """Read torchrun's (or a multi-task submitit job's) environment; one process when neither says otherwise."""
        _export_submitit_env()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))

    @property
    def parallel(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """True on the rank that merges, scores, prints and logs."""
        return self.rank == 0

    def init(self) -> None:
        """Join the process group (idempotent; nothing for a single process)."""
        if self.parallel and not dist.is_initialized():
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world, timeout=TIMEOUT)

    def close(self) -> None:
        """Leave the process group."""
        if self.parallel and dist.is_initialized():
            dist.destroy_process_group()

    def device(self, device_name: str) -> str:
        """The device a rank's model goes on: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when CUDA is available."""
        import torch

        if self.parallel and device_name in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device_name

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.parallel:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.parallel:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def my_batches(self, pending: list[Any], batch_size: int) -> list[list[Any]]:
        """This rank's batches: the one-process batches of ``pending``, every ``world``-th from ``rank``."""
        batches = [pending[i : i + batch_size] for i in range(0, len(pending), batch_size)]
        return batches[self.rank :: self.world]


def _export_submitit_env() -> None:
    """In a submitit job with several tasks (``hydra.launcher.tasks_per_node=N``), set torchrun's variables.

    submitit starts the N processes itself (``srun`` on SLURM); its helper derives ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the job. ``CUDA_VISIBLE_DEVICES`` is left alone, so
    each rank takes ``cuda:LOCAL_RANK`` as under torchrun.
    """
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    if submitit.JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def shard_path(records_path: Path, rank: int) -> Path:
    """``samples_pope.jsonl`` → ``samples_pope.rank3.jsonl``."""
    return records_path.with_name(f"{records_path.stem}.rank{rank}{records_path.suffix}")


def shard_files(records_path: Path) -> list[Path]:
    """Shard files of ``records_path`` left in its directory (any rank, any earlier world size), by rank."""
    found = records_path.parent.glob(f"{records_path.stem}.rank*{records_path.suffix}")
    return sorted(found, key=lambda p: int(p.stem.rsplit(".rank", 1)[1]))


def shard_done(records_path: Path, config_hash: str) -> set[str]:
    """Sample ids with a successful record in a shard file (each file checked and cleaned like the main store)."""
    done: set[str] = set()
    for path in shard_files(records_path):
        done |= set(RecordStore(path, config_hash).records)
    return done


def merge_shards(store: RecordStore, order: dict[str, int]) -> int:
    """Append the shard files' records to the main ``store`` in sample order and delete the files.

    A record already in the main store keeps its first copy (the store drops later duplicates), so a merge
    interrupted between the append and the deletion is harmless. Error records travel too (the main store drops
    them on its next open so they are retried, as in a one-process run). Returns the number of records appended.
    """
    paths = shard_files(store.path)
    records = [r for path in paths for r in read_records(path) if not store.done(r["sample_id"])]
    records.sort(key=lambda r: order.get(r["sample_id"], len(order)))  # stable: a retried sample's error first
    store.append(records)
    for path in paths:
        path.unlink()
    return len(records)
