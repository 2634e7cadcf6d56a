"""A tiny name -> factory registry, so configs pick implementations by explicit names."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from clipx.errors import ClipxError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; ``get`` of an unknown name suggests the closest registered one."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = item
            return item

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ClipxError(f"unknown {self.kind} '{name}'{hint}; known: {', '.join(self.list())}")
        return self._items[name]

    def list(self) -> list[str]:
        return sorted(self._items)
