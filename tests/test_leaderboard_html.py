"""The static leaderboard page: escaping (pure Python), and sorting, filtering and safety in headless Chromium."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from reports.html import render_html, write_html
from reports.table import Entry

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PWNED_OUTPUT = '<script>window.__pwned = 1</script><b>bold</b> & "quotes"'
PWNED_BASELINE = 'no\n</script><img src=x onerror="window.__pwned=2">'
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)
PLOT = "plots/delta plot.png"  # a space, to check the src is URL-quoted
DELTA_COL, METHOD_COL = 7, 2


def _entry(task: str, model: str, method: str, **kw) -> Entry:
    higher = task == "pope"
    defaults = {
        "metric": "acc: acc" if higher else "chair: chair_i",
        "higher_is_better": higher,
        "n_samples": 100,
        "seeds": [0],
        "value": 0.85 if higher else 0.12,
        "stderr": 0.01,
        "is_baseline": method == "none",
    }
    return Entry(task=task, model=model, method=method, **{**defaults, **kw})


def _entries() -> list[Entry]:
    examples = [
        {
            "sample_id": "s1",
            "target": "yes",
            "prompt": "Is there a <cat>?",
            "baseline_output": PWNED_BASELINE,
            "method_output": PWNED_OUTPUT,
            "baseline_parsed": "no",
            "method_parsed": {"answer": "yes"},
        },
        {"sample_id": "s2", "target": "no", "baseline_output": "line one\n    indented", "method_output": None},
    ]
    return [
        _entry("chair", "llava", "none"),
        _entry("chair", "llava", "vcd", delta=-0.03, ci_low=-0.05, ci_high=-0.01, p_value=0.0005, time_ratio=1.9),
        _entry("chair", "qwen", "none"),
        _entry("chair", "qwen", "opera", delta=0.01, ci_low=-0.005, ci_high=0.025, p_value=0.2, changed=0),
        _entry("pope", "llava", "none"),
        _entry("pope", "llava", "PAI", delta=-0.01, p_value=0.3, seeds=[0, 1, 2], spread=0.004),
        _entry(
            "pope",
            "llava",
            "vcd",
            value=0.87,
            delta=0.02,
            ci_low=0.005,
            ci_high=0.035,
            p_value=0.004,
            n_paired=100,
            time_ratio=1.02,
            changed=3,
            examples=examples,
        ),
        _entry("pope", "qwen", "none"),
        _entry("pope", "qwen", "opera", note="no method=none run on the same items with seed 1"),
    ]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("leaderboard")
    (folder / "plots").mkdir()
    (folder / PLOT).write_bytes(PNG_1PX)
    write_html(_entries(), folder / "index.html", title='Board <i>"x"</i>', plots=[PLOT])
    return (folder / "index.html").as_uri()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` (or `apt-get install chromium`) installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Opened:
    """A loaded page with its console errors, page errors and requested URLs."""

    page: object
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert self.errors == []
        assert [url for url in self.requests if not url.startswith("file:")] == []


def _open(context, url: str) -> Opened:
    page = context.new_page()
    opened = Opened(page)
    page.on("console", lambda msg: opened.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: opened.errors.append(f"pageerror: {exc}"))
    page.on("request", lambda req: opened.requests.append(req.url))
    page.goto(url)
    return opened


@pytest.fixture
def opened(browser, page_url) -> Iterator[Opened]:
    context = browser.new_context()
    yield _open(context, page_url)
    context.close()


def _column(page, col: int) -> list[str]:
    return page.eval_on_selector_all("#leaderboard tbody tr", f"rows => rows.map(r => r.cells[{col}].dataset.sort)")


def _visible_rows(page) -> int:
    return page.locator("#leaderboard tbody tr:visible").count()


def test_written_html_escapes_model_output(tmp_path):
    path = tmp_path / "out" / "index.html"
    write_html(_entries(), path, title="<Board>")
    html = path.read_text(encoding="utf-8")
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt; &amp; &#34;quotes&#34;" in html
    assert "<script>window.__pwned" not in html
    assert "&lt;/script&gt;&lt;img src=x onerror=&#34;window.__pwned=2&#34;&gt;" in html
    assert html.count("<script") == 1 and 'onerror="' not in html
    assert "<title>&lt;Board&gt;</title>" in html
    assert 'id="plots"' not in html  # no plots given, no section


class _Tags(HTMLParser):
    """Every start tag with its (unescaped) attributes, and the text of each element."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.texts.append(data)


def test_template_escapes_every_user_string():
    evil = """x"'><script>window.__pwned = 3</script><b onclick="f()">"""
    image = """a"><img src=x onerror="f()">.png"""  # a file name: no "/"
    example = {"sample_id": evil, "prompt": evil, "target": evil, "method_output": evil}
    entry = _entry("pope", evil, evil, note=evil, changed=1, examples=[example])
    html = render_html([entry], title=evil, plots=[f"plots/{image}"])
    parsed = _Tags()
    parsed.feed(html)
    assert [tag for tag, _ in parsed.tags].count("script") == 1 and "<script>window" not in html
    assert "<b onclick" not in html and 'onerror="' not in html
    row = next(attrs for tag, attrs in parsed.tags if tag == "tr" and "data-model" in attrs)
    assert row["data-model"] == row["data-method"] == evil  # attributes stay closed and round-trip
    assert {"value": evil} in [attrs for tag, attrs in parsed.tags if tag == "option"]
    assert next(attrs for tag, attrs in parsed.tags if tag == "tr" and "title" in attrs)["title"] == evil
    assert next(attrs for tag, attrs in parsed.tags if tag == "img")["alt"] == image
    assert parsed.texts.count(evil) == 10  # title, h1; 2 options, 3 cells (model, method, note); 3 example cells
    assert parsed.texts.count(image) == 1  # the caption


