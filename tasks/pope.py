"""POPE, Polling-based Object Probing Evaluation (Li et al., EMNLP 2023).

Paper: "Evaluating Object Hallucination in Large Vision-Language Models".

Each question asks ``Is there a/an <object> in the image?``; half the objects are present (label ``yes``) and
half are not (label ``no``), the absent ones drawn by one of three strategies, one split each: ``random``,
``popular`` and ``adversarial`` (see :mod:`shapes.pope_build`). The three splits ask about the same images and
share the positive questions.

Files read (format detected per file):

* JSON Lines — the official COCO files ``coco_pope_{split}.json``: one object per line with ``question_id``,
  ``image`` (file name relative to ``image_root``), ``text`` (the question), ``label`` (``yes``/``no``);
* a JSON array of the same objects — the SEEM A-OKVQA / GQA files (first non-space character ``[``);
* the Hugging Face parquet export (``*.parquet``): columns ``question_id``, ``question``, ``answer``,
  ``image`` (struct of ``bytes`` and ``path``), ``image_source``, ``category``.

If ``questions`` contains ``{split}`` it is formatted once per split and each file holds one split; otherwise
the file(s) hold every split and a row's split is its ``category`` field.

Scoring: an answer parser (see :mod:`tasks.yesno`; default ``pope_official``, POPE's own rule) maps the raw
output to ``yes``/``no``/``None``. Metrics per split with positive class ``yes`` (accuracy, precision, recall,
F1, yes-ratio from *predictions*), the rate of undecided answers, the rate of answers that are not a clean
``yes``/``no``, and the mean of each metric over the splits (LLaVA-1.5 reports the mean of the per-split F1).
Standard errors come from a bootstrap over images, joint across the splits (:mod:`core.stats`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from core.stats import Outcomes, block_columns, safe_divide
from tasks.base import TASKS, DataError, Response, Sample, SampleError, Task
from tasks.media import ImageFile, MalformedImageCell, check_image_root, image_cell, resolve_files
from tasks.yesno import PARSERS, all_verdicts, is_clean_yes_no

DEFAULT_SPLITS = ("random", "popular", "adversarial")
DEFAULT_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
DEFAULT_GEN_KWARGS: dict[str, Any] = {"max_new_tokens": 128, "do_sample": False}

#: Parser-dependent metrics, in output order.
METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "unknown_rate")
#: Filter name of the parser-independent ``unclean_rate`` metric (lm-eval's name for "no filter").
NO_FILTER = "none"
UNKNOWN_SPLIT = "unknown"
_LABELS = ("yes", "no")
_PARQUET_BATCH = 64


# ----------------------------------------------------------------------------------------------- rows


@dataclass
class _Item:
    """One row of a question file after validation (``error`` set when it is malformed)."""

    source: str
    split: str | None
    qid: str | None = None
    image_id: str = ""
    question: str = ""
    target: str = ""
    images: Callable[[], list[Image.Image]] | None = None
    doc: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class _Malformed(Exception):
    """A row-level problem; becomes an error sample (or a :class:`SampleError` in strict mode)."""


def _require(record: dict[str, Any], names: Iterable[str]) -> None:
    missing = [n for n in names if n not in record or record[n] is None]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise _Malformed(f"missing field{plural} {', '.join(repr(m) for m in missing)}")


def _question_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or str(value).strip() == "":
        raise _Malformed(f"field 'question_id' must be an int or a non-empty string, got {value!r}")
    return str(value).strip()


def _early_qid(record: dict[str, Any]) -> str | None:
    """The row's ``question_id`` when it is valid, before anything else is checked.

    A row that fails later keeps its own id (``random/8``), not one made from the file and line.
    """
    try:
        return _question_id(record.get("question_id"))
    except _Malformed:
        return None


def _string(record: dict[str, Any], name: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise _Malformed(f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def _label(record: dict[str, Any], name: str) -> str:
    value = record[name]
    label = value.strip().lower() if isinstance(value, str) else None
    if label not in _LABELS:
        raise _Malformed(f"field {name!r} must be 'yes' or 'no', got {value!r}")
    return label


def _category(record: dict[str, Any]) -> str:
    _require(record, ["category"])
    return _string(record, "category").strip()


def _image_path(image_root: str | None, name: str) -> str:
    return str(Path(image_root) / name) if image_root else name


def _json_item(record: Any, source: str, split: str | None, image_root: str | None) -> _Item:
    """Validate one JSON record (official POPE fields). ``split`` is None when it comes from ``category``."""
    item = _Item(source=source, split=split, doc=record if isinstance(record, dict) else {"raw": record})
    try:
        if not isinstance(record, dict):
            raise _Malformed(f"record is not a JSON object but {type(record).__name__}")
        item.qid = _early_qid(record)
        if split is None:
            item.split = _category(record)
        _require(record, ["question_id", "image", "text", "label"])
        item.qid = _question_id(record["question_id"])
        image = _string(record, "image")
        item.image_id = Path(image).stem
        item.question = _string(record, "text").strip()
        item.target = _label(record, "label")
        item.images = ImageFile(_image_path(image_root, image), source)
    except _Malformed as exc:
        item.error = str(exc)
    return item


def _iter_json(path: Path, split: str | None, image_root: str | None) -> Iterator[_Item]:
    """Rows of a JSON Lines file (1-based line numbers) or a JSON array file (0-based ``[i]``).

    JSON Lines are decoded line by line, so a line that is not UTF-8 becomes one malformed row, not a failed file;
    a byte-order mark at the start of a line and CRLF line ends are accepted. A JSON array must parse as a whole.
    """
    raw = path.read_bytes()
    if raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        try:
            data = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SampleError(
                f"invalid JSON array: {exc}; fix the file or convert it to JSON Lines", str(path)
            ) from None
        if not isinstance(data, list):
            raise SampleError("invalid JSON array: the file is not one JSON array", str(path))
        for i, record in enumerate(data):
            yield _json_item(record, f"{path}[{i}]", split, image_root)
        return
    for lineno, blob in enumerate(raw.split(b"\n"), start=1):
        source = f"{path}:{lineno}"
        try:
            line = blob.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as exc:
            doc = {"raw_line": blob[:1000].decode("utf-8", errors="replace")}
            yield _Item(source=source, split=split, doc=doc, error=f"not valid UTF-8: byte {exc.start} of the line")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield _Item(source=source, split=split, doc={"raw_line": line[:1000]}, error=f"invalid JSON: {exc.msg}")
            continue
        yield _json_item(record, source, split, image_root)


def _parquet_item(
    row: dict[str, Any], source: str, split: str | None, image_root: str | None, cache: dict[bytes, bytes]
) -> _Item:
    """Validate one row of the Hugging Face parquet export."""
    doc = {k: v for k, v in row.items() if k != "image"}
    if isinstance(row.get("image"), dict):
        doc["image"] = {"path": row["image"].get("path")}
    item = _Item(source=source, split=split, doc=doc)
    try:
        item.qid = _early_qid(row)
        if split is None:
            item.split = _category(row)
        _require(row, ["question_id", "question", "answer", "image"])
        item.qid = _question_id(row["question_id"])
        item.question = _string(row, "question").strip()
        item.target = _label(row, "answer")
        item.images, path = image_cell(row["image"], source, image_root, cache)
        item.image_id = str(row.get("image_source") or Path(path).stem)
        if not item.image_id:
            raise _Malformed("missing field 'image_source' (and the image has no path)")
    except (_Malformed, MalformedImageCell) as exc:
        item.error = str(exc)
    return item


def _iter_parquet(path: Path, split: str | None, image_root: str | None) -> Iterator[_Item]:
    """Rows of a parquet file, read in small batches (0-based ``[i]`` row numbers)."""
    import pyarrow.parquet as pq

    cache: dict[bytes, bytes] = {}
    i = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH):
        for row in batch.to_pylist():
            yield _parquet_item(row, f"{path}[{i}]", split, image_root, cache)
            i += 1


def _iter_file(path: Path, split: str | None, image_root: str | None) -> Iterator[_Item]:
    if path.suffix.lower() == ".parquet":
        return _iter_parquet(path, split, image_root)
    return _iter_json(path, split, image_root)


# ----------------------------------------------------------------------------------------------- metrics


def _record_counts(records: list[dict[str, Any]], parsers: list[str]) -> np.ndarray:
    """Per-record additive counts ``[n_records, 2 + 5 * n_parsers]``.

    Columns: ``n`` (always 1), ``unclean``, then per parser ``tp, fp, tn, fn, unknown``. A ``None`` prediction
    is a false negative when the target is yes, nothing (only wrong) when the target is no.
    """
    counts = np.zeros((len(records), 2 + 5 * len(parsers)), dtype=np.float64)  # [n_records, K]
    parse_fns = [PARSERS.get(name) for name in parsers]
    for r, rec in enumerate(records):
        text = rec.get("raw_output") or ""
        target = str(rec["target"]).strip().lower()
        if target not in _LABELS:
            raise ValueError(f"record {rec.get('sample_id')!r}: target must be 'yes' or 'no', got {rec['target']!r}")
        counts[r, 0] = 1.0
        counts[r, 1] = not is_clean_yes_no(text)
        for p, parse in enumerate(parse_fns):
            pred = parse(text, target)
            tp = pred == "yes" and target == "yes"
            fp = pred == "yes" and target == "no"
            tn = pred == "no" and target == "no"
            fn = pred != "yes" and target == "yes"
            counts[r, 2 + 5 * p : 7 + 5 * p] = (tp, fp, tn, fn, pred is None)
    return counts


def pope_statistics(sums: np.ndarray, n_splits: int, n_parsers: int) -> np.ndarray:
    """Metrics from summed counts of :func:`_record_counts` laid out in one block per split.

    Args:
        sums: Column totals, shape ``[..., n_splits * (2 + 5 * n_parsers)]``.
        n_splits: Number of split blocks.
        n_parsers: Number of parsers per block.

    Returns:
        Shape ``[..., n_splits + 1, 1 + 6 * n_parsers]``: row ``s`` is split ``s``, the last row the mean over
        splits; column 0 is ``unclean_rate``, then per parser the :data:`METRICS`. Rates are NaN for a split with
        no records (possible inside a bootstrap draw); precision/recall/F1 are 0 when their denominator is 0.
    """
    lead = sums.shape[:-1]
    s = sums.reshape(*lead, n_splits, 2 + 5 * n_parsers)  # [..., S, K]
    n = s[..., 0]  # [..., S]
    c = s[..., 2:].reshape(*lead, n_splits, n_parsers, 5)  # [..., S, P, 5]
    tp, fp, tn, fn, unk = (c[..., j] for j in range(5))  # each [..., S, P]
    n_p = n[..., None]  # [..., S, 1]
    precision = safe_divide(tp, tp + fp)
    recall = safe_divide(tp, tp + fn)
    metrics = np.stack(
        [
            safe_divide(tp + tn, n_p, np.nan),
            precision,
            recall,
            safe_divide(2 * precision * recall, precision + recall),
            safe_divide(tp + fp, n_p, np.nan),
            safe_divide(unk, n_p, np.nan),
        ],
        axis=-1,
    )  # [..., S, P, 6]
    metrics = np.where((n_p == 0)[..., None], np.nan, metrics)
    unclean = safe_divide(s[..., 1], n, np.nan)[..., None]  # [..., S, 1]
    per_split = np.concatenate([unclean, metrics.reshape(*lead, n_splits, 6 * n_parsers)], axis=-1)  # [..., S, M]
    mean = per_split.mean(axis=-2, keepdims=True)  # [..., 1, M]
    return np.concatenate([per_split, mean], axis=-2)  # [..., S + 1, M]


# ----------------------------------------------------------------------------------------------- task


def _with_suffix(question: str, suffix: str) -> str:
    """``question + suffix``, or ``question`` when it already ends with the suffix's words (said once, not twice)."""
    words = suffix.strip()
    return question if words and question.rstrip().endswith(words) else question + suffix


