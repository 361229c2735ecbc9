"""MME, a comprehensive evaluation benchmark for multimodal LLMs (Fu et al., 2023).

Paper: "MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models".

Fourteen subtasks (:data:`PERCEPTION`, :data:`COGNITION`). Every image comes with exactly two yes/no questions, one
whose answer is Yes and one whose answer is No; a model only earns an image's ``acc+`` point when it gets both.

Data read (``data`` option; the format is detected from the path):

* the release folder ``MME_Benchmark_release_version/`` (or its parent): one folder per subtask, each in one of
  two layouts, detected per subtask — "split" (``images/`` + ``questions_answers_YN/``, one ``.txt`` per image
  with the image's stem; artwork, celebrity, landmark, posters, scene) or "flat" (image and same-stem ``.txt``
  side by side; the other nine). Each ``.txt`` holds two lines ``question<TAB>Yes|No``.
* the Hugging Face parquet export (a ``*.parquet`` path or glob, ``lmms-lab/MME``): columns ``question_id``
  (``"<subtask>/<image file>"``, shared by the image's two rows), ``image`` (struct ``{bytes, path}``),
  ``question``, ``answer``, ``category`` (the subtask).

Both give the same samples: images sorted by file stem within a subtask, questions in file/row order, ``image_id``
``"<subtask>/<stem>"`` (the bootstrap cluster) and ``sample_id`` ``"<subtask>/<stem>/<k>"`` (k = 1, 2). An image
that breaks the two-question invariant (count other than two, both answers equal, a malformed line) is kept as
error records — one per question, each naming its ``file:line`` (``file[row]`` for parquet).

Scoring: an answer parser (:mod:`tasks.yesno`; default ``mme_official``, MME's own first-4-characters rule) maps
the raw output to ``yes``/``no``/``None``. Per subtask: ``acc`` = correct questions / questions, ``acc_plus`` =
images with both questions correct / images, ``score = 100·acc + 100·acc_plus`` (0–200); Perception = Σ of the
perception subtask scores present (max 2000 with all ten), Cognition likewise (max 800), ``mme`` = P + C. Standard
errors come from a bootstrap over images, joint across subtasks (:mod:`core.stats`).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from core.stats import Outcomes, block_columns, safe_divide
from tasks.base import TASKS, DataError, Response, Sample, SampleError, Task
from tasks.media import (
    DataFileNotFoundError,
    ImageFile,
    MalformedImageCell,
    check_image_root,
    image_cell,
    resolve_files,
)
from tasks.yesno import PARSERS, all_verdicts, is_clean_yes_no

log = logging.getLogger(__name__)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
#: Canonical order (MME's tables; also the release's folder names and the parquet ``category`` values).
SUBTASKS = PERCEPTION + COGNITION
GROUPS = {"perception": PERCEPTION, "cognition": COGNITION}

DEFAULT_PROMPT_SUFFIX = "\nAnswer the question using a single word or phrase."
DEFAULT_GEN_KWARGS: dict[str, Any] = {"max_new_tokens": 16, "do_sample": False}
#: The instruction every MME question ends with (some release lines have two spaces before it).
_ORIGINAL_SUFFIX = re.compile(r"\s*Please answer yes or no\.?\s*$", re.IGNORECASE)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SPLIT_DIRS = ("images", "questions_answers_YN")
_RELEASE_DIR = "MME_Benchmark_release_version"
_LABELS = ("yes", "no")
_NO_FILTER = "none"
UNKNOWN_SUBTASK = "unknown"

#: Parser-dependent per-subtask metrics, in output order.
METRICS = ("acc", "acc_plus", "score", "unknown_rate")
#: Per-record count columns before the per-parser block: questions, images (one record per image), unclean.
_BASE_COLS = 3
#: Per-parser count columns: correct, unknown, image_both_correct (on the image's first record).
_PARSER_COLS = 3


# ----------------------------------------------------------------------------------------------- items


@dataclass
class _Question:
    """One question line (or parquet row) after validation (``error`` set when it is malformed)."""

    source: str
    question: str = ""
    answer: str = ""
    error: str | None = None

    @property
    def target(self) -> str:
        return self.answer.strip().lower()


@dataclass
class _ImageItem:
    """One image with its questions, as read from either format."""

    subtask: str
    stem: str
    source: str
    question_id: str = ""
    images: Callable[[], list[Image.Image]] | None = None
    questions: list[_Question] = field(default_factory=list)
    error: str | None = None

    @property
    def image_id(self) -> str:
        return f"{self.subtask}/{self.stem}"


@dataclass(frozen=True)
class _MissingImage:
    """Lazy loader of an image that is not there: raises :class:`SampleError` when called (picklable)."""

    name: str
    source: str

    def __call__(self) -> list[Image.Image]:
        raise SampleError(f"image not found: no image file {self.name}", self.source)


def _question(source: str, question: str, answer: str) -> _Question:
    """Validate one question and its answer (surrounding whitespace ignored, as LLaVA's converter does)."""
    question, answer = question.strip(), answer.strip()
    if not question:
        return _Question(source, answer=answer, error="malformed line: empty question")
    if answer.lower() not in _LABELS:
        return _Question(source, question, answer, error=f"malformed line: answer must be Yes or No, got {answer!r}")
    return _Question(source, question, answer)


def _parse_line(line: str, source: str) -> _Question:
    """``question<TAB>Yes|No`` → a question."""
    parts = line.strip().split("\t")
    if len(parts) != 2:
        return _Question(source, error=f"malformed line: expected 'question<TAB>Yes|No', got {line.strip()!r}")
    return _question(source, *parts)


def _pair_problem(item: _ImageItem, require_yes_and_no: bool) -> str | None:
    """Why an image breaks MME's invariant (two questions, one Yes and one No), or ``None``."""
    if item.error:
        return item.error
    bad = next((q for q in item.questions if q.error), None)
    if bad is not None:
        return f"pair invariant violated: the other question of {item.image_id} is malformed ({bad.source})"
    if len(item.questions) != 2:
        n = len(item.questions)
        return f"pair invariant violated: {item.image_id} has {n} question(s); MME asks exactly two per image"
    targets = sorted(q.target for q in item.questions)
    if require_yes_and_no and targets != ["no", "yes"]:
        answer = targets[0]
        return f"pair invariant violated: both questions of {item.image_id} answer {answer!r} (MME: one Yes, one No)"
    return None


# ----------------------------------------------------------------------------------------------- release folder


def release_root(path: Path) -> Path:
    """The folder holding the subtask folders: ``path`` itself or its ``MME_Benchmark_release_version/``.

    Raises:
        FileNotFoundError: When neither holds a subtask folder (:class:`tasks.media.DataFileNotFoundError`, with
            a hint: parquet files there, or a subtask folder one or two levels down).
    """
    for root in (path, path / _RELEASE_DIR):
        if any((root / s).is_dir() for s in SUBTASKS):
            return root
    hint = ""
    if any(path.glob("*.parquet")):
        hint = f"; it holds parquet files: task.data='{path}/*.parquet'"
    elif deeper := sorted({p.parent for depth in ("*/*/", "*/*/*/") for p in path.glob(depth) if p.name in SUBTASKS}):
        hint = f"; did you mean task.data={str(deeper[0])!r}?"
    raise DataFileNotFoundError(f"no MME subtask folder ({', '.join(SUBTASKS)}) in {str(path)!r}{hint}")


def subtask_layout(folder: Path) -> tuple[str, Path, Path]:
    """``(layout, image_dir, qa_dir)`` of one subtask folder: ``"split"`` or ``"flat"``.

    Raises:
        FileNotFoundError: When a split-layout folder lacks one of its two subfolders.
    """
    if not any((folder / d).is_dir() for d in _SPLIT_DIRS):
        return "flat", folder, folder
    missing = [d for d in _SPLIT_DIRS if not (folder / d).is_dir()]
    if missing:
        raise DataFileNotFoundError(
            f"{folder}: split layout without {missing[0]}/ (needs images/ + questions_answers_YN/)"
        )
    return "split", folder / "images", folder / "questions_answers_YN"


def _image_files(image_dir: Path) -> dict[str, Path]:
    """Image files of a folder by stem (the first one in name order when a stem has several)."""
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    out: dict[str, Path] = {}
    for p in files:
        out.setdefault(p.stem, p)
    return out


def _read_questions(txt: Path) -> tuple[list[_Question], str | None]:
    """Questions of one ``.txt`` (blank lines skipped, 1-based line numbers) and a whole-file problem."""
    try:
        text = txt.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        return [], f"unreadable question file: not UTF-8 ({exc.reason} at byte {exc.start})"
    lines = enumerate(text.splitlines(), start=1)
    questions = [_parse_line(line, f"{txt}:{n}") for n, line in lines if line.strip()]
    return questions, None if questions else "pair invariant violated: empty question file"


def _folder_items(root: Path, subtask: str, limit: int | None) -> Iterator[_ImageItem]:
    """The first ``limit`` images of one subtask folder (by stem), with their questions."""
    _, image_dir, qa_dir = subtask_layout(root / subtask)
    texts = sorted((p for p in qa_dir.glob("*.txt") if p.is_file()), key=lambda p: p.stem)
    images = _image_files(image_dir)
    for txt in texts[:limit]:
        item = _ImageItem(subtask=subtask, stem=txt.stem, source=str(txt))
        image = images.get(txt.stem)
        item.question_id = f"{subtask}/{image.relative_to(root / subtask).as_posix() if image else txt.stem}"
        if image is None:
            item.images = _MissingImage(f"{image_dir}/{txt.stem}.*", str(txt))
        else:
            item.images = ImageFile(str(image), str(txt))
        item.questions, item.error = _read_questions(txt)
        yield item


def folder_subtasks(root: Path) -> list[str]:
    """Subtasks with a folder holding at least one question file, in canonical order.

    Folders that are not MME subtasks (a renamed ``Code_Reasoning``) are skipped with a warning naming them, as
    their questions would silently be missing from the Perception / Cognition sums.
    """
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in SUBTASKS)
    if others:
        lower = {s.lower(): s for s in SUBTASKS}
        close = {o: lower[o.lower()] for o in others if o.lower() in lower}
        log.warning("MME release folder %s: skipping folders that are not MME subtasks: %s%s", root, others,
                    f" (renamed? {close})" if close else "")  # fmt: skip
    found = []
    for s in SUBTASKS:
        if (root / s).is_dir() and any(subtask_layout(root / s)[2].glob("*.txt")):
            found.append(s)
    return found


