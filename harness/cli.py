"""The command line before Hydra composes it: unknown group options and keys, with a did-you-mean, in a blink.

``check_overrides(sys.argv[1:])`` runs first in ``run.py``. It parses the overrides with Hydra's own parser and
reads only the YAML files under ``conf/`` (no torch, no model code), so ``python run.py method=vra`` answers
``unknown method 'vra'; did you mean 'var'?`` at once instead of Hydra's multi-line list after the imports. It
checks

* every value of a config group (``model=``, ``method=``, ``task=``, ``logger=``, sweeps ``method=a,b`` included)
  against the options in ``conf/<group>/``;
* a plain top-level key (``limt=20``) against ``conf/config.yaml``;
* a nested key (``method.rhoo=0.5``) against the YAML of each chosen option; keys added with ``+`` / ``++`` are
  left to the schema (:mod:`harness.schema`), which refuses the unknown ones after composition;
* an override Hydra's grammar cannot read (``task.questions=/data/pope_{split}.json``, unquoted): named, with the
  quoting that works;
* a given ``output_root``: created now, so one that cannot be is one line, not Hydra's traceback.

Anything it does not understand is left to Hydra.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.registry import close_matches

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "method", "task", "logger")


class UnknownOptionError(UserError):
    """An unknown group option or config key on the command line."""


class OverrideSyntaxError(UserError):
    """An override Hydra's grammar cannot read (typically an unquoted ``{`` or ``*``)."""


def options(group: str, conf: Path = CONF) -> list[str]:
    """The options of a config group (the YAML files in ``conf/<group>/``), sorted."""
    return sorted(p.stem for p in (conf / group).glob("*.yaml"))


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
    close = close_matches(value, choices, n=2)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _defaults(conf: Path) -> dict[str, str]:
    from omegaconf import OmegaConf

    out = {}
    for entry in OmegaConf.to_container(OmegaConf.load(conf / "config.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            out.update({str(k): str(v) for k, v in entry.items()})
    return out


def _values(override: Any) -> list[str]:
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    value = override.value()
    return [str(value)] if isinstance(value, str | int | float) else []


def check_overrides(args: Sequence[str], conf: Path = CONF) -> None:
    """Refuse unknown group options and keys on a ``run.py`` command line (see the module docstring).

    Raises:
        UnknownOptionError: One line naming the override, the closest valid name and the valid ones.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    overrides = [a for a in args if not a.startswith("-")]
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception:  # Hydra's grammar refused one: name it, with the usual fix
        _syntax_error(parser, overrides)
        return
    _check_output_root(parsed)
    chosen = {g: [v] for g, v in _defaults(conf).items()}
    for o in parsed:
        if o.key_or_group in GROUPS and o.package is None and not o.is_delete():
            chosen[o.key_or_group] = values = _values(o)
            known = options(o.key_or_group, conf)
            for value in values:
                if value not in known:
                    raise UnknownOptionError(
                        f"unknown {o.key_or_group} {value!r}{_did_you_mean(value, known)} (options: {', '.join(known)})"
                    )
    top = OmegaConf.load(conf / "config.yaml")
    top_keys = [k for k in top if k not in ("defaults", "hydra")] + list(GROUPS)
    for o in parsed:
        key = o.key_or_group
        if o.is_add() or o.is_force_add() or o.is_delete() or "/" in key or key.startswith("hydra"):
            continue
        head, _, rest = key.partition(".")
        if head not in top_keys:
            raise UnknownOptionError(
                f"unknown option {key!r}{_did_you_mean(head, top_keys)} (top-level options: {', '.join(top_keys)}; "
                "add a new key with +key=value)"
            )
        if head in GROUPS and rest:
            _check_nested(head, rest, chosen.get(head, []), conf)


def _syntax_error(parser: Any, overrides: list[str]) -> None:
    """Raise one line naming the first override Hydra's grammar refuses (braces, globs, spaces must be quoted)."""
    for arg in overrides:
        try:
            parser.parse_overrides([arg])
        except Exception as exc:
            why = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            key, _, value = arg.partition("=")
            raise OverrideSyntaxError(
                f"cannot read the override {arg!r} ({why}); a value with {{ }}, *, =, spaces or quotes must be "
                f"quoted for Hydra, e.g. \"{key}='{value}'\""
            ) from None


def _check_output_root(parsed: list[Any]) -> None:
    """Create a given ``output_root`` now (Hydra would, with a traceback when it cannot): one line if it cannot."""
    given = [o.value() for o in parsed if o.key_or_group == "output_root" and not o.is_sweep_override()]
    if not given or not isinstance(given[-1], str) or "${" in given[-1]:
        return  # the default, or an interpolation Hydra resolves
    root = given[-1]
    try:
        Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output_root={root!r} cannot be created ({exc.strerror or exc}); choose a writable "
                        "directory") from None  # fmt: skip


def _check_nested(group: str, rest: str, chosen: list[str], conf: Path) -> None:
    """``group.rest`` must name a key of at least one chosen option's YAML."""
    from omegaconf import OmegaConf

    misses = []
    for option in chosen:
        path = conf / group / f"{option}.yaml"
        if not path.exists():
            return
        node: Any = OmegaConf.to_container(OmegaConf.load(path))
        for i, part in enumerate(rest.split(".")):
            if not isinstance(node, dict):
                return  # below a leaf or a list: Hydra decides
            if part not in node:
                known = [k for k in node if k != "_target_"]
                where = ".".join([group, *rest.split(".")[:i]])
                misses.append((option, f"{where}.{part}", known, part))
                break
            node = node[part]
        else:
            return  # found in this option
    if misses:
        option, key, known, part = misses[0]
        raise UnknownOptionError(
            f"{key} is not an option of {group} {option!r}{_did_you_mean(part, known)} (options: {', '.join(known)}; "
            f"add a new key with +{key}=value)"
        )
