"""VQA-Causal / VCR-Causal: does the model prefer a causal sentence over its order-reversed version?

Weng et al., 2025, "Do Vision-Language Models Have Internal World Models? / Causal order probes" (arXiv
2506.00869; data and scoring: repository ``limenlp/CausalVLM``). Each item pairs an image with a correct causal
sentence ("The cow is laying down is due to it's tired.") and the same clauses in reversed order ("It's tired is
due to the cow is laying down."); recognising the objects cannot separate them, only the causal direction can.

Scoring (generative models, as the repository scores LLaVA-1.5): for each sentence the model is asked

    ``<image>`` + ``"{sentence} Given such an image, considering the above sentence, does it reflect the proper
    causal relationship in the image?"``

and the probabilities of ``"Yes"`` and ``"No"`` as the FIRST generated token are read (full-vocabulary softmax;
:meth:`tasks.base.ModelCalls.answer_logprobs`). With ``y, n`` for the sentence and ``y', n'`` for the reversed
one, the item is right when

    ``(y > n and y > y')  or  (y < n and n < n')``

— the model affirms the correct sentence more than the reversed one, or denies it less. Chance is 50%. No text
is generated and no answer parser is involved.

Files (CSV, read with the standard ``csv`` module):

* VQA-Causal ``vqa_causal.csv``: ``image_id,sentence,reverse_sentence``; ``image_id`` is a COCO val2014 id, the
  image ``COCO_val2014_<12-digit id>.jpg`` under ``image_root``;
* VCR-Causal ``vcr_causal.csv``: ``movie,image_id,sentence,reverse_sentence``; ``image_id`` is the frame's path
  relative to ``image_root`` (the VCR images folder).

A header row is recognised by its ``sentence`` column; without one the columns are taken in the orders above
(three columns: VQA-Causal, four: VCR-Causal). ``image_pattern`` (default chosen by the format) turns an id into a
file name. ``connective`` reproduces the paper's sweep: every ``"is due to"`` / ``"is caused by"`` in both
sentences is replaced by the given phrase (``"because"``, ``"results in"``, ...), as the repository does.

Metrics (fractions): ``acc`` (the rule above), ``affirm_rate`` (share of correct sentences with ``y > n``) and
``affirm_rate_reverse`` (the same for reversed sentences) — a model that says yes to everything has both near 1.
Standard errors: bootstrap over images (several sentences may share one image).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from core.stats import Outcomes, safe_divide
from tasks.base import TASKS, DataError, ModelCalls, Request, Response, Sample, SampleError, Task
from tasks.media import ImageFile, check_image_root, data_file

DEFAULT_PROMPT = (
    "{sentence} Given such an image, considering the above sentence, does it reflect the proper causal "
    "relationship in the image?"
)
VQA_PATTERN = "COCO_val2014_{image_id:012d}.jpg"
VCR_PATTERN = "{image_id}"
ORIGINAL_CONNECTIVES = ("is due to", "is caused by")
VQA_COLUMNS = ("image_id", "sentence", "reverse_sentence")
VCR_COLUMNS = ("movie", "image_id", "sentence", "reverse_sentence")
SIDES = ("sentence", "reverse")


def read_rows(path: Path) -> tuple[list[tuple[str, dict[str, str] | None, str | None]], bool]:
    """``(source, row, error)`` per data row of a VQA-/VCR-Causal CSV, and whether it is the VCR format."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        table = list(csv.reader(f))
    if not table:
        raise SampleError("empty file", str(path))
    header = [c.strip() for c in table[0]]
    has_header = "sentence" in header
    columns = header if has_header else list(VQA_COLUMNS if len(header) == 3 else VCR_COLUMNS)
    missing = [c for c in VQA_COLUMNS if c not in columns]
    if missing:
        raise SampleError(f"columns {missing} missing (have {columns})", str(path))
    out = []
    for lineno, cells in enumerate(table[1:] if has_header else table, start=2 if has_header else 1):
        source = f"{path}:{lineno}"
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(columns):
            out.append((source, None, f"expected {len(columns)} columns, got {len(cells)}"))
            continue
        row = dict(zip(columns, (c.strip() for c in cells), strict=True))
        empty = [c for c in VQA_COLUMNS if not row[c]]
        out.append((source, row, f"empty field(s) {empty}" if empty else None))
    return out, "movie" in columns