# ----------------------------------------------------------------------------------------------- parquet


def _row_subtask(row: dict[str, Any]) -> str:
    """A row's subtask: ``category``, else the ``question_id`` prefix, else :data:`UNKNOWN_SUBTASK`."""
    category, qid = row.get("category"), row.get("question_id")
    if isinstance(category, str) and category.strip():
        return category.strip()
    if isinstance(qid, str) and "/" in qid:
        return qid.split("/", 1)[0]
    return UNKNOWN_SUBTASK


def _row_question(row: dict[str, Any], source: str) -> _Question:
    """Validate the text fields of one parquet row."""
    missing = [k for k in ("question_id", "question", "answer") if not isinstance(row.get(k), str)]
    if missing:
        return _Question(source, error=f"malformed row: missing or non-string field(s) {', '.join(missing)}")
    return _question(source, row["question"], row["answer"])


def _parquet_items(files: list[Path]) -> dict[str, dict[str, _ImageItem]]:
    """Pass 1 (no image bytes): every row grouped by subtask and image stem, in row order."""
    import pyarrow.parquet as pq

    items: dict[str, dict[str, _ImageItem]] = {}
    for path in files:
        pf = pq.ParquetFile(path)
        columns = [c for c in ("question_id", "question", "answer", "category") if c in pf.schema_arrow.names]
        for i, row in enumerate(pf.read(columns=columns).to_pylist()):
            source = f"{path}[{i}]"
            subtask, qid = _row_subtask(row), row.get("question_id")
            stem = Path(qid).stem if isinstance(qid, str) and qid.strip() else f"row{i}@{path.name}"
            item = items.setdefault(subtask, {}).setdefault(stem, _ImageItem(subtask, stem, source, str(qid or "")))
            item.questions.append(_row_question(row, source))
    return items


