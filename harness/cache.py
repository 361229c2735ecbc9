"""Response cache: a SQLite key-value store of finished responses, shared across output directories.

A rerun of an identical configuration in a new output directory (another ``output_root``, a copy of a sweep, a
report that needs the baseline again) reuses the stored answers instead of generating them again. The key of one
sample's response is the SHA-256 of

* the model: option name, path or hub id, revision, dtype, attention implementation, prompt template and system
  prompt, plus, for a local checkpoint, the name, size and modification time of its weight and config files (a
  checkpoint retrained in place is a different model);
* the method's config (its hash: every hyperparameter);
* the task's prompt fingerprint: its config without the bootstrap and scoring-only options (prompt suffix, data
  paths, mode, generation settings included);
* the sample: ``sample_id`` and the hash of its document.

Only greedy runs are cached (``do_sample`` false): a sampled answer is not a function of the key. Values are the
response's prompt, raw output and extra fields. ``sqlite3`` is Python's standard library; the database is opened
per call with a timeout, so several processes (a sweep, data-parallel ranks) can share one file.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.results import sha256_json

#: task options that change how answers are scored or summarised, not what the model is asked
SCORING_ONLY = ("n_boot", "parser", "extra_parsers")
CHECKPOINT_FILES = ("*.safetensors", "config.json", "generation_config.json")


def checkpoint_fingerprint(path: str) -> list[tuple[str, int, int]]:
    """``(name, size, mtime_ns)`` of a local checkpoint's weight and config files (empty for a hub id)."""
    root = Path(path)
    if not root.is_dir():
        return []
    files = sorted({f for pattern in CHECKPOINT_FILES for f in root.glob(pattern)})
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def scope(model_cfg: dict[str, Any], method_cfg: dict[str, Any], task_cfg: dict[str, Any]) -> str:
    """The key part shared by every sample of a run (model, method, task prompt fingerprint)."""
    task = {k: v for k, v in task_cfg.items() if k not in SCORING_ONLY}
    model = {**model_cfg, "checkpoint": checkpoint_fingerprint(str(model_cfg.get("path", "")))}
    model.pop("device", None)  # where the model runs does not change a greedy answer's text
    return sha256_json({"model": model, "method": sha256_json(method_cfg), "task": task})


def is_greedy(gen_kwargs: dict[str, Any]) -> bool:
    """Whether generation is deterministic (no sampling)."""
    return not gen_kwargs.get("do_sample", False)


class ResponseCache:
    """SQLite-backed ``key → response`` store.

    Args:
        path: Database file (created with its table on first use).
        scope: The run's :func:`scope` key part.
    """

    def __init__(self, path: str | Path, scope: str) -> None:
        self.path = Path(path)
        self.scope = scope
        self.hits = self.misses = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection that commits on success and is always closed."""
        db = sqlite3.connect(self.path, timeout=60)
        try:
            with db:
                yield db
        finally:
            db.close()

    def key(self, sample_id: str, doc_hash: str) -> str:
        """The full key of one sample's response."""
        return sha256_json([self.scope, sample_id, doc_hash])

    def has_all(self, keys: list[str]) -> bool:
        """True when every key is stored (not counted as hits or misses)."""
        with self._connect() as db:
            return all(db.execute("SELECT 1 FROM responses WHERE key = ?", (k,)).fetchone() for k in keys)

    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """Stored responses of the given keys (absent keys are misses); counts hits and misses."""
        found: dict[str, dict[str, Any]] = {}
        with self._connect() as db:
            for key in keys:
                row = db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    found[key] = json.loads(row[0])
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put_many(self, items: dict[str, dict[str, Any]]) -> None:
        """Store responses (an existing key is overwritten with the same answer)."""
        rows = [(k, json.dumps(v, ensure_ascii=False, default=str)) for k, v in items.items()]
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)", rows)

    def describe(self) -> dict[str, Any]:
        """For the results file."""
        return {"path": str(self.path), "scope": self.scope, "hits": self.hits, "misses": self.misses}
