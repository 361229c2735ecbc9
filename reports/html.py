"""The leaderboard as one self-contained static HTML page: sortable, filterable, readable from ``file://``.

:func:`write_html` writes a single file with inline CSS and vanilla JavaScript (no CDN, no network, no server):

* the leaderboard table (``id="leaderboard"``), one row per :class:`~reports.table.Entry`: value ± stderr (and the
  spread over seeds), the paired Δ against the ``method=none`` baseline with its interval and significance marker,
  the p-value, the time ratio, the number of changed answers and the note; rows whose Δ goes in the metric's better
  (worse) direction carry the class ``better`` (``worse``);
* sorting: each header is a ``<button>``; a click sorts by that column's ``data-sort`` keys (numerically when they
  are all numbers, else case-insensitive text), a second click reverses, missing keys always last, and the active
  header gets ``aria-sort``;
* filtering: a substring box over each row's text and one ``<select>`` per task, model and method (combined with
  AND), with an ``N of M rows`` count;
* "Changed answers": per entry, the samples whose parsed answer differs from the baseline's, raw outputs shown as
  text with their whitespace;
* "Plots": the given image files, by path relative to the page.

Why every value is escaped in Python: the examples hold raw model outputs (and task, model and method labels come
from configs), so any of them may contain ``<script>``, ``</script>``, quotes or event-handler attributes. All rows
are therefore rendered server-side, each text through :func:`html.escape` with ``quote=True`` (safe in element text
and in quoted attributes alike); the page's script only reorders and hides existing DOM rows and reads
``data-sort`` / ``data-*`` attributes and ``textContent``, never parsing data as markup, and no data is embedded in
a script. The page works without JavaScript (rows are plain HTML), and as defence in depth its Content Security
Policy admits only the page's own inline script and style (by SHA-256 hash) and no network access.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from reports.table import Entry

MISSING = "—"

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #1d1d1f; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th button { font: inherit; font-weight: 600; background: none; border: 0; padding: 0; cursor: pointer; }
th[aria-sort="ascending"] button::after { content: " ▲"; }
th[aria-sort="descending"] button::after { content: " ▼"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.baseline td { background: #f4f4f6; }
tr.better td.delta { color: #11772d; font-weight: 600; }
tr.worse td.delta { color: #b3261e; font-weight: 600; }
#controls { display: flex; gap: 0.8rem; flex-wrap: wrap; align-items: center; }
table.examples td { white-space: pre-wrap; word-break: break-word; max-width: 32rem; }
table.examples td { font-family: ui-monospace, monospace; }
img { max-width: 100%; display: block; margin: 0.5rem 0 1.5rem; }
[hidden] { display: none !important; }
"""

SCRIPT = """
(() => {
  "use strict";
  const table = document.getElementById("leaderboard");
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const headers = Array.from(table.tHead.rows[0].cells);
  const texts = new Map(rows.map((r) => [r, Array.from(r.cells, (c) => c.textContent).join("\\n").toLowerCase()]));
  const collator = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
  const sortKey = (row, col) => (row.cells[col].dataset.sort ?? row.cells[col].textContent).trim();
  const isNumber = (key) => key !== "" && Number.isFinite(Number(key));

  function sortBy(col) {
    const dir = headers[col].getAttribute("aria-sort") === "ascending" ? -1 : 1;
    headers.forEach((h) => h.removeAttribute("aria-sort"));
    headers[col].setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    const current = Array.from(body.rows);
    const keys = new Map(current.map((r) => [r, sortKey(r, col)]));
    const numeric = [...keys.values()].every((k) => k === "" || isNumber(k));
    const compare = (a, b) => (numeric ? Number(a) - Number(b) : collator.compare(a, b));
    current.sort((ra, rb) => {
      const a = keys.get(ra), b = keys.get(rb);
      if (a === "" || b === "") return (a === "" ? 1 : 0) - (b === "" ? 1 : 0);  // missing last, both ways
      return dir * compare(a, b);
    });
    body.append(...current);
  }

  const filter = document.getElementById("filter");
  const selects = ["task", "model", "method"].map((name) => [name, document.getElementById("filter-" + name)]);
  const count = document.getElementById("row-count");

  function applyFilters() {
    const needle = filter.value.trim().toLowerCase();
    let shown = 0;
    for (const row of rows) {
      const keep = texts.get(row).includes(needle) &&
        selects.every(([name, select]) => select.value === "" || row.dataset[name] === select.value);
      row.hidden = !keep;
      shown += keep ? 1 : 0;
    }
    count.textContent = `${shown} of ${rows.length} rows`;
  }

  headers.forEach((th, col) => th.querySelector("button").addEventListener("click", () => sortBy(col)));
  filter.addEventListener("input", applyFilters);
  selects.forEach(([, select]) => select.addEventListener("change", applyFilters));
  applyFilters();  // the browser may restore form values on reload
})();
"""


