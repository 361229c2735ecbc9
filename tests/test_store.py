"""Record store: durable appends, torn last line, errored retries, duplicates, config mismatch."""

from __future__ import annotations

import json

import pytest

from harness.store import ConfigMismatchError, RecordStore


def _rec(i, error=None, h="abc"):
    return {"sample_id": f"s{i}", "index": i, "config_hash": h, "error": error}


def test_append_and_reload(tmp_path):
    p = tmp_path / "s.jsonl"
    s = RecordStore(p, "abc")
    s.append([_rec(0), _rec(1, error="missing image")])
    again = RecordStore(p, "abc")
    assert again.done("s0") and not again.done("s1")
    assert again.dropped["errored"] == 1
    assert [json.loads(x)["sample_id"] for x in p.read_text().splitlines()] == ["s0"]


def test_torn_last_line_is_dropped_but_corruption_elsewhere_is_an_error(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(_rec(0)) + "\n" + '{"sample_id": "s1", "ind')
    s = RecordStore(p, "abc")
    assert s.done("s0") and not s.done("s1") and s.dropped["torn"] == 1
    assert p.read_text().count("\n") == 1
    p.write_text('{"broken\n' + json.dumps(_rec(0)) + "\n")
    with pytest.raises(ValueError, match=":1: corrupt"):
        RecordStore(p, "abc")


def test_duplicates_keep_first(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in [_rec(0), _rec(0), _rec(1)]))
    s = RecordStore(p, "abc")
    assert s.dropped["duplicate"] == 1 and len(s.records) == 2


def test_other_config_refused(tmp_path):
    p = tmp_path / "s.jsonl"
    RecordStore(p, "abc").append([_rec(0)])
    with pytest.raises(ConfigMismatchError, match="config abc"):
        RecordStore(p, "xyz")
