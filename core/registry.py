"""Name → class registries with "did you mean" errors.

Example:
    >>> PARSERS = Registry("parser")
    >>> @PARSERS.register("pope_official")
    ... def parse(text): ...
    >>> PARSERS.get("pope_oficial")  # doctest: +SKIP
    KeyError: unknown parser 'pope_oficial'; did you mean 'pope_official'? Known: pope_official
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from core.errors import UserError

T = TypeVar("T")


def close_matches(value: object, choices: Iterable[object], n: int = 3, cutoff: float = 0.5) -> list[str]:
    """The choices closest to ``value`` for a "did you mean": difflib's ratio, a transposition typo ranked first.

    Only the best and those tied with it (within 0.05) are returned, at most ``n``: ``vra`` gives ``['var']``, not
    ``['vhr', 'var']`` (both share two letters with it; ``var`` has exactly its letters).
    """
    value = str(value)
    scored = []
    for choice in map(str, choices):
        score = difflib.SequenceMatcher(None, value, choice).ratio()
        if score >= cutoff:
            scored.append((score + (0.5 if sorted(choice) == sorted(value) else 0.0), choice))
    if not scored:
        return []
    best = max(score for score, _ in scored)
    return [c for score, c in sorted(scored, key=lambda sc: (-sc[0], sc[1])) if score >= best - 0.05][:n]


class UnknownNameError(UserError, KeyError):
    """Raised when a registry lookup fails; the message lists the close matches and every valid name."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly.
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection of plug-ins (parsers, methods, adapters, tasks)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that files an object under ``name``; a second object under the same name is an error."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object filed under ``name`` or raise :class:`UnknownNameError` with suggestions."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self._unknown_message(name)) from None

    def _unknown_message(self, name: str) -> str:
        close = close_matches(name, self._items)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} Known: {', '.join(sorted(self._items))}"

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