def _attach_images(files: list[Path], wanted: dict[str, _ImageItem], image_root: str | None) -> None:
    """Pass 2: read the ``image`` column, in batches, only for the first row of each wanted image."""
    import pyarrow.parquet as pq

    cache: dict[bytes, bytes] = {}
    for path in files:
        pf = pq.ParquetFile(path)
        base = Path(image_root) if image_root else path.parent
        if "image" not in pf.schema_arrow.names:
            continue
        i = 0
        for batch in pf.iter_batches(batch_size=64, columns=["image"]):
            for cell in batch.column(0).to_pylist():
                item = wanted.get(f"{path}[{i}]")
                if item is not None:
                    try:
                        item.images, _ = image_cell(cell, item.source, base, cache)
                    except MalformedImageCell as exc:
                        item.error = f"malformed row: {exc}"
                i += 1


def load_parquet(
    files: list[Path], subtasks: list[str] | None, limit: int | None, image_root: str | None
) -> tuple[list[str], dict[str, list[_ImageItem]]]:
    """Subtasks found, and the first ``limit`` images (by stem) of each wanted subtask, with their images attached."""
    items = _parquet_items(files)
    found = [s for s in SUBTASKS if s in items]
    others = sorted(set(items) - set(SUBTASKS) - {UNKNOWN_SUBTASK})
    if others:
        log.warning("MME parquet: skipping rows of unknown categories %s", others)
    chosen = {s: [items[s][k] for k in sorted(items[s])][:limit] for s in (subtasks or found) if s in items}
    if UNKNOWN_SUBTASK in items:  # rows whose subtask cannot be told: kept as error records
        chosen[UNKNOWN_SUBTASK] = list(items[UNKNOWN_SUBTASK].values())
        for it in chosen[UNKNOWN_SUBTASK]:
            it.error = "malformed row: no 'category' and no '<subtask>/' prefix in 'question_id'"
    wanted = {it.source: it for its in chosen.values() for it in its}
    _attach_images(files, wanted, image_root)
    for it in wanted.values():
        if it.images is None and it.error is None:
            it.error = "malformed row: missing field 'image'"
    return found, chosen


