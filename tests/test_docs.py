"""The documentation resolves: links, anchors, commands (README and docs/), README length, generated method pages.

Checked on the real files, and each check is shown to fail on a planted fault (a broken link or anchor in a copy
of the docs, a command naming a module / make target / config option that does not exist, a method docstring
edited without regenerating its page).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README_MAX_LINES = 200

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[(?:[^\]\n]|\][^(])*?\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.I)


# ---------------------------------------------------------------------------------------------- links and anchors
def doc_files(root: Path) -> list[Path]:
    """The Markdown files whose links are checked: README, CONTRIBUTING, CHANGELOG and everything under docs/."""
    top = [root / n for n in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md") if (root / n).is_file()]
    return top + sorted((root / "docs").rglob("*.md"))


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (links and headings there are not real)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (``-`` and ``_`` kept), spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file defines (headings, with GitHub's ``-1``, ``-2`` for repeats; ``<a id>``)."""
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out: set[str] = set(HTML_ANCHOR.findall(text))
    for _, title in HEADING.findall(text):
        base = slug(title)
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def broken_links(root: Path) -> list[str]:
    """``file: target (why)`` for every relative link or anchor that does not resolve."""
    bad = []
    for md in doc_files(root):
        for target in LINK.findall(prose(md.read_text())):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (md.parent / path_part).resolve() if path_part else md
            where = f"{md.relative_to(root)}: {target}"
            if not dest.exists():
                bad.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{where} (no heading with anchor #{anchor})")
    return bad


# ---------------------------------------------------------------------------------------------- README commands
def code_lines(text: str) -> list[str]:
    """Every command-like line of the file's code: fenced block lines and inline code spans (comments stripped)."""
    lines = []
    for block in FENCE.finditer(text):
        body = re.sub(r"\\\n\s*", " ", block.group(0)).split("\n")[1:-1]  # shell line continuations joined
        lines += [ln for ln in body if ln.strip()]
    lines += [span.strip("`") for span in INLINE_CODE.findall(FENCE.sub("", text))]
    return [re.split(r"\s+#\s", ln, maxsplit=1)[0].strip() for ln in lines]


def commands(text: str) -> dict[str, list[str]]:
    """The README's ``python -m X`` modules, ``make X`` targets and ``python run.py ...`` argument lists."""
    found: dict[str, list] = {"module": [], "make": [], "run": []}
    for line in code_lines(text):
        found["module"] += re.findall(r"python -m ([A-Za-z_][\w.]*)", line)
        found["make"] += re.findall(r"(?:^|[;&|]\s*)make ([A-Za-z][\w-]*)", line)
        for m in re.finditer(r"python run\.py((?: [^`;&|]*)?)$", line):
            if "<" not in m.group(1):  # a placeholder such as method=<m> is a pattern, not a command
                found["run"].append(shlex.split(m.group(1)))
    return found


def module_problem(root: Path, name: str) -> str | None:
    """Why ``python -m name`` cannot run from the repository root, or None."""
    base = root / name.replace(".", "/")
    if not (root / name.split(".")[0]).exists():  # not the project's own: an installed module (pytest, ...)
        spec = importlib.util.find_spec(name)
        return None if spec is not None else f"python -m {name}: no such module installed"
    for path in (base.with_suffix(".py"), base / "__main__.py"):
        if path.is_file():
            text = path.read_text()
            if path.name == "__main__.py" or '__name__ == "__main__"' in text or "__name__ == '__main__'" in text:
                return None
            return f'python -m {name}: {path.relative_to(root)} has no `if __name__ == "__main__"` entry point'
    return f"python -m {name}: no module {name.replace('.', '/')}.py (or package with __main__.py)"


def make_targets(root: Path) -> set[str]:
    """The targets the Makefile defines."""
    text = (root / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M))


def override_sets(args: list[str]) -> list[list[str]]:
    """The override lists a ``run.py`` command line composes: one per value of each swept key under ``-m``."""
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if not a.startswith("-")]
    if not multirun:
        return [overrides]
    choices = [(o.split("=", 1)[0], o.split("=", 1)[1].split(",")) if "=" in o else (o, [None]) for o in overrides]
    base = [f"{k}={v[0]}" if v[0] is not None else k for k, v in choices]
    out = [base]
    for i, (key, values) in enumerate(choices):
        for value in values[1:]:
            out.append([*base[:i], f"{key}={value}", *base[i + 1 :]])
    return out


def run_problem(args: list[str]) -> str | None:
    """Why ``python run.py args`` would not compose against ``conf/``, or None."""
    from harness.config import compose_config

    for overrides in override_sets(args):
        try:
            compose_config(overrides)
        except Exception as exc:  # Hydra raises several types; the message says which override is wrong
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"python run.py {' '.join(args)}: {first}"
    return None


