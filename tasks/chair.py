"""CHAIR, Caption Hallucination Assessment with Image Relevance (Rohrbach, Hendricks et al., EMNLP 2018).

Paper: "Object Hallucination in Image Captioning". The model describes an image; every object word of the
description is mapped to one of the benchmark's object categories (its *node word*) and counted as hallucinated
when the category is not in the image's ground-truth object set.

Vocabulary pipeline (a caption -> its object mentions), as in CHAIR's ``caption_to_words``:

1. lowercase, split into sentences after ``.``/``!``/``?`` followed by white space, tokenize each sentence with
   NLTK's data-free Treebank tokenizer (:class:`nltk.tokenize.destructive.NLTKWordTokenizer`, the tokenizer
   behind ``nltk.word_tokenize``; the regex sentence split stands in for the punkt model, which needs a download);
2. singularise every token with lemminflect's noun lemma tables (``getLemma(word, upos="NOUN")``, first lemma;
   the tables ship inside the package, nothing is downloaded);
3. merge adjacent pairs listed in COCO's fixed double-word list and apply CHAIR's rewrites ("baby"/"adult" +
   animal -> animal, "passenger jet/train" -> jet/train, "bow tie" -> tie, "toilet seat" -> toilet,
   "wine glas" -> wine glass; "home plate" and "train track" stay themselves and, not being vocabulary entries,
   are dropped); when both "toilet" and "seat" occur, no "seat" is a mention;
4. the remaining tokens that are entries of the synonym table are the mentions; each maps to its line's head
   (the node word). A later line wins for an entry listed twice, as in CHAIR.

The double-word list and rewrites are COCO-specific; with another vocabulary (the shapes-world table) they simply
never fire. A multi-word synonym only matches when it is in that list.

Lemmatiser vs. the originals (checked with lemminflect 0.2.3): the original CHAIR used ``pattern.en.singularize``,
Maxlinn's port (OPERA, CCA-LLaVA) NLTK POS tagging + WordNet lemmatisation. lemminflect gives glasses -> glass,
skis -> ski, buses/busses -> bus, knives -> knife, mice -> mouse, teeth -> tooth; it keeps people, sheep, scissors,
cattle, oxen, luggage, bus, glass unchanged (all still map to the right node word). Unlike the POS-tagged WordNet
port it lemmatises every token as a noun, so verb forms are not reduced ("skiing", "skateboarding" stay and are
no mention; Maxlinn's port turns them into "ski" -> skis and "skateboard"); like that port and unlike pattern it
never makes "glas" (so "wine glasses" merges directly). ``inflect.singular_noun`` was rejected: it maps the
singular "bus" to "bu" and "this" to "thi".

Ground truth of an image: the union of its instance categories (category name -> node word) and the node words
found by the same pipeline in its reference captions. Metrics (fractions, micro-averaged): ``chair_s`` = captions
with at least one hallucinated mention / captions; ``chair_i`` = hallucinated mentions / mentions (a repeated
word counts each time); ``recall`` = sum over captions of |correct node words| / sum of |ground-truth set|;
``len`` = tokens per caption after double-word merging (punctuation included; Maxlinn stores it x0.01).
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from core.results import package_version
from core.stats import Outcomes, safe_divide
from tasks.base import TASKS, DataError, Response, Sample, SampleError, Task
from tasks.media import ImageFile, check_image_root, resolve_files

DEFAULT_PROMPT = "Please describe this image in detail."
DEFAULT_GEN_KWARGS: dict[str, Any] = {"max_new_tokens": 512, "do_sample": False}
#: The 80-line COCO synonym table of CHAIR, shipped with the package.
COCO_SYNONYMS = Path(__file__).resolve().parent / "data" / "coco_synonyms.txt"
SPLIT = "chair"
FILTER = "none"
METRICS = ("chair_s", "chair_i", "recall", "len")
#: Additive per-record counts of :meth:`CHAIRTask.outcomes`, in column order.
COUNT_COLUMNS = (
    "captions",
    "has_hallucination",
    "mentions",
    "hallucinated_mentions",
    "correct_node_words",
    "gt_size",
    "words",
)

#: CHAIR's fixed list of COCO "double words" (duplicates as in the original), merged into one token.
COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "hot dog", "teddy bear", "home plate",
    "train track",
)  # fmt: skip
#: "baby X" / "adult X" -> X for these, so the qualifier does not fire *person*.
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
#: "passenger X" -> X for these, so the qualifier does not fire *person*.
VEHICLE_WORDS = ("jet", "train")

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
_TERMINAL = re.compile(r"[.!?][\"')\]\u201d\u2019]*(?=\s|$)")


def coco_double_word_map() -> dict[str, str]:
    """CHAIR's pair rewrites: ``"<w1> <w2>"`` -> the token that replaces the pair."""
    table = {pair: pair for pair in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return table


# ----------------------------------------------------------------------------------------------- text pipeline


@functools.cache
def _word_tokenizer() -> Any:
    from nltk.tokenize.destructive import NLTKWordTokenizer  # imported lazily: nltk pulls in scipy (about 1 s)

    return NLTKWordTokenizer()


def tokenize(text: str) -> list[str]:
    """Lowercased word tokens: regex sentence split, then NLTK's Treebank tokenizer per sentence."""
    tokenizer = _word_tokenizer()
    return [tok for sent in _SENTENCE_BREAK.split(text.lower()) if sent for tok in tokenizer.tokenize(sent)]


@functools.lru_cache(maxsize=1 << 16)
def singularize(word: str) -> str:
    """The noun lemma of ``word`` from lemminflect's tables (the word itself when it has none)."""
    from lemminflect import getLemma

    lemmas = getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


def merge_double_words(words: Sequence[str], table: dict[str, str]) -> list[str]:
    """Replace adjacent pairs found in ``table`` by their rewrite, scanning left to right without overlap."""
    out: list[str] = []
    i = 0
    while i < len(words):
        pair = f"{words[i]} {words[i + 1]}" if i + 1 < len(words) else None
        if pair in table:
            out.append(table[pair])
            i += 2
        else:
            out.append(words[i])
            i += 1
    return out


def drop_incomplete_sentence(text: str) -> str:
    """Drop a final sentence without terminal punctuation (OPERA issue #30, for truncated short captions).

    The text is cut after the last ``.``/``!``/``?`` (with any closing quotes or brackets) that ends a sentence;
    a text without such a sentence end becomes empty.
    """
    body = text.rstrip()
    ends = [m.end() for m in _TERMINAL.finditer(body)]
    return body[: ends[-1]] if ends else ""


# ----------------------------------------------------------------------------------------------- vocabulary


def read_synonyms(path: str | Path) -> dict[str, str]:
    """Synonym table ``{entry: node word}`` from a CHAIR synonyms file.

    Each non-empty line not starting with ``#`` is split on ``", "`` exactly as CHAIR does (so an entry after a
    double space keeps its leading space and never matches); its first entry is the node word.

    Raises:
        ValueError: When a line has an empty node word or the file has no line; the message names the file.
    """
    table: dict[str, str] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entries = line.split(", ")
        if not entries[0]:
            raise DataError(f"{path}:{lineno}: synonym line has an empty node word: {line!r}")
        table.update(dict.fromkeys(entries, entries[0]))
    if not table:
        raise DataError(f"{path}: synonym table is empty")
    return table


@dataclass(frozen=True)
class Mentions:
    """The object mentions of one caption.

    Attributes:
        tokens: Tokens after singularisation and double-word merging (``len(tokens)`` is the caption's length).
        words: Vocabulary entries mentioned, in order, with repeats.
        node_words: The node word of each entry of ``words``.
        indices: Position of each mention in ``tokens``.
    """

    tokens: tuple[str, ...]
    words: tuple[str, ...]
    node_words: tuple[str, ...]
    indices: tuple[int, ...]


class Vocabulary:
    """CHAIR's word -> node-word pipeline for one synonym table.

    Args:
        synonyms: ``{entry: node word}`` (see :func:`read_synonyms`).
        double_words: Pair rewrites (default: :func:`coco_double_word_map`).
    """

    def __init__(self, synonyms: dict[str, str], double_words: dict[str, str] | None = None) -> None:
        self.synonyms = dict(synonyms)
        self.double_words = coco_double_word_map() if double_words is None else dict(double_words)

    @classmethod
    def from_file(cls, path: str | Path | None = None) -> Vocabulary:
        """The vocabulary of a synonyms file (default: the shipped COCO table)."""
        return cls(read_synonyms(COCO_SYNONYMS if path is None else path))

    def parse(self, caption: str) -> Mentions:
        """Tokenize, singularise, merge double words, and find the vocabulary mentions of ``caption``."""
        tokens = merge_double_words([singularize(t) for t in tokenize(caption)], self.double_words)
        skip_seat = "toilet" in tokens and "seat" in tokens  # "the seat of the toilet" is no chair
        hits = [(i, t) for i, t in enumerate(tokens) if t in self.synonyms and not (skip_seat and t == "seat")]
        return Mentions(
            tokens=tuple(tokens),
            words=tuple(t for _, t in hits),
            node_words=tuple(self.synonyms[t] for _, t in hits),
            indices=tuple(i for i, _ in hits),
        )

    def node_words(self, caption: str) -> set[str]:
        """The set of node words mentioned in ``caption``."""
        return set(self.parse(caption).node_words)


# ----------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class CaptionEval:
    """One caption scored against an image's ground-truth node words.

    Attributes:
        caption: The text that was parsed.
        mentions: Its object mentions.
        hallucinated: ``(word, node word)`` of every mention whose node word is not in the ground truth.
        hallucination_idxs: Token positions of those mentions.
        correct: Distinct node words mentioned that are in the ground truth, sorted.
        gt_size: Size of the ground-truth set.
    """

    caption: str
    mentions: Mentions
    hallucinated: tuple[tuple[str, str], ...]
    hallucination_idxs: tuple[int, ...]
    correct: tuple[str, ...]
    gt_size: int

    def counts(self) -> list[float]:
        """The additive counts of :data:`COUNT_COLUMNS`."""
        return [
            1.0,
            float(bool(self.hallucinated)),
            float(len(self.mentions.words)),
            float(len(self.hallucinated)),
            float(len(self.correct)),
            float(self.gt_size),
            float(len(self.mentions.tokens)),
        ]

    def fields(self) -> dict[str, Any]:
        """Per-record fields (JSON-serialisable)."""
        return {
            "parsed": self.caption,
            "mentions": list(self.mentions.words),
            "node_words": list(self.mentions.node_words),
            "mention_idxs": list(self.mentions.indices),
            "hallucinated": [list(pair) for pair in self.hallucinated],
            "hallucination_idxs": list(self.hallucination_idxs),
            "correct_objects": list(self.correct),
            "has_hallucination": bool(self.hallucinated),
            "n_words": len(self.mentions.tokens),
        }


def evaluate_caption(vocab: Vocabulary, caption: str, gt: Iterable[str]) -> CaptionEval:
    """Score one caption against the ground-truth node words ``gt``."""
    gt = set(gt)
    m = vocab.parse(caption)
    bad = [(w, n, i) for w, n, i in zip(m.words, m.node_words, m.indices, strict=True) if n not in gt]
    return CaptionEval(
        caption=caption,
        mentions=m,
        hallucinated=tuple((w, n) for w, n, _ in bad),
        hallucination_idxs=tuple(i for _, _, i in bad),
        correct=tuple(sorted(set(m.node_words) & gt)),
        gt_size=len(gt),
    )


def chair_statistics(sums: np.ndarray) -> np.ndarray:
    """CHAIR metrics from summed counts.

    Args:
        sums: Column totals of :data:`COUNT_COLUMNS`, shape ``[..., 7]``.

    Returns:
        ``[..., 4]``: chair_s, chair_i, recall, len (NaN where the denominator is 0).
    """
    captions, hall, mentions, hall_mentions, correct, gt_size, words = np.moveaxis(sums, -1, 0)  # each [...]
    return np.stack(
        [
            safe_divide(hall, captions, np.nan),
            safe_divide(hall_mentions, mentions, np.nan),
            safe_divide(correct, gt_size, np.nan),
            safe_divide(words, captions, np.nan),
        ],
        axis=-1,
    )


# ----------------------------------------------------------------------------------------------- COCO files


def _load_json(path: Path, keys: Sequence[str]) -> dict[str, Any]:
    """A COCO annotation file, checked to be an object whose ``keys`` are lists."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO annotation object, got {type(data).__name__}")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing list {key!r} (not a COCO {'/'.join(keys)} file?)")
    return data


def _int_field(entry: Any, key: str, where: str) -> int:
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: field {key!r} must be an integer, got {value!r}")
    return value


@dataclass
class CocoInstances:
    """The parts of COCO instance files CHAIR needs.

    Attributes:
        files: ``{image_id: (file_name, "<file>#images[i]")}``.
        objects: ``{image_id: node words of its instance categories}``.
    """

    files: dict[int, tuple[str, str]] = field(default_factory=dict)
    objects: dict[int, set[str]] = field(default_factory=dict)


def load_instances(paths: Sequence[Path], vocab: Vocabulary, synonyms_name: str) -> CocoInstances:
    """Merge instance files: image file names and per-image node words of the annotated categories.

    Raises:
        ValueError: Malformed file, conflicting image/category entries, or a category missing from the synonym
            table; the message names the file.
    """
    out = CocoInstances()
    for path in paths:
        data = _load_json(path, ("images", "annotations", "categories"))
        nodes = _category_nodes(data["categories"], path, vocab, synonyms_name)
        _add_images(data["images"], path, out.files)
        for i, ann in enumerate(data["annotations"]):
            where = f"{path}: annotations[{i}]"
            image_id, cat = _int_field(ann, "image_id", where), _int_field(ann, "category_id", where)
            if cat not in nodes:
                raise DataError(f"{where}: category_id {cat} is not in the file's categories")
            out.objects.setdefault(image_id, set()).add(nodes[cat])
    return out


def _category_nodes(categories: list[Any], path: Path, vocab: Vocabulary, synonyms_name: str) -> dict[int, str]:
    nodes: dict[int, str] = {}
    for i, cat in enumerate(categories):
        cid = _int_field(cat, "id", f"{path}: categories[{i}]")
        name = cat.get("name")
        if name not in vocab.synonyms:
            raise DataError(f"{path}: category {name!r} (id {cid}) is not in the synonym table {synonyms_name}")
        nodes[cid] = vocab.synonyms[name]
    return nodes


def _add_images(images: list[Any], path: Path, files: dict[int, tuple[str, str]]) -> None:
    for i, img in enumerate(images):
        where = f"{path}#images[{i}]"
        image_id = _int_field(img, "id", where)
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: field 'file_name' must be a non-empty string, got {name!r}")
        if image_id in files and files[image_id][0] != name:
            raise DataError(f"{where}: image id {image_id} has file {name!r} but {files[image_id][0]!r} elsewhere")
        files.setdefault(image_id, (name, where))


def load_captions(paths: Sequence[Path], keep: set[int]) -> dict[int, list[str]]:
    """Reference captions ``{image_id: [caption, ...]}`` of the images in ``keep`` from COCO caption files."""
    out: dict[int, list[str]] = {}
    for path in paths:
        for i, ann in enumerate(_load_json(path, ("annotations",))["annotations"]):
            where = f"{path}: annotations[{i}]"
            image_id = _int_field(ann, "image_id", where)
            if image_id not in keep:
                continue
            caption = ann.get("caption")
            if not isinstance(caption, str):
                raise DataError(f"{where}: field 'caption' must be a string, got {caption!r}")
            out.setdefault(image_id, []).append(caption)
    return out


# ----------------------------------------------------------------------------------------------- image subset


def _parse_id(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"{where}: image id must be a non-negative integer, got {value!r}")
    return value


def _id_entries(path: Path) -> Iterator[tuple[Any, str]]:
    """Raw ``(value, source)`` of an ids file: a JSON array, JSON Lines with ``image_id``, or one id per line."""
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON: {exc}") from exc
        yield from ((row, f"{path}[{i}]") for i, row in enumerate(rows))
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            yield line, f"{path}:{lineno}"
            continue
        try:
            yield json.loads(line), f"{path}:{lineno}"
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from exc


def read_image_ids(path: str | Path) -> list[tuple[int, str]]:
    """``(image_id, source)`` in file order from a frozen image list.

    Accepts plain text (one integer per line; blank and ``#`` lines skipped), JSON Lines with an ``image_id`` key
    (CCA-LLaVA's ``coco_chair.jsonl``) or a JSON array of integers or such objects.

    Raises:
        ValueError: A malformed or duplicate id, or no id at all; the message names the file and line.
    """
    path = Path(path)
    out: list[tuple[int, str]] = []
    first: dict[int, str] = {}
    for value, where in _id_entries(path):
        if isinstance(value, dict):
            if "image_id" not in value:
                raise DataError(f"{where}: record has no 'image_id' key")
            value = value["image_id"]
        image_id = _parse_id(value, where)
        if image_id in first:
            raise DataError(f"{where}: duplicate image id {image_id} (first at {first[image_id]})")
        first[image_id] = where
        out.append((image_id, where))
    if not out:
        raise DataError(f"{path}: no image ids")
    return out


def sample_image_ids(population: Iterable[int], n: int, seed: int) -> list[int]:
    """``n`` ids drawn without replacement: ``random.Random(seed).sample(sorted(set(population)), n)``, sorted."""
    ids = sorted(set(population))
    if not 0 < n <= len(ids):
        raise DataError(f"n_images must be in [1, {len(ids)}] (annotated images), got {n}")
    return sorted(random.Random(seed).sample(ids, n))


# ----------------------------------------------------------------------------------------------- task


@TASKS.register("chair")
class CHAIRTask(Task):
    """CHAIR on COCO-format annotations (COCO 2014 or the shapes-world export).

    Args:
        instances: Path or glob (or a list of them) of COCO instance files; merged (e.g. train + val 2014).
        captions: Path or glob (or a list) of COCO caption files (reference captions); merged.
        image_root: Directory the images' ``file_name`` is relative to (``None``: as given).
        synonyms: CHAIR synonym table (default: the shipped 80-line COCO table, ``tasks/data``).
        image_ids_file: Frozen image list (text, one id per line; JSON Lines with ``image_id``; JSON array).
        n_images: Instead of a list, draw this many ids from the instance files' images with ``seed``
            (:func:`sample_image_ids`). Neither option: every image of the instance files, by id.
        seed: Seed of that draw.
        prompt: The user-turn text.
        drop_incomplete_sentence: Score the caption without a final sentence lacking terminal punctuation.
        n_boot: Bootstrap draws for standard errors (0 disables them).
        strict: Raise :class:`SampleError` on the first bad sample instead of recording it.
        gen_kwargs: Merged over ``{"max_new_tokens": 512, "do_sample": False}`` (512 "long"; 64 "short").
        limit: At most this many samples (the first of the subset in canonical order).
    """

    name: ClassVar[str] = "chair"
    version: ClassVar[str] = "1.0"
    default_gen_kwargs: ClassVar[dict[str, Any]] = DEFAULT_GEN_KWARGS
    #: ``len`` is marked higher-is-better: at equal CHAIR, longer (more detailed) captions are wanted, and a method
    #: that lowers CHAIR by shortening captions should show up as a loss.
    higher_is_better: ClassVar[dict[str, bool]] = {"chair_s": False, "chair_i": False, "recall": True, "len": True}

    def __init__(
        self,
        *,
        instances: str | Sequence[str],
        captions: str | Sequence[str],
        image_root: str | None = None,
        synonyms: str | None = None,
        image_ids_file: str | None = None,
        n_images: int | None = None,
        seed: int = 0,
        prompt: str = DEFAULT_PROMPT,
        drop_incomplete_sentence: bool = False,
        n_boot: int = 1000,
        strict: bool = False,
        gen_kwargs: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(strict=strict, gen_kwargs=gen_kwargs, n_boot=n_boot, limit=limit)
        if image_ids_file is not None and n_images is not None:
            raise ValueError("give image_ids_file or n_images, not both")
        self.instances = instances if isinstance(instances, str) else list(instances)
        self.captions = captions if isinstance(captions, str) else list(captions)
        self.image_root = None if image_root is None else str(image_root)
        self.synonyms = str(COCO_SYNONYMS if synonyms is None else synonyms)
        self.image_ids_file = image_ids_file
        self.n_images = n_images
        self.seed = int(seed)
        self.prompt = prompt
        self.drop_incomplete_sentence = bool(drop_incomplete_sentence)
        self.vocab = Vocabulary.from_file(self.synonyms)
        self._samples: list[Sample] | None = None

    # ---- loading

    def samples(self) -> list[Sample]:
        """One sample per selected image, in the ids file's order (else by image id); cached."""
        if self._samples is None:
            check_image_root(self.image_root)
            inst = load_instances(resolve_files(self.instances, "CHAIR instances"), self.vocab, self.synonyms)
            chosen = self._select(inst)
            caps = load_captions(resolve_files(self.captions, "CHAIR captions"), {i for i, _ in chosen})
            self._samples = [self._sample(i, image_id, src, inst, caps) for i, (image_id, src) in enumerate(chosen)]
        return list(self._samples)

    def _select(self, inst: CocoInstances) -> list[tuple[int, str | None]]:
        """``(image_id, source)`` of the evaluated images (source is the ids-file line, if any), ``limit`` applied."""
        if self.image_ids_file is not None:
            chosen: list[tuple[int, str | None]] = list(read_image_ids(self.image_ids_file))
            if not any(i in inst.files for i, _ in chosen):
                raise DataError(f"none of the image ids in {self.image_ids_file} is in the instance files")
        elif self.n_images is not None:
            chosen = [(i, None) for i in sample_image_ids(inst.files, self.n_images, self.seed)]
        else:
            chosen = [(i, None) for i in sorted(inst.files)]
        return chosen[: self.limit] if self.limit is not None else chosen

    def _sample(
        self, index: int, image_id: int, src: str | None, inst: CocoInstances, caps: dict[int, list[str]]
    ) -> Sample:
        from_instances = inst.objects.get(image_id, set())
        from_captions = set().union(*(self.vocab.node_words(c) for c in caps.get(image_id, [])))
        gt = sorted(from_instances | from_captions)
        file_name, where = inst.files.get(image_id, (None, None))
        source = src or where or f"image {image_id}"
        error = None if file_name else f"image id {image_id} is not in the instance files {self.instances}"
        if error and self.strict:
            raise SampleError(error, source)
        path = str(Path(self.image_root) / file_name) if self.image_root and file_name else file_name
        doc = {
            "image_id": image_id,
            "file_name": file_name,
            "gt_objects": gt,
            "gt_from_instances": sorted(from_instances),
            "gt_from_captions": sorted(from_captions),
        }
        return Sample(
            sample_id=str(image_id),
            split=SPLIT,
            index=index,
            image_id=str(image_id),
            text=self.prompt,
            target=", ".join(gt),
            source=source,
            images=ImageFile(path, source) if path else None,
            doc=doc,
            error=error,
        )

    # ---- scoring

    def evaluate(self, text: str | None, gt: Iterable[str]) -> CaptionEval:
        """Score a raw model output under this task's options (``drop_incomplete_sentence``, synonym table)."""
        text = text or ""
        caption = drop_incomplete_sentence(text) if self.drop_incomplete_sentence else text
        return evaluate_caption(self.vocab, caption, gt)

    def score(self, sample: Sample, response: Response) -> dict[str, Any]:
        """Mentions, hallucinated ``(word, node word)`` pairs, correct node words, ``n_words``, ``parsed``."""
        return self.evaluate(response.raw_output, sample.doc["gt_objects"]).fields()

    def outcomes(self, records: list[dict[str, Any]], splits: list[str] | None = None) -> Outcomes:
        """Counts of :data:`COUNT_COLUMNS` per record, re-parsing ``raw_output`` under the current options.

        The ground truth is the record's ``doc["gt_objects"]`` (else its comma-joined ``target``). ``binary`` is 1
        for a caption without hallucination (McNemar's test between two runs).
        """
        rows = [self.evaluate(r.get("raw_output"), _record_gt(r)).counts() for r in records]
        counts = np.asarray(rows, dtype=np.float64).reshape(len(records), len(COUNT_COLUMNS))  # [n_records, 7]
        return Outcomes(
            counts=counts,
            stat_fn=chair_statistics,
            names=[(SPLIT, f"{m},{FILTER}") for m in METRICS],
            sizes={SPLIT: len(records)},
            binary=1.0 - counts[:, 1],  # [n_records]
            binary_name=f"no_hallucination,{FILTER}",
        )

    @property
    def headline(self) -> tuple[str, str]:
        """CHAIR_s: the fraction of captions with a hallucinated object (lower is better)."""
        return SPLIT, f"chair_s,{FILTER}"

    def describe(self) -> dict[str, Any]:
        """Task metadata, including the data settings."""
        info = super().describe()
        info.update(
            instances=self.instances,
            captions=self.captions,
            image_root=self.image_root,
            synonyms=self.synonyms,
            image_ids_file=self.image_ids_file,
            n_images=self.n_images,
            seed=self.seed,
            prompt=self.prompt,
            drop_incomplete_sentence=self.drop_incomplete_sentence,
            limit=self.limit,
            tokenizer=f"nltk {package_version('nltk') or 'unknown'} NLTKWordTokenizer + regex sentence split",
            lemmatizer=f"lemminflect {package_version('lemminflect') or 'unknown'} getLemma(upos=NOUN)",
        )
        if self._samples is not None:
            info["n_images_loaded"] = len(self._samples)
        return info


def _record_gt(record: dict[str, Any]) -> list[str]:
    gt = (record.get("doc") or {}).get("gt_objects")
    if isinstance(gt, list):
        return [str(g) for g in gt]
    target = str(record.get("target") or "")
    return [t for t in target.split(", ") if t]
