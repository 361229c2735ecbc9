"""Write ``docs/methods/<name>.md`` from each method module's docstring, so the manual never drifts from the code.

    python tools/gen_method_docs.py           # (re)write every page
    python tools/gen_method_docs.py --check   # exit 1, naming the pages, when a page differs from its docstring

One page per ``conf/method/<name>.yaml`` option (the module is the config's ``_target_``) and per plug-in in
:data:`PLUGINS`. A page is a header (source, config, run command, supported families read from the class's
``families`` attribute), the module docstring converted from reStructuredText-flavoured Google style to Markdown,
and a link to the method's section of the hand-written ``docs/methods/results.md`` when it has one. The module is
read with :mod:`ast`, never imported, so the generator needs neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "methods"
#: modules documented without a ``conf/method`` option: name → (module path, how it is switched on)
PLUGINS: dict[str, tuple[str, str]] = {
    "debias": ("methods/debias.py", "method=fastv method.debias=true  # or method=fastervlm"),
}
ROLE = re.compile(r":(?:mod|class|meth|func|data|attr):`~?([^`]+)`")
LITERAL = re.compile(r"``([^`]+)``")
FIELD = re.compile(r"^ {4}(\S.*)$")
NAMES = re.compile(r"^([A-Za-z_][\w, ]*?) \(")  # a field's name(s) before its "(type, default ...)"


def targets() -> dict[str, tuple[str, str]]:
    """Every documented method: name → (module file relative to the repo, the ``run.py`` override that selects it)."""
    out: dict[str, tuple[str, str]] = {}
    for cfg in sorted((ROOT / "conf" / "method").glob("*.yaml")):
        target = next(
            (ln.split(":", 1)[1].strip() for ln in cfg.read_text().splitlines() if ln.startswith("_target_:")), ""
        )
        module = target.rsplit(".", 1)[0]
        out[cfg.stem] = (module.replace(".", "/") + ".py", f"method={cfg.stem}")
    out.update(PLUGINS)
    return out


def inline(text: str) -> str:
    """Sphinx roles and double-backtick literals to Markdown code spans."""
    return LITERAL.sub(r"`\1`", ROLE.sub(r"`\1`", text))


def to_markdown(doc: str) -> str:
    """Convert a module docstring to Markdown: title line, ``::`` literal blocks, Google-style field sections."""
    lines = doc.splitlines()
    out = [f"# {inline(lines[0]).rstrip('.')}"]
    i = 1
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and not line.startswith(" "):  # literal block follows
            out.append(inline(line.rstrip()[:-1]))
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                block.append(lines[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            out += ["", "```bash", *block, "```", ""]
            continue
        if line.endswith(":") and not line.startswith(" ") and i + 1 < len(lines) and FIELD.match(lines[i + 1]):
            out += [inline(line), ""]  # a Google-style section: one bullet per field, continuation lines joined
            i += 1
            while i < len(lines) and lines[i].startswith("    "):
                if lines[i].startswith("        "):
                    out[-1] += " " + inline(lines[i].strip())
                else:
                    out.append("- " + inline(NAMES.sub(r"`\1` (", lines[i].strip(), count=1)))
                i += 1
            if i < len(lines) and lines[i].strip():
                out.append("")
            continue
        out.append(inline(line))
        i += 1
    return "\n".join(out).rstrip() + "\n"


def families(tree: ast.Module) -> str:
    """The ``families`` class attribute of the module's method class, as text ("all" when ``None`` or absent)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign | ast.Assign):
            names = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "families" for t in names) and node.value is not None:
                value = ast.literal_eval(node.value)
                return "all" if value is None else ", ".join(f"`{f}`" for f in value)
    return "all"


def page(name: str, module: str, select: str) -> str:
    """The Markdown page of method ``name`` (module file ``module``, selected by ``select``)."""
    tree = ast.parse((ROOT / module).read_text())
    doc = ast.get_docstring(tree)
    if not doc:
        raise SystemExit(f"{module} has no module docstring; every method documents itself there")
    body = to_markdown(doc)
    title, rest = body.split("\n", 1)
    config = f"conf/method/{name}.yaml"
    head = [
        title,
        "",
        f"<!-- generated by tools/gen_method_docs.py from {module}; edit the docstring, not this page -->",
        "",
        f"Source: [`{module}`](../../{module})"
        + (f" · config: [`{config}`](../../{config})" if (ROOT / config).is_file() else "")
        + f" · families: {families(tree)} · run: `python run.py {select}`",
    ]
    results = PAGES / "results.md"
    if results.is_file() and re.search(rf"^## {re.escape(name)}\b", results.read_text(), re.M):
        rest = rest.rstrip() + f"\n\nResults on the shipped checkpoints: [results.md#{name}](results.md#{name}).\n"
    return "\n".join(head) + "\n" + rest


def expected() -> dict[Path, str]:
    """Every generated page's path and the text it must hold."""
    return {PAGES / f"{name}.md": page(name, module, select) for name, (module, select) in targets().items()}


def main(argv: list[str] | None = None) -> int:
    """Write the pages, or with ``--check`` report the ones that differ (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a page differs")
    args = parser.parse_args(argv)
    stale = [p for p, text in expected().items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"{p.relative_to(ROOT)} differs from its module docstring: run python tools/gen_method_docs.py")
        return 1 if stale else 0
    PAGES.mkdir(parents=True, exist_ok=True)
    for p, text in expected().items():
        p.write_text(text)
    print(f"wrote {len(targets())} pages to {PAGES.relative_to(ROOT)}/ ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
