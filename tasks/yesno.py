"""Yes/no answer parsers shared by the yes/no benchmarks (POPE, MME).

The same raw generation scores differently under the rules of different papers; on POPE (Li et al.,
EMNLP 2023, "Evaluating Object Hallucination in Large Vision-Language Models") the choice moves numbers by
several points. Each rule is a named plug-in in :data:`PARSERS`, so stored generations can be re-scored under
any of them without generating again.

Every parser has the signature ``fn(text, target) -> "yes" | "no" | None``:

* ``text`` is the raw model output;
* ``target`` is the reference label (``"yes"``/``"no"``) or ``None``; only target-aware rules (``vcd_substring``)
  look at it;
* ``None`` means the rule could not decide (it counts as a wrong answer downstream).

Rules (see each function's docstring for details):

* ``pope_official`` — POPE ``evaluate.py`` / LLaVA ``eval_pope.py``: first sentence, negation tokens → no,
  anything else → yes.
* ``opera`` — OPERA ``pope_eval.py``: negation tokens or a ``n't`` word anywhere → no, else yes.
* ``vcd_substring`` — VCD ``eval_pope.py``: target-aware substring test.
* ``lmms_exact`` — lmms-eval ``pope``: exact ``yes``/``no`` after lowercasing and stripping.
* ``yorn_words`` — VLMEvalKit ``YOrN_Extraction`` without the LLM judge: word-level yes xor no.
* ``mme_official`` — MME ``eval_tool/calculation.py``: exact ``yes``/``no``, else only the first 4 characters.

:func:`all_verdicts` gives every registered rule's verdict on one output (stored per sample, so a reader sees at a
glance which outputs the rules disagree on).
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

from core.registry import Registry

YesNo = str | None
YesNoParser = Callable[[str, str | None], YesNo]

PARSERS: Registry[YesNoParser] = Registry("yes/no parser")

_OTHER = {"yes": "no", "no": "yes"}


def is_clean_yes_no(text: str) -> bool:
    """Whether ``text`` is a bare yes/no: lowercased, stripped of whitespace and trailing punctuation.

    ``"Yes."``, ``" no!"`` and ``"YES"`` are clean; ``"Yes, there is"``, ``"Nope"``, ``""`` are not.

    This is parser-independent; it measures how well the model follows the "single word" instruction.
    """
    core = text.strip().lower().rstrip(string.punctuation + string.whitespace)
    return core in ("yes", "no")


@PARSERS.register("pope_official")
def parse_pope_official(text: str, target: str | None = None) -> YesNo:
    r"""POPE's official rule (``evaluate.py``; LLaVA's ``eval_pope.py`` is identical).

    1. Keep only the text before the first ``.`` (if any).
    2. Delete commas.
    3. Split on single spaces (``str.split(" ")``, not on any whitespace — a faithful quirk: ``"No\nThere"`` is
       one token).
    4. If any token is exactly ``No``, ``no`` or ``not`` (case-sensitive; ``NO`` is not) → ``"no"``;
       otherwise → ``"yes"``. The rule never abstains: empty or off-topic answers count as yes.

    Leading/trailing whitespace is stripped first, as LLaVA's generation script does before writing answers.
    ``target`` is ignored.
    """
    first = text.strip().split(".")[0]
    words = first.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


@PARSERS.register("opera")
def parse_opera(text: str, target: str | None = None) -> YesNo:
    """OPERA's rule (``pope_eval.py``).

    1. Delete every ``.`` and ``,`` in the whole answer (not only the first sentence).
    2. Split on single spaces.
    3. If any token is ``No``, ``not``, ``no`` or ``NO``, or ends with ``n't`` (ASCII apostrophe: ``isn't``,
       ``don't``) → ``"no"``; otherwise → ``"yes"``. Never abstains.

    Leading/trailing whitespace is stripped first. ``target`` is ignored.
    """
    words = text.strip().replace(".", "").replace(",", "").split(" ")
    negative = any(w in ("No", "not", "no", "NO") or w.endswith("n't") for w in words)
    return "no" if negative else "yes"


@PARSERS.register("vcd_substring")
def parse_vcd_substring(text: str, target: str | None = None) -> YesNo:
    """VCD's target-aware substring rule (``experiments/eval/eval_pope.py``).

    The answer is lowercased and stripped. VCD never parses the answer on its own; it asks whether the
    *reference* word occurs as a substring:

    * target ``yes``: ``"yes"`` in the answer → ``"yes"`` (TP), else ``"no"`` (FN);
    * target ``no``: ``"no"`` in the answer → ``"no"`` (TN), else ``"yes"`` (FP).

    So ``"not"``, ``"nothing"``, ``"know"`` all count as a ``no`` when the target is no, and an empty answer is a
    false positive. Without a target (not part of VCD) the rule falls back to: only ``"yes"`` occurs → ``"yes"``,
    only ``"no"`` occurs → ``"no"``, both or neither → ``None``.
    """
    answer = text.lower().strip()
    if target in _OTHER:
        return target if target in answer else _OTHER[target]
    has_yes, has_no = "yes" in answer, "no" in answer
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


@PARSERS.register("lmms_exact")
def parse_lmms_exact(text: str, target: str | None = None) -> YesNo:
    """lmms-eval's ``pope`` rule: lowercase and strip; ``"yes"`` or ``"no"`` exactly, else ``None``.

    ``"Yes."`` and ``"Yes, there is"`` are therefore undecided (wrong). ``target`` is ignored.
    """
    answer = text.lower().strip()
    return answer if answer in ("yes", "no") else None


# VLMEvalKit's punctuation handling (inherited from the VQA evaluation script): each of these characters is
# deleted when some occurrence of it touches a space (or the text has a digit,digit comma), otherwise replaced
# by a space; periods not between digits are deleted. ``'`` and ``:`` are not in the list.
_YORN_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def _yorn_normalize(text: str) -> str:
    out = text
    digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _YORN_PUNCT:
        touches_space = f"{p} " in text or f" {p}" in text
        out = out.replace(p, "" if touches_space or digit_comma else " ")
    return _LONE_PERIOD.sub("", out)


@PARSERS.register("yorn_words")
def parse_yorn_words(text: str, target: str | None = None) -> YesNo:
    """VLMEvalKit's ``YOrN_Extraction`` without the LLM judge.

    Lowercase, normalise punctuation (VQA-style, see ``_yorn_normalize``), split on whitespace. ``"yes"`` as a
    word and no ``"no"`` → ``"yes"``; ``"no"`` and no ``"yes"`` → ``"no"``; otherwise (both, neither — e.g.
    ``"Nope"``, ``"There isn't"``) VLMEvalKit says *Unknown* and would ask a judge; here → ``None``.
    ``target`` is ignored.
    """
    words = _yorn_normalize(text.lower()).split()
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


@PARSERS.register("mme_official")
def parse_mme_official(text: str, target: str | None = None) -> YesNo:
    """MME's official rule (``eval_tool/calculation.py``, ``parse_pred_ans``).

    1. Lowercase (and strip surrounding whitespace, as LLaVA's and lmms-eval's generation code do before the
       answer reaches the tool).
    2. Exactly ``"yes"`` or ``"no"`` → that answer.
    3. Otherwise look only at the first 4 characters: contains ``"yes"`` → ``"yes"``; else contains ``"no"`` →
       ``"no"``; else ``None`` (MME's "other", always wrong).

    So ``"Yes."`` and ``"No, there is"`` are decided, ``"There is no"`` is not, and ``"noted"`` / ``"nope"`` count as
    no (a faithful quirk of the 4-character prefix). ``target`` is ignored.
    """
    answer = text.strip().lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return None


def get_parser(name: str) -> YesNoParser:
    """The parser registered as ``name`` (raises with a did-you-mean message when unknown)."""
    return PARSERS.get(name)


def all_verdicts(text: str, target: str | None = None) -> dict[str, YesNo]:
    """Every registered parser's verdict on ``text`` (``{parser name: "yes" | "no" | None}``), in registry order."""
    return {name: PARSERS.get(name)(text, target) for name in PARSERS.names()}