@dataclass(frozen=True)
class Cell:
    """One leaderboard cell before escaping.

    Attributes:
        text: Displayed text (escaped on output).
        sort: ``data-sort`` key: a number as text, ``""`` when missing (sorted last), ``None`` to sort by ``text``.
        cls: CSS class of the ``<td>``.
        href: Link target of the text (``#id`` within the page), or empty.
        title: Tooltip, or empty.
    """

    text: str
    sort: str | None = None
    cls: str = ""
    href: str = ""
    title: str = ""


def esc(value: Any) -> str:
    """``str(value)`` escaped for HTML element text and double- or single-quoted attribute values."""
    return escape(str(value), quote=True)


def number_key(value: float | None) -> str:
    """Numeric sort key: the shortest round-trip text of the number, ``""`` when missing or not finite."""
    if value is None or not math.isfinite(value):
        return ""
    return repr(float(value))


def _text(value: str) -> Cell:
    return Cell(value, sort=value)


def _num(text: str, value: float | None, title: str = "") -> Cell:
    return Cell(text, sort=number_key(value), cls="num", title=title)


def _metric(e: Entry) -> Cell:
    arrow = "" if e.higher_is_better is None else " ↑" if e.higher_is_better else " ↓"
    return _text(e.metric + arrow)


def _value(e: Entry) -> Cell:
    if e.value is None:
        return _num(MISSING, None)
    text = f"{e.value:.4f}" + (f" ± {e.stderr:.4f}" if e.stderr is not None else "")
    return _num(text + (f" (sd {e.spread:.4f})" if e.spread is not None else ""), e.value)


def _delta(e: Entry) -> Cell:
    if e.is_baseline or e.delta is None:
        return Cell("baseline" if e.is_baseline else MISSING, sort="", cls="num delta")
    text = f"{e.delta:+.4f}"
    if e.ci_low is not None and e.ci_high is not None:
        text += f" [{e.ci_low:+.4f}, {e.ci_high:+.4f}]"
    title = f"{e.n_paired} paired samples" if e.n_paired is not None else ""
    return Cell(f"{text} {e.significance}".rstrip(), sort=number_key(e.delta), cls="num delta", title=title)


def _p(e: Entry) -> Cell:
    p = e.p_value
    return _num("" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}", p)


def _time(e: Entry) -> Cell:
    spp = f"{e.seconds_per_sample:.3g} s/sample" if e.seconds_per_sample is not None else ""
    return _num("" if e.time_ratio is None else f"{e.time_ratio:.2f}×", e.time_ratio, title=spp)


def _changed(e: Entry, index: int) -> Cell:
    cell = _num("" if e.changed is None else str(e.changed), e.changed)
    return Cell(cell.text, cell.sort, cell.cls, href=f"#examples-{index}" if e.examples else "")


#: (header, cell of an entry given its index in the table)
COLUMNS: tuple[tuple[str, Callable[[Entry, int], Cell]], ...] = (
    ("Task", lambda e, _: _text(e.task)),
    ("Model", lambda e, _: _text(e.model)),
    ("Method", lambda e, _: _text(e.method)),
    ("Metric", lambda e, _: _metric(e)),
    ("n", lambda e, _: _num(str(e.n_samples), e.n_samples)),
    ("Seeds", lambda e, _: _num(", ".join(map(str, e.seeds)), len(e.seeds))),
    ("Value", lambda e, _: _value(e)),
    ("Δ vs none", lambda e, _: _delta(e)),
    ("p", lambda e, _: _p(e)),
    ("Time ×", lambda e, _: _time(e)),
    ("Changed", _changed),
    ("Note", lambda e, _: _text(e.note)),
)


def _td(cell: Cell) -> str:
    attrs = "" if cell.sort is None else f' data-sort="{esc(cell.sort)}"'
    attrs += f' class="{esc(cell.cls)}"' if cell.cls else ""
    attrs += f' title="{esc(cell.title)}"' if cell.title else ""
    body = f'<a href="{esc(cell.href)}">{esc(cell.text)}</a>' if cell.href else esc(cell.text)
    return f"<td{attrs}>{body}</td>"


def _row(e: Entry, index: int) -> str:
    classes = ["baseline"] if e.is_baseline else []
    if e.improves is not None:
        classes.append("better" if e.improves else "worse")
    attrs = f' class="{" ".join(classes)}"' if classes else ""
    attrs += f' data-task="{esc(e.task)}" data-model="{esc(e.model)}" data-method="{esc(e.method)}"'
    return f"<tr{attrs}>" + "".join(_td(cell(e, index)) for _, cell in COLUMNS) + "</tr>"


def _leaderboard(entries: Sequence[Entry]) -> str:
    head = "".join(f'<th scope="col"><button type="button">{esc(name)}</button></th>' for name, _ in COLUMNS)
    rows = "\n".join(_row(e, i) for i, e in enumerate(entries))
    return f'<table id="leaderboard">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>'