# ----------------------------------------------------------------------------------------------- options


def resolve_subtasks(names: Sequence[str] | str | None) -> list[str] | None:
    """Requested subtasks in canonical order (``perception``/``cognition`` expand to their group); None = all.

    Raises:
        ValueError: For an unknown name, with a did-you-mean hint (case-insensitive).
    """
    if names is None or (not isinstance(names, str) and len(names) == 0):
        return None
    names = [names] if isinstance(names, str) else [str(n) for n in names]
    wanted: set[str] = set()
    lower = {s.lower(): s for s in (*SUBTASKS, *GROUPS)}
    for name in names:
        if name in GROUPS or name in SUBTASKS:
            wanted.update(GROUPS.get(name, (name,)))
            continue
        close = difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(lower[c]) for c in close)}?" if close else ""
        raise ValueError(f"unknown MME subtask {name!r}{hint} Known: {', '.join((*SUBTASKS, *GROUPS))}")
    return [s for s in SUBTASKS if s in wanted]


def build_prompt(question: str, suffix: str, strip_original: bool) -> str:
    """The user-turn text: the question (without " Please answer yes or no." if asked) plus ``suffix``."""
    text = question.strip()
    if strip_original:
        text = _ORIGINAL_SUFFIX.sub("", text).rstrip()
    return text + suffix


# ----------------------------------------------------------------------------------------------- metrics


def record_counts(records: list[dict[str, Any]], parsers: list[str]) -> np.ndarray:
    """Per-record additive counts ``[n_records, 3 + 3 * n_parsers]``.

    Columns: ``questions`` (1), ``images`` (1 on the first record of each ``image_id``), ``unclean``, then per
    parser ``correct``, ``unknown`` and ``image_both_correct`` (on the same first record: every question of the
    image correct, and the image has at least two scored questions — an image missing a question never counts).
    """
    n, n_p = len(records), len(parsers)
    parse_fns = [PARSERS.get(p) for p in parsers]
    counts = np.zeros((n, _BASE_COLS + _PARSER_COLS * n_p), dtype=np.float64)  # [n, K]
    correct = np.zeros((n, n_p), dtype=bool)  # [n, P]
    first: dict[str, int] = {}
    members: dict[str, list[int]] = {}
    for r, rec in enumerate(records):
        text, target = rec.get("raw_output") or "", str(rec["target"]).strip().lower()
        if target not in _LABELS:
            raise ValueError(f"record {rec.get('sample_id')!r}: target must be 'yes' or 'no', got {rec['target']!r}")
        image = str(rec["image_id"])
        first.setdefault(image, r)
        members.setdefault(image, []).append(r)
        preds = [parse(text, target) for parse in parse_fns]
        correct[r] = [p == target for p in preds]
        counts[r, 0], counts[r, 2] = 1.0, not is_clean_yes_no(text)
        counts[r, _BASE_COLS + 1 :: _PARSER_COLS] = [p is None for p in preds]
    counts[:, _BASE_COLS::_PARSER_COLS] = correct
    for image, rows in members.items():
        both = correct[rows].all(axis=0) & (len(rows) >= 2)  # [P]
        counts[first[image], 1] = 1.0
        counts[first[image], _BASE_COLS + 2 :: _PARSER_COLS] = both
    return counts


