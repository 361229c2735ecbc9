"""Record store: durable appends, torn last line, errored retries, duplicates, config mismatch."""

from __future__ import annotations

import json

import pytest

from core.records import ConfigMismatchError, RecordStore


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


def test_torn_last_line_is_dropped_and_corruption_elsewhere_is_quarantined(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(_rec(0)) + "\n" + '{"sample_id": "s1", "ind')
    s = RecordStore(p, "abc")
    assert s.done("s0") and not s.done("s1") and s.dropped["torn"] == 1
    assert p.read_text().count("\n") == 1
    # issue 27, case 9: a corrupt line in the middle no longer stops a resume; it is kept aside, its sample redone
    p.write_text(json.dumps(_rec(0)) + "\n" + '{"broken\n' + "\xff\n" + json.dumps(_rec(1)) + "\n")
    with pytest.warns(UserWarning, match=r"2 corrupt record line\(s\) \(line 2, 3\) moved to .*s\.jsonl\.corrupt"):
        s = RecordStore(p, "abc")
    assert s.done("s0") and s.done("s1") and s.dropped["corrupt"] == 2
    assert [json.loads(x)["sample_id"] for x in p.read_text().splitlines()] == ["s0", "s1"]
    assert (tmp_path / "s.jsonl.corrupt").read_text(encoding="utf-8") == '2\t{"broken\n3\t\xff\n'
    with pytest.warns(UserWarning, match=":2: corrupt record line skipped"):
        assert [r["sample_id"] for r in read_records_of(tmp_path, '{"x"\n')] == ["s0", "s1"]


def read_records_of(tmp_path, middle):
    from core.records import read_records

    q = tmp_path / "r.jsonl"
    q.write_text(json.dumps(_rec(0)) + "\n" + middle + json.dumps(_rec(1)) + "\n")
    return read_records(q)


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
