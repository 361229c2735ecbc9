"""Per-sample JSONL records, written as they are produced and read back to resume a killed run.

Each batch's records are appended in one write, then flushed and fsync'ed, so a kill loses at most the batch in
flight. On open, the file is checked: a torn last line (killed mid-write) is dropped, records of errored
samples are dropped so they are retried, duplicates keep their first copy, and records written under another
config hash are refused — mixing two configs in one file would silently corrupt the metrics. A corrupt line
elsewhere (damage a kill cannot cause: a disk error, a hand edit) is moved, verbatim with its line number, to
``<file>.corrupt`` beside it, with a warning; its sample has no record then and is generated again.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from core.errors import UserError


class ConfigMismatchError(UserError, RuntimeError):
    """The output directory holds records of a different configuration."""


class RecordStore:
    """Append-only JSONL store of per-sample records keyed by ``sample_id``."""

    def __init__(self, path: str | Path, config_hash: str) -> None:
        self.path = Path(path)
        self.config_hash = config_hash
        self.records: dict[str, dict[str, Any]] = {}
        self.dropped = {"torn": 0, "errored": 0, "duplicate": 0, "corrupt": 0, "stale": 0}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        keep: list[str] = []
        corrupt: list[tuple[int, str]] = []
        for line, rec in _read_lines(self.path, self.dropped, corrupt):
            if rec.get("config_hash") != self.config_hash:
                raise ConfigMismatchError(
                    f"{self.path} holds records of config {rec.get('config_hash')}, this run is {self.config_hash}; "
                    "use another output_dir (the default one is derived from the config) or delete the file"
                )
            if rec.get("error"):
                self.dropped["errored"] += 1
            elif rec["sample_id"] in self.records:
                self.dropped["duplicate"] += 1
            else:
                self.records[rec["sample_id"]] = rec
                keep.append(line)
        if corrupt:
            self._quarantine(corrupt)
        if any(self.dropped.values()):
            self._rewrite(keep)

    def _quarantine(self, corrupt: list[tuple[int, str]]) -> None:
        side = self.path.with_name(self.path.name + ".corrupt")
        with side.open("a", encoding="utf-8") as f:
            f.write("".join(f"{lineno}\t{line}\n" for lineno, line in corrupt))
            f.flush()
            os.fsync(f.fileno())
        self.dropped["corrupt"] += len(corrupt)
        lines = ", ".join(str(n) for n, _ in corrupt[:5]) + (" ..." if len(corrupt) > 5 else "")
        warnings.warn(
            f"{self.path}: {len(corrupt)} corrupt record line(s) (line {lines}) moved to {side}; their samples "
            "are generated again",
            stacklevel=3,
        )

    def _rewrite(self, lines: list[str]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def forget_stale(self, current: dict[str, tuple[str, str]]) -> list[str]:
        """Drop records made from other data than the samples now hold; they are generated again.

        Resuming keys records by ``sample_id``. A record whose ``doc_hash`` or ``target_hash`` differs from the
        sample's now (an edited question, image name or label) would score an old answer against the new sample,
        or an answer to the old question as the new one's: a silent wrong number.

        Args:
            current: ``sample_id -> (doc_hash, target_hash)`` of the samples the task holds now.

        Returns:
            The forgotten sample ids (also counted in ``dropped["stale"]`` and removed from the file).
        """
        stale = [
            sid
            for sid, rec in self.records.items()
            if sid in current and (rec.get("doc_hash"), rec.get("target_hash")) != current[sid]
        ]
        if stale:
            for sid in stale:
                del self.records[sid]
            self._rewrite([json.dumps(r, ensure_ascii=False, default=str) for r in self.records.values()])
            self.dropped["stale"] += len(stale)
        return stale

    def done(self, sample_id: str) -> bool:
        """True when a successful record for ``sample_id`` is stored."""
        return sample_id in self.records

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append one batch of records durably; successful ones become ``done``."""
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blob = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            if not r.get("error"):
                self.records.setdefault(r["sample_id"], r)


def _read_lines(
    path: Path, dropped: dict[str, int], corrupt: list[tuple[int, str]] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` pairs of a records file.

    A torn last line is counted in ``dropped["torn"]`` and skipped. Any other line that is not a JSON object with
    a ``sample_id`` goes to ``corrupt`` as ``(line number, text)``; without that list it is skipped with a warning.
    """
    with path.open("rb") as f:
        lines = f.read().split(b"\n")
    out = []
    for i, blob in enumerate(lines):
        if not blob.strip():
            continue
        line = blob.decode("utf-8", errors="replace")
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("sample_id"), str):
                raise ValueError("not a record")
            out.append((line, rec))
        except ValueError:
            if i == len(lines) - 1:  # only the last line may be torn by a kill
                dropped["torn"] += 1
            elif corrupt is not None:
                corrupt.append((i + 1, line))
            else:
                warnings.warn(f"{path}:{i + 1}: corrupt record line skipped", stacklevel=3)
    return out


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a records file in file order (errors and duplicates included; a torn last line skipped)."""
    return [rec for _, rec in _read_lines(Path(path), {"torn": 0})]


def load_records(path: str | Path) -> dict[str, dict[str, Any]]:
    """Successful records of a finished (or killed) run, read-only: first copy per ``sample_id``, any config."""
    records: dict[str, dict[str, Any]] = {}
    for rec in read_records(path):
        if not rec.get("error"):
            records.setdefault(rec["sample_id"], rec)
    return records


def load_errors(path: str | Path) -> dict[str, str]:
    """The newest recorded error reason per ``sample_id`` of a records file (samples that later succeeded included)."""
    return {rec["sample_id"]: rec["error"] for rec in read_records(path) if rec.get("error")}