def mme_statistics(sums: np.ndarray, subtasks: list[str], n_parsers: int) -> np.ndarray:
    """Statistics from block totals of :func:`record_counts` (one block per subtask), in :func:`stat_names` order.

    Args:
        sums: ``[..., S * K]`` with ``K = 3 + 3 * n_parsers``.
        subtasks: The ``S`` subtask names of the blocks.
        n_parsers: Parsers per block.

    Returns:
        ``[..., M]``: per subtask ``(acc, acc_plus, score, unknown_rate)`` per parser then ``unclean_rate``; then
        Perception and Cognition score per parser (groups present only); then ``mme`` score per parser, pooled
        ``acc`` per parser and pooled ``unclean_rate``. Rates are NaN for an empty subtask (a bootstrap draw may
        miss all its images), which makes the group sums NaN for that draw.
    """
    lead, S, P = sums.shape[:-1], len(subtasks), n_parsers
    s = sums.reshape(*lead, S, _BASE_COLS + _PARSER_COLS * P)  # [..., S, K]
    q, img, unclean = s[..., 0], s[..., 1], s[..., 2]  # each [..., S]
    c = s[..., _BASE_COLS:].reshape(*lead, S, P, _PARSER_COLS)  # [..., S, P, 3]
    correct, unknown, both = c[..., 0], c[..., 1], c[..., 2]  # each [..., S, P]
    acc = safe_divide(correct, q[..., None], np.nan)  # [..., S, P]
    acc_plus = safe_divide(both, img[..., None], np.nan)  # [..., S, P]
    score = 100.0 * (acc + acc_plus)  # [..., S, P]
    unknown_rate = safe_divide(unknown, q[..., None], np.nan)  # [..., S, P]
    per = np.stack([acc, acc_plus, score, unknown_rate], axis=-1).reshape(*lead, S, 4 * P)  # [..., S, 4P], METRICS
    cols = [np.concatenate([per, safe_divide(unclean, q, np.nan)[..., None]], -1).reshape(*lead, S * (4 * P + 1))]
    members = []
    for group in GROUPS.values():
        idx = [i for i, name in enumerate(subtasks) if name in group]
        members += idx
        if idx:
            cols.append(score[..., idx, :].sum(axis=-2))  # [..., P]
    total = score[..., members, :].sum(axis=-2) if members else np.full((*lead, P), np.nan)
    pooled = safe_divide(correct.sum(axis=-2), q.sum(axis=-1)[..., None], np.nan)  # [..., P]
    unclean_all = safe_divide(unclean.sum(axis=-1), q.sum(axis=-1), np.nan)[..., None]  # [..., 1]
    return np.concatenate([*cols, total, pooled, unclean_all], axis=-1)


def stat_names(subtasks: list[str], parsers: list[str]) -> list[tuple[str, str]]:
    """``(row, "metric,filter")`` of every column of :func:`mme_statistics`."""
    names = []
    for s in subtasks:
        names += [(f"mme_{s}", f"{m},{p}") for p in parsers for m in METRICS]
        names.append((f"mme_{s}", f"unclean_rate,{_NO_FILTER}"))
    for group, members in GROUPS.items():
        if any(s in members for s in subtasks):
            names += [(f"mme_{group}", f"score,{p}") for p in parsers]
    names += [("mme", f"score,{p}") for p in parsers] + [("mme", f"acc,{p}") for p in parsers]
    return [*names, ("mme", f"unclean_rate,{_NO_FILTER}")]


# ----------------------------------------------------------------------------------------------- task