def test_page_loads_without_errors(opened):
    page = opened.page
    assert page.locator("#leaderboard tbody tr").count() == 9
    assert page.locator("#row-count").inner_text() == "9 of 9 rows"
    assert page.title() == 'Board <i>"x"</i>'
    image = page.locator("#plots img")
    assert image.get_attribute("alt") == "delta plot.png"
    assert image.evaluate("img => img.complete && img.naturalWidth") == 1
    opened.assert_clean()


def test_rows_render_without_javascript(browser, page_url):
    context = browser.new_context(java_script_enabled=False)
    page = _open(context, page_url).page
    cells = page.locator("#leaderboard tbody tr").nth(6).locator("td").all_inner_texts()
    assert cells == [
        "pope", "llava", "vcd", "acc: acc ↑", "100", "0", "0.8700 ± 0.0100", "+0.0200 [+0.0050, +0.0350] **",
        "0.004", "1.02×", "3", "",
    ]  # fmt: skip
    texts = [page.locator("#leaderboard tbody tr").nth(i).locator("td").nth(DELTA_COL).inner_text() for i in (0, 1)]
    assert texts == ["baseline", "-0.0300 [-0.0500, -0.0100] ***"]
    assert "0.8500 ± 0.0100 (sd 0.0040)" in page.locator("#leaderboard tbody tr").nth(5).inner_text()
    assert page.locator("#leaderboard tbody tr").nth(8).locator("td").nth(DELTA_COL).inner_text() == "—"
    assert page.locator("tr.better").count() == 2 and page.locator("tr.worse").count() == 2  # chair's ↓ counted
    context.close()


def test_sort_by_delta_then_reverse(opened):
    page = opened.page
    header = page.locator("#leaderboard thead th").nth(DELTA_COL)
    header.locator("button").click()
    keys = _column(page, DELTA_COL)
    present = [float(k) for k in keys if k]
    assert present == sorted(present) == [-0.03, -0.01, 0.01, 0.02]
    assert keys[len(present) :] == [""] * 5  # missing last
    assert header.get_attribute("aria-sort") == "ascending"
    header.locator("button").click()
    keys = _column(page, DELTA_COL)
    assert [float(k) for k in keys if k] == [0.02, 0.01, -0.01, -0.03]
    assert keys[4:] == [""] * 5  # still last
    assert header.get_attribute("aria-sort") == "descending"
    opened.assert_clean()


def test_sort_by_text_column(opened):
    page = opened.page
    headers = page.locator("#leaderboard thead th")
    headers.nth(DELTA_COL).locator("button").click()
    headers.nth(METHOD_COL).locator("button").click()
    methods = _column(page, METHOD_COL)
    assert methods == sorted(methods, key=str.casefold)
    assert methods[:4] == ["none"] * 4 and methods[4:7] == ["opera", "opera", "PAI"]  # case-insensitive
    assert headers.nth(METHOD_COL).get_attribute("aria-sort") == "ascending"
    assert headers.nth(DELTA_COL).get_attribute("aria-sort") is None
    headers.nth(METHOD_COL).locator("button").click()
    assert _column(page, METHOD_COL) == sorted(methods, key=str.casefold, reverse=True)
    opened.assert_clean()


def test_filters_combine(opened):
    page = opened.page
    page.fill("#filter", "POPE")
    assert _visible_rows(page) == 5
    assert page.locator("#row-count").inner_text() == "5 of 9 rows"
    page.select_option("#filter-model", "qwen")
    assert _visible_rows(page) == 2
    assert page.locator("#row-count").inner_text() == "2 of 9 rows"
    page.fill("#filter", "")
    assert _visible_rows(page) == 4
    page.select_option("#filter-method", "vcd")
    assert _visible_rows(page) == 0
    assert page.locator("#row-count").inner_text() == "0 of 9 rows"
    page.select_option("#filter-model", "")  # "all"
    assert _visible_rows(page) == 2
    assert page.locator("#filter-task option").all_inner_texts() == ["all", "chair", "pope"]
    opened.assert_clean()


def test_model_output_is_text(opened):
    page = opened.page
    examples = page.locator("#changed table.examples")
    assert examples.count() == 1
    assert page.locator("#changed h3").inner_text() == "pope / llava / vcd"
    row = examples.locator("tbody tr").first
    assert row.locator("td").nth(5).inner_text() == PWNED_OUTPUT
    assert row.locator("td").nth(3).inner_text() == PWNED_BASELINE
    assert row.locator("td").nth(4).inner_text() == '{"answer": "yes"}'
    assert "<script>window.__pwned = 1</script>" in examples.inner_text()
    assert page.evaluate("window.__pwned") is None
    assert examples.locator("b").count() == 0
    assert page.locator("img[onerror]").count() == 0
    assert page.locator("script").count() == 1
    cell = examples.locator("tbody tr").nth(1).locator("td").nth(3)
    assert cell.evaluate("td => getComputedStyle(td).whiteSpace") == "pre-wrap"
    assert cell.inner_text() == "line one\n    indented"
    page.locator('#leaderboard a[href="#examples-6"]').click()  # the Changed count links to its examples
    assert page.evaluate("location.hash") == "#examples-6"
    opened.assert_clean()