def command_problems(root: Path, text: str) -> list[str]:
    """Every command of ``text`` (a README) that does not refer to something that exists."""
    found = commands(text)
    targets = make_targets(root)
    problems = [p for name in sorted(set(found["module"])) if (p := module_problem(root, name))]
    problems += [f"make {t}: no such Makefile target" for t in sorted(set(found["make"])) if t not in targets]
    problems += [p for args in found["run"] if (p := run_problem(args))]
    return problems


# ---------------------------------------------------------------------------------------------- the checks
def test_readme_is_short() -> None:
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move detail to docs/"


def test_links_and_anchors_resolve() -> None:
    assert doc_files(REPO), "no documentation found"
    assert broken_links(REPO) == []


def test_readme_commands_exist() -> None:
    text = (REPO / "README.md").read_text()
    found = commands(text)
    # the README's own quickstart and usage are among what is checked (so the extraction itself cannot go blind)
    assert {"demo", "test", "setup"} <= set(found["make"]), found["make"]
    assert {"reports.leaderboard", "checks.regress"} <= set(found["module"]), found["module"]
    assert any(a and a[0] == "-m" for a in found["run"]), found["run"]
    assert command_problems(REPO, text) == []


def test_every_documented_command_exists() -> None:
    problems = [
        f"{md.relative_to(REPO)}: {p}" for md in doc_files(REPO) for p in command_problems(REPO, md.read_text())
    ]
    assert problems == []


def test_method_pages_match_docstrings() -> None:
    gen = _generator()
    assert gen.main(["--check"]) == 0, "run python tools/gen_method_docs.py (make docs) and commit the pages"


def test_every_method_page_is_indexed() -> None:
    index = (REPO / "docs" / "methods" / "README.md").read_text()
    pages = sorted(p.name for p in _generator().expected())
    missing = [p for p in pages if f"]({p})" not in index]
    assert len(pages) >= 10 and missing == [], f"docs/methods/README.md does not link {missing}"


# ---------------------------------------------------------------------------------------------- they can fail
def test_planted_broken_link_and_anchor_fail(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "docs", root / "docs")
    for name in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md"):
        shutil.copy(REPO / name, root / name)
    for path in [*(REPO / name for name in ("methods", "conf", "tasks", "tools", "Makefile")), REPO / ".ci"]:
        (root / path.name).symlink_to(path)  # what the docs link to outside docs/
    assert broken_links(root) == []  # the copy is clean, so what follows is caused by the plants
    readme = root / "README.md"
    readme.write_text(readme.read_text() + "\nSee [the guide](docs/no_such_page.md).\n")
    usage = root / "docs" / "usage.md"
    usage.write_text(usage.read_text() + "\nSee [outputs](outputs.md#no-such-section).\n")
    bad = broken_links(root)
    assert bad == [
        "README.md: docs/no_such_page.md (no such file)",
        "docs/usage.md: outputs.md#no-such-section (no heading with anchor #no-such-section)",
    ]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("python -m harness.no_such_tool", "no module harness/no_such_tool.py"),
        ("python -m core.stats", "has no `if __name__"),
        ("make no-such-target", "no such Makefile target"),
        ("python run.py method=no_such_method", "no_such_method"),
        ("python run.py method=fastv method.no_such_key=1", "no_such_key"),
        ("python run.py -m method=none,no_such_method task=pope", "no_such_method"),
    ],
)
def test_planted_bad_command_fails(command: str, expected: str) -> None:
    problems = command_problems(REPO, f"```bash\n{command}   # planted\n```\n")
    assert len(problems) == 1 and expected in problems[0], problems


def test_planted_docstring_edit_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = _generator()
    root = tmp_path / "repo"
    for sub in ("methods", "conf/method", "docs/methods"):
        shutil.copytree(REPO / sub, root / sub)
    monkeypatch.setattr(gen, "ROOT", root)
    monkeypatch.setattr(gen, "PAGES", root / "docs" / "methods")
    assert gen.main(["--check"]) == 0
    var = root / "methods" / "var.py"
    var.write_text(var.read_text().replace("fraction of sink attention MOVED", "fraction of sink attention KEPT", 1))
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0  # regenerating brings page and docstring together
    assert "fraction of sink attention KEPT" in (root / "docs" / "methods" / "var.md").read_text()


def test_slug_follows_github() -> None:
    assert slug("Changes since that run (2026-12-05, CPU-verified only; GPU figures pending)") == (
        "changes-since-that-run-2026-12-05-cpu-verified-only-gpu-figures-pending"
    )
    assert slug("CARVE and IRI over `none`") == "carve-and-iri-over-none"
    assert slug("POPE (`task=pope`, `tasks/pope.py`)") == "pope-taskpope-taskspopepy"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_method_docs", REPO / "tools" / "gen_method_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