@TASKS.register("mme")
class MMETask(Task):
    """MME from the release folder (both layouts) or the Hugging Face parquet export.

    Args:
        data: The release folder (``MME_Benchmark_release_version/`` or its parent), or a parquet path or glob.
        subtasks: Subtasks to evaluate (``perception``/``cognition`` expand to their group); ``None`` or empty =
            every subtask found, in MME's canonical order.
        image_root: Directory parquet image paths are relative to when a row stores no bytes (default: the
            parquet's folder).
        prompt_suffix: Appended to each question (default: LLaVA-1.5's single-word instruction).
        strip_original_suffix: Remove the question's own " Please answer yes or no." first (LLaVA-1.5's
            ``llava_mme.jsonl`` and lmms-eval both do when they append their suffix).
        parser: Headline answer parser (a name in :data:`tasks.yesno.PARSERS`).
        extra_parsers: Further parsers whose metrics are also reported.
        require_yes_and_no: Also require one Yes and one No question per image (the release's design); false
            only checks the count, like the official tool.
        n_boot: Bootstrap draws for standard errors (0 disables them).
        strict: Raise :class:`SampleError` on the first malformed record instead of recording it.
        gen_kwargs: Generation settings merged over ``{"max_new_tokens": 16, "do_sample": False}`` (lmms-eval).
        limit: At most this many IMAGES per subtask (the first by stem), i.e. ``2 * limit`` questions: an
            image's two questions are never separated, so ``acc_plus`` stays defined.
    """

    name: ClassVar[str] = "mme"
    version: ClassVar[str] = "1.0"
    default_gen_kwargs: ClassVar[dict[str, Any]] = DEFAULT_GEN_KWARGS
    higher_is_better: ClassVar[dict[str, bool]] = {
        "acc": True,
        "acc_plus": True,
        "score": True,
        "unknown_rate": False,
        "unclean_rate": False,
    }

    def __init__(
        self,
        *,
        data: str,
        subtasks: Sequence[str] | str | None = None,
        image_root: str | None = None,
        prompt_suffix: str = DEFAULT_PROMPT_SUFFIX,
        strip_original_suffix: bool = True,
        parser: str = "mme_official",
        extra_parsers: Sequence[str] = (),
        require_yes_and_no: bool = True,
        n_boot: int = 1000,
        strict: bool = False,
        gen_kwargs: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(strict=strict, gen_kwargs=gen_kwargs, n_boot=n_boot, limit=limit)
        self.data = str(data)
        self.subtasks = resolve_subtasks(subtasks)
        self.image_root = None if image_root is None else str(image_root)
        self.prompt_suffix = prompt_suffix
        self.strip_original_suffix = bool(strip_original_suffix)
        self.parser = parser
        self.extra_parsers = [p for p in dict.fromkeys(extra_parsers) if p != parser]
        for name in (self.parser, *self.extra_parsers):
            PARSERS.get(name)  # fail early, with a did-you-mean message
        self.require_yes_and_no = bool(require_yes_and_no)
        self._samples: list[Sample] | None = None
        self._found: list[str] = []

    # ---- loading

    @property
    def is_parquet(self) -> bool:
        """Whether ``data`` names parquet file(s) (by suffix) rather than the release folder."""
        return self.data.lower().endswith(".parquet")

    def samples(self) -> list[Sample]:
        """All samples, subtask by subtask in canonical order, images by stem, questions in file order (cached)."""
        if self._samples is None:
            found, chosen = self._load_parquet() if self.is_parquet else self._load_folder()
            self._found = found
            self._samples = self._to_samples(chosen)
        return list(self._samples)

    def _wanted(self, found: list[str]) -> list[str]:
        missing = [s for s in self.subtasks or [] if s not in found]
        if missing:
            raise DataError(f"MME subtask(s) {missing} not found in {self.data!r}; subtasks present: {found}")
        return self.subtasks or found

    def _load_folder(self) -> tuple[list[str], dict[str, list[_ImageItem]]]:
        path = Path(self.data).expanduser()
        if not path.is_dir():
            raise DataFileNotFoundError(f"MME data {self.data!r} is neither a folder nor a *.parquet path/glob")
        root = release_root(path)
        found = folder_subtasks(root)
        return found, {s: list(_folder_items(root, s, self.limit)) for s in self._wanted(found)}

    def _load_parquet(self) -> tuple[list[str], dict[str, list[_ImageItem]]]:
        files = resolve_files(self.data, "MME parquet")
        check_image_root(self.image_root)
        found, chosen = load_parquet(files, self.subtasks, self.limit, self.image_root)
        self._wanted(found)
        return found, chosen

    def _to_samples(self, chosen: dict[str, list[_ImageItem]]) -> list[Sample]:
        samples: list[Sample] = []
        for items in chosen.values():
            for item in items:
                problem = _pair_problem(item, self.require_yes_and_no)
                for k, q in enumerate(item.questions or [_Question(item.source)], start=1):
                    error = q.error or problem
                    if error is not None and self.strict:
                        raise SampleError(error, q.source)
                    samples.append(self._sample(item, q, f"{item.image_id}/{k}", error, len(samples)))
        return samples

    def _sample(self, item: _ImageItem, q: _Question, sample_id: str, error: str | None, index: int) -> Sample:
        doc = {"question_id": item.question_id, "question": q.question, "answer": q.answer, "category": item.subtask}
        return Sample(
            sample_id=sample_id,
            split=item.subtask,
            index=index,
            image_id=item.image_id,
            text=build_prompt(q.question, self.prompt_suffix, self.strip_original_suffix) if q.question else "",
            target=q.target if q.target in _LABELS else "",
            source=q.source,
            images=item.images if error is None else None,
            doc=doc,
            error=error,
        )

    # ---- scoring

    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        """``parsed`` (headline parser), ``correct``, ``clean`` (a bare yes/no) and every parser's ``verdicts``."""
        text = response.raw_output or ""
        verdicts = all_verdicts(text, sample.target)
        parsed = verdicts[self.parser]
        return {
            "parsed": parsed,
            "correct": parsed == sample.target,
            "clean": is_clean_yes_no(text),
            "verdicts": verdicts,
        }

    def outcomes(self, records: list[dict[str, Any]], splits: list[str] | None = None) -> Outcomes:
        """Counts per subtask block and the MME statistics (see :func:`mme_statistics`); ``binary`` = correct.

        A subtask in ``splits`` without a successful record has NaN scores, and so have its group's and the total.
        """
        parsers = [self.parser, *self.extra_parsers]
        present = dict.fromkeys([*(splits or []), *(str(r["split"]) for r in records)])
        subtasks = [s for s in SUBTASKS if s in present] + [s for s in present if s not in SUBTASKS]
        index = np.array([subtasks.index(str(r["split"])) for r in records], dtype=np.int64)  # [n_records]
        counts = record_counts(records, parsers)  # [n_records, K]
        per_subtask = np.bincount(index, minlength=len(subtasks))
        sizes = {f"mme_{s}": int(n) for s, n in zip(subtasks, per_subtask, strict=True)}
        for group, members in GROUPS.items():
            if any(s in members for s in subtasks):
                sizes[f"mme_{group}"] = int(sum(sizes[f"mme_{s}"] for s in subtasks if s in members))
        sizes["mme"] = len(records)
        return Outcomes(
            counts=block_columns(counts, index, len(subtasks)),  # [n_records, S * K]
            stat_fn=lambda sums: mme_statistics(sums, subtasks, len(parsers)),
            names=stat_names(subtasks, parsers),
            sizes=sizes,
            binary=counts[:, _BASE_COLS].copy(),
            binary_name=f"correct,{self.parser}",
        )

    @property
    def headline(self) -> tuple[str, str]:
        """The total score (sum of the evaluated subtasks' acc + acc+, each 0-200) under the headline parser."""
        return "mme", f"score,{self.parser}"

    def describe(self) -> dict[str, Any]:
        """Task metadata, including the data settings and, once loaded, the questions per subtask."""
        info = super().describe()
        info.update(
            data=self.data,
            format="parquet" if self.is_parquet else "release_folder",
            subtasks=self.subtasks,
            image_root=self.image_root,
            prompt_suffix=self.prompt_suffix,
            strip_original_suffix=self.strip_original_suffix,
            parser=self.parser,
            extra_parsers=self.extra_parsers,
            require_yes_and_no=self.require_yes_and_no,
            limit=self.limit,
            limit_unit="images per subtask",
        )
        if self._samples is not None:
            info["subtasks_found"] = self._found
            info["subtask_sizes"] = {
                s: sum(x.split == s for x in self._samples) for s in dict.fromkeys(x.split for x in self._samples)
            }
        return info
