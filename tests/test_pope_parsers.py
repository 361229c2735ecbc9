"""Yes/no parsers of tasks/yesno.py: each rule of benchmarks.md §1.5 on tricky answers.

Expected values are derived by hand from each rule's text, not by running the code.
"""

from __future__ import annotations

import pytest

from core.registry import UnknownNameError
from tasks import pope
from tasks.yesno import PARSERS, is_clean_yes_no

TRICKY = ["No.", "not sure", "Yes, there is", "I don't know", "", "Nope", "There isn't", "YES", "no, there is not"]

# pope_official: first sentence, drop commas, split on " ", token in {No, no, not} -> no, else yes.
POPE_OFFICIAL = ["no", "no", "yes", "yes", "yes", "yes", "yes", "yes", "no"]
# opera: drop "." and "," everywhere, token in {No, not, no, NO} or ending in "n't" -> no, else yes.
OPERA = ["no", "no", "yes", "no", "yes", "yes", "no", "yes", "no"]
# lmms_exact: lower().strip() must equal "yes" / "no" exactly.
LMMS_EXACT = [None, None, None, None, None, None, None, "yes", None]
# yorn_words: words after punctuation handling; yes xor no, else Unknown (None).
YORN_WORDS = ["no", None, "yes", None, None, None, None, "yes", "no"]
# vcd_substring with target yes: "yes" substring -> yes, else no.
VCD_TARGET_YES = ["no", "no", "yes", "no", "no", "no", "no", "yes", "no"]
# vcd_substring with target no: "no" substring ("not", "know", "nope" count) -> no, else yes.
VCD_TARGET_NO = ["no", "no", "yes", "no", "yes", "no", "yes", "yes", "no"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("pope_official", POPE_OFFICIAL), ("opera", OPERA), ("lmms_exact", LMMS_EXACT), ("yorn_words", YORN_WORDS)],
)
@pytest.mark.parametrize("target", [None, "yes", "no"])
def test_target_free_parsers(name, expected, target):
    parse = PARSERS.get(name)
    got = [parse(text, target) for text in TRICKY]
    assert got == expected


def test_vcd_substring_is_target_aware():
    parse = PARSERS.get("vcd_substring")
    assert [parse(t, "yes") for t in TRICKY] == VCD_TARGET_YES
    assert [parse(t, "no") for t in TRICKY] == VCD_TARGET_NO


def test_vcd_substring_without_target():
    parse = PARSERS.get("vcd_substring")
    assert parse("Yes.", None) == "yes"
    assert parse("I do not think so", None) == "no"
    assert parse("", None) is None
    assert parse("yes and no", None) is None


def test_pope_official_quirks():
    parse = PARSERS.get("pope_official")
    assert parse("NO", None) == "yes"  # the token list is case-sensitive and lacks "NO"
    assert parse("Yes. There is no dog.", None) == "yes"  # only the first sentence counts
    assert parse("There is no dog", None) == "no"
    assert parse("  No\n", None) == "no"  # outer whitespace stripped, as LLaVA's generation script does
    assert parse("Not", None) == "yes"  # "Not" is not in the list


def test_opera_quirks():
    parse = PARSERS.get("opera")
    assert parse("NO", None) == "no"
    assert parse("Yes. There is no dog.", None) == "no"  # whole answer, not only the first sentence
    assert parse("It doesn't appear so", None) == "no"


def test_yorn_words_quirks():
    parse = PARSERS.get("yorn_words")
    assert parse("Yes, no doubt.", None) is None  # both words
    assert parse("(no)", None) == "no"
    assert parse("yes/no", None) is None  # "/" becomes a space: both words
    assert parse("Yes!", None) == "yes"


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("yes", True),
        ("No.", True),
        (" YES!\n", True),
        ("no ,", True),
        ("Yes, there is", False),
        ("Nope", False),
        ("", False),
        ("yes no", False),
    ],
)
def test_is_clean_yes_no(text, clean):
    assert is_clean_yes_no(text) is clean


def test_registry_names_and_did_you_mean():
    assert set(PARSERS.names()) >= {"pope_official", "opera", "vcd_substring", "lmms_exact", "yorn_words"}
    assert pope.PARSERS is PARSERS
    with pytest.raises(UnknownNameError, match="pope_official"):
        PARSERS.get("pope_oficial")


def test_unknown_parser_rejected_at_task_construction():
    with pytest.raises(UnknownNameError, match="did you mean"):
        pope.POPETask(questions="unused", parser="lmms_exakt")