def _select(name: str, values: Sequence[str]) -> str:
    options = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in sorted(set(values), key=str.casefold))
    label = f'<label for="filter-{name}">{name.capitalize()}</label>'
    return f'{label} <select id="filter-{name}"><option value="">all</option>{options}</select>'


def _controls(entries: Sequence[Entry]) -> str:
    selects = [_select(name, [getattr(e, name) for e in entries]) for name in ("task", "model", "method")]
    search = '<label for="filter">Filter</label> <input id="filter" type="search" placeholder="substring…">'
    count = f'<span id="row-count" aria-live="polite">{len(entries)} of {len(entries)} rows</span>'
    return f'<div id="controls">{search} {" ".join(selects)} {count}</div>'


def shown(value: Any) -> str:
    """How an example field is displayed: strings as they are, ``None`` as a dash, anything else as JSON."""
    if value is None:
        return MISSING
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


#: (header, key in an example dict)
EXAMPLE_COLUMNS = (
    ("sample", "sample_id"),
    ("target", "target"),
    ("baseline parsed", "baseline_parsed"),
    ("baseline output", "baseline_output"),
    ("method parsed", "method_parsed"),
    ("method output", "method_output"),
)


def _examples_table(e: Entry, index: int) -> str:
    head = "".join(f'<th scope="col">{name}</th>' for name, _ in EXAMPLE_COLUMNS)
    rows = "\n".join(
        (f'<tr title="{esc(ex["prompt"])}">' if ex.get("prompt") else "<tr>")
        + "".join(f"<td>{esc(shown(ex.get(key)))}</td>" for _, key in EXAMPLE_COLUMNS)
        + "</tr>"
        for ex in e.examples
    )
    heading = f'<h3 id="examples-{index}">{esc(e.task)} / {esc(e.model)} / {esc(e.method)}</h3>'
    count = f"<p>{esc(e.changed)} changed answers; the first {len(e.examples)}:</p>" if e.changed is not None else ""
    table = f'<table class="examples">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>'
    return f"{heading}\n{count}\n{table}"


def _examples(entries: Sequence[Entry]) -> str:
    tables = [_examples_table(e, i) for i, e in enumerate(entries) if e.examples]
    if not tables:
        return ""
    intro = "<p>Samples whose parsed answer differs from the baseline's (hover a row for its prompt).</p>"
    return '<section id="changed">\n<h2>Changed answers</h2>\n' + intro + "\n" + "\n".join(tables) + "\n</section>"


def _plots(plots: Sequence[str]) -> str:
    if not plots:
        return ""
    images = "\n".join(
        f'<figure><img src="{esc(quote(PurePath(p).as_posix(), safe="/"))}" alt="{esc(PurePath(p).name)}">'
        f"<figcaption>{esc(PurePath(p).name)}</figcaption></figure>"
        for p in plots
    )
    return f'<section id="plots">\n<h2>Plots</h2>\n{images}\n</section>'


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def _csp() -> str:
    """Content Security Policy: this page's own script and style only, images from files, no network."""
    return (
        f"default-src 'none'; script-src {_csp_hash(SCRIPT)}; style-src {_csp_hash(CSS)}; "
        "img-src 'self' file: data:; base-uri 'none'; form-action 'none'"
    )


LEGEND = (
    "<p>Value: headline metric, mean over seeds ± bootstrap standard error (sd: over seeds). Δ: paired difference "
    "to the <code>method=none</code> run with the same model, task, items and seed, with its 95 % interval; "
    "* p &lt; 0.05, ** p &lt; 0.01, *** p &lt; 0.001. ↑/↓: higher/lower is better. Time ×: wall time per sample "
    "relative to the baseline. Changed: answers that differ from the baseline's.</p>"
)


def render_html(entries: Sequence[Entry], *, title: str = "Leaderboard", plots: Sequence[str] = ()) -> str:
    """The page's HTML text (see the module docstring); every value from ``entries``, ``title`` and ``plots`` escaped.

    Args:
        entries: Leaderboard rows, in their initial display order.
        title: Page title and heading.
        plots: Image paths relative to the page's folder, shown in a "Plots" section.

    Returns:
        A complete HTML document.
    """
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">\n<head>\n<meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{esc(_csp())}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>",
            f"<h1>{esc(title)}</h1>",
            LEGEND,
            _controls(entries),
            "<noscript><p>Sorting and filtering need JavaScript.</p></noscript>",
            _leaderboard(entries),
            _plots(plots),
            _examples(entries),
            f"<script>{SCRIPT}</script>\n</body>\n</html>\n",
        ]
    )


def write_html(entries: list[Entry], path: Path, *, title: str = "Leaderboard", plots: Sequence[str] = ()) -> None:
    """Write the leaderboard as one self-contained static HTML file (inline CSS and JS, works from ``file://``).

    Args:
        entries: Leaderboard rows, in their initial display order.
        path: Output file; its parent directories are created.
        title: Page title and heading.
        plots: Image paths relative to ``path``'s folder, shown as ``<img>`` in a "Plots" section.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(entries, title=title, plots=plots), encoding="utf-8")