_MISFIT = "image_id"  # how a row whose id the image pattern cannot format starts its error


def image_name(pattern: str, image_id: str) -> str:
    """File name of an image id: integer formatting when the id is all digits (COCO), else the id as given."""
    return pattern.format(image_id=int(image_id) if image_id.isdigit() else image_id)


def is_right(y: float, n: float, y_rev: float, n_rev: float) -> bool:
    """The repository's rule: affirm the correct sentence more, or deny it less, than the reversed one."""
    return (y > n and y > y_rev) or (y < n and n < n_rev)


@TASKS.register("causal_pairs")
class CausalPairsTask(Task):
    """VQA-Causal / VCR-Causal scored by first-token Yes/No probabilities of each sentence and its reversal.

    Args:
        data: The CSV file.
        image_root: Directory image names are relative to.
        image_pattern: Image file name from ``{image_id}``; ``None`` picks VQA-Causal's COCO pattern or, for the
            VCR format, the id itself.
        connective: Replace the original connectives ("is due to", "is caused by") in both sentences with this
            phrase (``None``: keep the sentences as written).
        prompt: User text with a ``{sentence}`` field (the image comes first, as in the repository's prompt).
        answers: The affirmative and the negative answer whose first tokens are scored.
        n_boot: Bootstrap draws for standard errors.
        strict: Raise on the first malformed row instead of recording it.
        gen_kwargs: Unused (nothing is generated); accepted for a uniform config.
        limit: At most this many rows (the first ones).
    """

    name: ClassVar[str] = "causal_pairs"
    version: ClassVar[str] = "1.0"
    higher_is_better: ClassVar[dict[str, bool]] = {"acc": True, "affirm_rate": True, "affirm_rate_reverse": False}

    def __init__(
        self,
        *,
        data: str,
        image_root: str | None = None,
        image_pattern: str | None = None,
        connective: str | None = None,
        prompt: str = DEFAULT_PROMPT,
        answers: Sequence[str] = ("Yes", "No"),
        n_boot: int = 1000,
        strict: bool = False,
        gen_kwargs: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(strict=strict, gen_kwargs=gen_kwargs, n_boot=n_boot, limit=limit)
        if "{sentence}" not in prompt:
            raise ValueError("prompt must contain a {sentence} field")
        if len(answers) != 2 or answers[0] == answers[1]:
            raise ValueError(f"answers must be two different words (affirmative, negative), got {list(answers)}")
        self.data, self.image_root, self.image_pattern = str(data), image_root, image_pattern
        self.connective, self.prompt, self.answers = connective, prompt, [str(a) for a in answers]
        self._samples: list[Sample] | None = None

    def _sentence(self, text: str) -> str:
        if self.connective is None:
            return text
        for original in ORIGINAL_CONNECTIVES:
            text = text.replace(original, self.connective)
        return text

    def samples(self) -> list[Sample]:
        """One sample per CSV row, in file order (cached)."""
        if self._samples is None:
            path = data_file(self.data, "causal pairs")
            check_image_root(self.image_root)
            rows, is_vcr = read_rows(path)
            pattern = self.image_pattern or (VCR_PATTERN if is_vcr else VQA_PATTERN)
            self._samples = [self._sample(i, *row, pattern) for i, row in enumerate(rows[: self.limit])]
            misfits = [s.error for s in self._samples if s.error and s.error.startswith(_MISFIT)]
            if misfits and len(misfits) == len(self._samples):  # the pattern fits no row: one line, no model load
                raise DataError(f"{path}: no row fits; e.g. {misfits[0]}")
        return list(self._samples)

    def _sample(self, i: int, source: str, row: dict[str, str] | None, error: str | None, pattern: str) -> Sample:
        if error is not None and self.strict:
            raise SampleError(error, source)
        row = row or {}
        doc = {**row, "sentence_scored": self._sentence(row.get("sentence", "")),
               "reverse_scored": self._sentence(row.get("reverse_sentence", ""))}  # fmt: skip
        images = None
        if error is None:
            try:
                name = image_name(pattern, row["image_id"])
            except (ValueError, KeyError, IndexError) as exc:  # an id the pattern cannot format (e.g. a file name)
                error = (f"{_MISFIT} {row['image_id']!r} does not fit task.image_pattern={pattern!r} ({exc}); ids "
                         "that are file names need task.image_pattern=null")  # fmt: skip
                if self.strict:
                    raise SampleError(error, source) from exc
        if error is None:
            images = ImageFile(str(Path(self.image_root) / name) if self.image_root else name, source)
        return Sample(
            sample_id=str(i),
            split=self.name,
            index=i,
            image_id=row.get("image_id", source),
            text=self.prompt.format(sentence=doc["sentence_scored"]),
            target="sentence",
            source=source,
            images=images,
            doc=doc,
            error=error,
        )

    def respond(self, batch: Sequence[tuple[Sample, list[Image.Image]]], model: ModelCalls) -> list[Response]:
        """Two scoring calls per sample (the sentence, then the reversed sentence), batched together."""
        requests = []
        for sample, images in batch:
            for key in ("sentence_scored", "reverse_scored"):
                requests.append(Request(self.prompt.format(sentence=sample.doc[key]), images))
        scored = model.answer_logprobs(requests, self.answers)
        out = []
        for k in range(len(batch)):
            pair = scored[2 * k : 2 * k + 2]
            out.append(
                Response(
                    raw_output=None,
                    prompt=pair[0].prompt,
                    fields={
                        "prompt_reverse": pair[1].prompt,
                        "logprobs": {side: s.logprobs for side, s in zip(SIDES, pair, strict=True)},
                    },
                )
            )
        return out

    def _judge(self, logprobs: dict[str, dict[str, float]]) -> tuple[bool, bool, bool]:
        """(right, affirms the sentence, affirms the reversed sentence) from stored log-probabilities."""
        yes, no = self.answers
        s, r = logprobs["sentence"], logprobs["reverse"]
        return is_right(s[yes], s[no], r[yes], r[no]), s[yes] > s[no], r[yes] > r[no]

    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        """``correct`` by the repository's rule; ``parsed`` = the sentence the model prefers."""
        right, affirm, affirm_rev = self._judge(response.fields["logprobs"])
        return {
            "parsed": "sentence" if right else "reverse",
            "correct": right,
            "affirms_sentence": affirm,
            "affirms_reverse": affirm_rev,
        }

    def outcomes(self, records: list[dict[str, Any]], splits: list[str] | None = None) -> Outcomes:
        """Counts ``[n, right, affirm, affirm_reverse]`` per record, recomputed from the stored log-probabilities."""
        counts = np.array([[1.0, *self._judge(r["logprobs"])] for r in records], dtype=np.float64)  # [n, 4]
        return Outcomes(
            counts=counts,
            stat_fn=lambda s: safe_divide(s[..., 1:4], s[..., 0:1], np.nan),  # [..., 3]
            names=[(self.name, "acc,none"), (self.name, "affirm_rate,none"), (self.name, "affirm_rate_reverse,none")],
            sizes={self.name: len(records)},
            binary=counts[:, 1],
            binary_name="correct,none",
        )

    @property
    def headline(self) -> tuple[str, str]:
        """Pair accuracy (the sentence affirmed above its reverse)."""
        return self.name, "acc,none"

    def describe(self) -> dict[str, Any]:
        """Task metadata: data settings and the scored answers."""
        return {
            **super().describe(),
            "data": self.data,
            "image_root": self.image_root,
            "image_pattern": self.image_pattern,
            "connective": self.connective,
            "prompt": self.prompt,
            "answers": self.answers,
            "limit": self.limit,
        }