@TASKS.register("pope")
class POPETask(Task):
    """POPE on COCO / A-OKVQA / GQA, from the official JSON(L) files or the Hugging Face parquet export.

    Args:
        questions: Path or glob of the question file(s); ``{split}`` in it is replaced by each split name.
        image_root: Directory the ``image`` field (or a parquet image path) is relative to; ``None`` uses the
            field as given. Not needed when parquet rows embed the image bytes.
        splits: Splits to evaluate, in canonical order.
        prompt_suffix: Appended to each question (default: LLaVA-1.5's single-word instruction), except to one
            that already ends with it (a file exported with the instruction in).
        parser: Headline answer parser (a name in :data:`tasks.yesno.PARSERS`).
        extra_parsers: Further parsers whose metrics are also reported.
        n_boot: Bootstrap draws for standard errors (0 disables them).
        strict: Raise :class:`SampleError` on the first malformed record instead of recording it.
        gen_kwargs: Generation settings merged over ``{"max_new_tokens": 128, "do_sample": False}``.
        limit: At most this many samples per split (the first ones in file order).
    """

    name: ClassVar[str] = "pope"
    version: ClassVar[str] = "1.0"
    default_gen_kwargs: ClassVar[dict[str, Any]] = DEFAULT_GEN_KWARGS
    #: ``yes_ratio`` has no better direction (0.5 is ideal on balanced splits; above means over-affirming, the
    #: usual hallucination failure), so it is marked ``False`` like the other "rates to watch".
    higher_is_better: ClassVar[dict[str, bool]] = {
        "accuracy": True,
        "precision": True,
        "recall": True,
        "f1": True,
        "yes_ratio": False,
        "unknown_rate": False,
        "unclean_rate": False,
    }

    def __init__(
        self,
        *,
        questions: str,
        image_root: str | None = None,
        splits: list[str] | tuple[str, ...] = DEFAULT_SPLITS,
        prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
        parser: str = "pope_official",
        extra_parsers: list[str] | tuple[str, ...] = (),
        n_boot: int = 1000,
        strict: bool = False,
        gen_kwargs: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(strict=strict, gen_kwargs=gen_kwargs, n_boot=n_boot, limit=limit)
        self.questions = str(questions)
        self.image_root = None if image_root is None else str(image_root)
        self.splits = [splits] if isinstance(splits, str) else [str(s) for s in splits]
        if not self.splits or len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must be non-empty and distinct, got {self.splits}")
        self.prompt_suffix = prompt_suffix
        self.parser = parser
        self.extra_parsers = [p for p in dict.fromkeys(extra_parsers) if p != parser]
        for name in (self.parser, *self.extra_parsers):
            PARSERS.get(name)  # fail early, with a did-you-mean message
        self._samples: list[Sample] | None = None

    # ---- loading

    def samples(self) -> list[Sample]:
        """All samples, split by split in the order of ``splits``, each in file order (cached)."""
        if self._samples is None:
            check_image_root(self.image_root)
            buckets = self._split_buckets() if "{split}" in self.questions else self._category_buckets()
            self._samples = self._to_samples(buckets)
        return list(self._samples)

    def _split_buckets(self) -> dict[str, list[_Item]]:
        """One file pattern per split: every row of the split's file(s) belongs to it."""
        buckets: dict[str, list[_Item]] = {}
        for split in self.splits:
            files = resolve_files(self.questions.replace("{split}", split), "POPE question")
            rows = itertools.chain.from_iterable(_iter_file(f, split, self.image_root) for f in files)
            buckets[split] = list(itertools.islice(rows, self.limit))
            if not buckets[split] and self.limit != 0:
                raise SampleError(
                    f"split {split!r} has no questions (empty file?); fix the file or leave the split out "
                    "(task.splits)",
                    ", ".join(str(f) for f in files),
                )
        return buckets

    def _category_buckets(self) -> dict[str, list[_Item]]:
        """Files holding every split: a row's split is its ``category``; other categories are skipped."""
        files = resolve_files(self.questions, "POPE question")
        buckets: dict[str, list[_Item]] = {s: [] for s in self.splits}
        present: set[str] = set()
        first_unknown: _Item | None = None
        for item in itertools.chain.from_iterable(_iter_file(f, None, self.image_root) for f in files):
            split = item.split if item.split is not None else UNKNOWN_SPLIT
            present.add(split)
            first_unknown = first_unknown or (item if item.split is None else None)
            if split in buckets or split == UNKNOWN_SPLIT:
                bucket = buckets.setdefault(split, [])
                if self.limit is None or len(bucket) < self.limit:
                    bucket.append(item)
            if self.limit is not None and all(s in present and len(buckets[s]) >= self.limit for s in self.splits):
                break  # every requested split is full: the rest of the file cannot add anything
        missing = [s for s in self.splits if s not in present]
        if missing:
            known = sorted(present - {UNKNOWN_SPLIT})
            hint = (
                f" (first row without a split: {first_unknown.source}: {first_unknown.error})" if first_unknown else ""
            )
            raise DataError(f"split(s) {missing} not found in {[str(f) for f in files]}; splits present: {known}{hint}")
        return buckets

    def _to_samples(self, buckets: dict[str, list[_Item]]) -> list[Sample]:
        samples: list[Sample] = []
        for split, items in buckets.items():
            seen: set[str] = set()
            for item in items:
                sample_id = f"{split}/{item.qid if item.qid is not None else item.source}"
                if item.error is None and sample_id in seen:
                    item.error = f"duplicate question_id: {item.qid!r} in split {split!r}"
                if sample_id in seen:
                    sample_id = f"{sample_id}@{item.source}"
                seen.add(sample_id)
                if item.error is not None and self.strict:
                    raise SampleError(item.error, item.source)
                samples.append(self._sample(item, split, sample_id, len(samples)))
        return samples

    def _sample(self, item: _Item, split: str, sample_id: str, index: int) -> Sample:
        ok = item.error is None
        return Sample(
            sample_id=sample_id,
            split=split,
            index=index,
            image_id=item.image_id,
            text=_with_suffix(item.question, self.prompt_suffix) if item.question else "",
            target=item.target,
            source=item.source,
            images=item.images if ok else None,
            doc=item.doc,
            error=item.error,
        )

    # ---- scoring

    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        """``parsed`` under :attr:`parser`, ``clean`` (a bare yes/no), ``correct``, and every parser's ``verdicts``.

        ``verdicts`` maps each registered yes/no parser to its reading of the same output, so the samples file
        shows where the parsers disagree.
        """
        text = response.raw_output or ""
        parsed = PARSERS.get(self.parser)(text, sample.target)
        return {
            "parsed": parsed,
            "clean": is_clean_yes_no(text),
            "correct": parsed == sample.target,
            "verdicts": all_verdicts(text, sample.target),
        }

    def outcomes(self, records: list[dict[str, Any]], splits: list[str] | None = None) -> Outcomes:
        """Per-split metrics (rows ``pope_<split>``) and their mean over the splits evaluated (row ``pope``).

        Every parser in ``[parser, *extra_parsers]`` re-parses ``raw_output``. Keys are ``"<metric>,<parser>"``
        for :data:`METRICS`, plus the parser-independent ``"unclean_rate,none"``. Positive class is ``yes``; an
        undecided (``None``) answer is wrong, a false negative when the target is yes, never a predicted yes.
        Precision is 0 when nothing is predicted yes; recall is 0 when no target is yes; F1 is 0 when P + R = 0.
        The splits share images, so their counts sit in one block of columns each and are bootstrapped jointly:
        the standard error of the mean over splits comes from the same draws as the per-split ones. A split in
        ``splits`` without a successful record has NaN metrics, and so has the mean.
        """
        present = dict.fromkeys([*(splits or []), *(r["split"] for r in records)])  # order of first appearance
        splits = [s for s in self.splits if s in present] + [s for s in present if s not in self.splits]
        parsers = [self.parser, *self.extra_parsers]
        split_index = np.array([splits.index(r["split"]) for r in records])  # [n_records]
        raw = _record_counts(records, parsers)  # [n_records, K]
        counts = block_columns(raw, split_index, len(splits))  # [n_records, S*K]
        n_rows, n_cols = len(splits) + 1, 1 + 6 * len(parsers)
        keys = [f"pope_{s}" for s in splits] + ["pope"]
        columns = [f"unclean_rate,{NO_FILTER}"] + [f"{m},{p}" for p in parsers for m in METRICS]
        sizes = np.bincount(split_index, minlength=len(splits))
        correct = raw[:, 2] + raw[:, 4]  # headline parser's tp + tn (see _record_counts)
        return Outcomes(
            counts=counts,
            stat_fn=lambda sums: pope_statistics(sums, len(splits), len(parsers)).reshape(
                *sums.shape[:-1], n_rows * n_cols
            ),
            names=[(k, c) for k in keys for c in columns],
            sizes={**{f"pope_{s}": int(n) for s, n in zip(splits, sizes, strict=True)}, "pope": len(records)},
            binary=correct,
            binary_name=f"correct,{self.parser}",
        )

    @property
    def headline(self) -> tuple[str, str]:
        """Accuracy under the headline parser, mean over the splits."""
        return "pope", f"accuracy,{self.parser}"

    def describe(self) -> dict[str, Any]:
        """Task metadata, including the data settings and, once loaded, the number of samples per split."""
        info = super().describe()
        info.update(
            questions=self.questions,
            image_root=self.image_root,
            splits=self.splits,
            prompt_suffix=self.prompt_suffix,
            parser=self.parser,
            extra_parsers=self.extra_parsers,
            limit=self.limit,
        )
        if self._samples is not None:
            info["split_sizes"] = {
                s: sum(x.split == s for x in self._samples) for s in dict.fromkeys(x.split for x in self._samples)
            }
        return info
