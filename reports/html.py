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

Where things live: the markup is the Jinja2 template ``reports/templates/leaderboard.html.j2``, the style and script
are ``leaderboard.css`` and ``leaderboard.js`` beside it (package data, loaded with :class:`jinja2.PackageLoader`, so
an installed package finds them too). This module only prepares the data: :class:`Row` and :class:`Cell` (text,
sort key, class, tooltip, link), the filter options, the plot paths and the changed-answer examples.

Why every value is escaped: the examples hold raw model outputs (and task, model and method labels come from
configs), so any of them may contain ``<script>``, ``</script>``, quotes or event-handler attributes. All rows are
therefore rendered server-side by a template with autoescaping on (:func:`environment`): every ``{{ value }}`` goes
through MarkupSafe, which escapes ``& < > " '`` and so is safe in element text and in quoted attributes alike. The
only text inserted unescaped is the page's own CSS and JavaScript files. The page's script only reorders and hides
existing DOM rows and reads ``data-sort`` / ``data-*`` attributes and ``textContent``, never parsing data as markup,
and no data is embedded in a script. The page works without JavaScript (rows are plain HTML), and as defence in
depth its Content Security Policy admits only the page's own inline script and style (by SHA-256 hash of those
files) and no network access.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

if TYPE_CHECKING:
    from reports.table import Entry

MISSING = "—"
TEMPLATE = "leaderboard.html.j2"


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


@dataclass(frozen=True)
class Row:
    """One leaderboard row before escaping.

    Attributes:
        cells: One cell per :data:`COLUMNS` entry.
        classes: CSS classes of the ``<tr>`` (``baseline``, ``better``, ``worse``), space-separated, or empty.
        task: ``data-task``, matched by the task filter.
        model: ``data-model``, matched by the model filter.
        method: ``data-method``, matched by the method filter.
    """

    cells: tuple[Cell, ...]
    classes: str
    task: str
    model: str
    method: str


@dataclass(frozen=True)
class Filter:
    """One ``<select>`` filter: the ``data-*`` attribute it matches and its options (besides "all").

    Attributes:
        name: ``task``, ``model`` or ``method``.
        options: The distinct values, sorted case-insensitively.
    """

    name: str
    options: tuple[str, ...]

    @property
    def label(self) -> str:
        """The ``<label>`` text."""
        return self.name.capitalize()


@dataclass(frozen=True)
class ExampleRow:
    """One changed answer: its prompt (the row's tooltip, or empty) and one displayed text per example column."""

    prompt: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Examples:
    """An entry's changed answers.

    Attributes:
        anchor: The heading's ``id``, the target of the entry's "Changed" link.
        heading: ``task / model / method``.
        changed: How many answers changed (``None``: not counted, no count line).
        rows: The examples shown.
    """

    anchor: str
    heading: str
    changed: int | None
    rows: tuple[ExampleRow, ...]


@dataclass(frozen=True)
class Plot:
    """An image of the "Plots" section: its URL-quoted ``src`` and its file name (alt text and caption)."""

    src: str
    name: str


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


def _row(e: Entry, index: int) -> Row:
    classes = ["baseline"] if e.is_baseline else []
    if e.improves is not None:
        classes.append("better" if e.improves else "worse")
    cells = tuple(cell(e, index) for _, cell in COLUMNS)
    return Row(cells, " ".join(classes), e.task, e.model, e.method)


def _filters(entries: Sequence[Entry]) -> list[Filter]:
    values = {name: {getattr(e, name) for e in entries} for name in ("task", "model", "method")}
    return [Filter(name, tuple(sorted(v, key=str.casefold))) for name, v in values.items()]


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


def _examples(e: Entry, index: int) -> Examples:
    rows = tuple(
        ExampleRow(str(ex.get("prompt") or ""), tuple(shown(ex.get(key)) for _, key in EXAMPLE_COLUMNS))
        for ex in e.examples
    )
    return Examples(f"examples-{index}", f"{e.task} / {e.model} / {e.method}", e.changed, rows)


def _plot(path: str) -> Plot:
    pure = PurePath(path)
    return Plot(src=quote(pure.as_posix(), safe="/"), name=pure.name)


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def _csp(css: str, script: str) -> str:
    """Content Security Policy: this page's own script and style only, images from files, no network."""
    return (
        f"default-src 'none'; script-src {_csp_hash(script)}; style-src {_csp_hash(css)}; "
        "img-src 'self' file: data:; base-uri 'none'; form-action 'none'"
    )


@cache
def environment() -> Environment:
    """The Jinja2 environment of ``reports/templates`` (package data), autoescaping every template.

    Returns:
        An environment whose templates escape every ``{{ value }}`` for HTML text and quoted attributes, and whose
        undefined names raise instead of rendering empty.
    """
    return Environment(
        loader=PackageLoader("reports", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html", "html.j2"), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def asset(name: str) -> str:
    """The text of a file in ``reports/templates`` (the page's CSS or JavaScript), exactly as stored.

    Args:
        name: File name inside the templates folder.

    Returns:
        The file's text.
    """
    env = environment()
    assert env.loader is not None
    return env.loader.get_source(env, name)[0]


def render_html(entries: Sequence[Entry], *, title: str = "Leaderboard", plots: Sequence[str] = ()) -> str:
    """The page's HTML text (see the module docstring); every value from ``entries``, ``title`` and ``plots`` escaped.

    Args:
        entries: Leaderboard rows, in their initial display order.
        title: Page title and heading.
        plots: Image paths relative to the page's folder, shown in a "Plots" section.

    Returns:
        A complete HTML document.
    """
    css, script = asset("leaderboard.css"), asset("leaderboard.js")
    template = environment().get_template(TEMPLATE)
    return template.render(
        title=title,
        csp=_csp(css, script),
        css=Markup(css),  # the page's own files, trusted: inserted as they are, which is what the CSP hashes
        script=Markup(script),
        filters=_filters(entries),
        headers=[name for name, _ in COLUMNS],
        rows=[_row(e, i) for i, e in enumerate(entries)],
        plots=[_plot(p) for p in plots],
        example_headers=[name for name, _ in EXAMPLE_COLUMNS],
        examples=[_examples(e, i) for i, e in enumerate(entries) if e.examples],
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
