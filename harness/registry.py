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
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from harness.errors import UserError

T = TypeVar("T")


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
        close = difflib.get_close_matches(str(name), list(self._items), n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} Known: {', '.join(sorted(self._items))}"

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
