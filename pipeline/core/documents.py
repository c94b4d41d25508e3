"""Checking the JSON documents read from disk (store attributes, stats.json) before they are used.

Anything read from disk is untrusted input: a store copied from elsewhere, edited by hand or
damaged. :func:`check_document` compares a parsed document with a small declarative spec and
raises one StoreError naming the key path, so a wrong type never surfaces later as a
``KeyError``, ``TypeError`` or ``AttributeError`` deep inside a stage.

Specs: a type (``str``, ``int``, ``float``, ``bool``, ``dict``, ``list``; ``int`` never matches
``bool``, ``float`` also takes ints), ``[spec]`` (a list of such items), ``(spec, spec)`` (a list
of exactly these), ``{"key": spec}`` (a mapping with at least these keys), :class:`OneOf`,
:data:`ANY`, or :class:`Maybe` (the spec or null).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import StoreError

__all__ = ["ANY", "HEX64", "Maybe", "OneOf", "check_document"]

MAX_ITEMS = 10**7  # longer lists than this in a document are refused, not walked


@dataclass(frozen=True)
class OneOf:
    """One of the given values."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Maybe:
    """``spec`` or null."""

    spec: Any


@dataclass(frozen=True)
class _Hex:
    length: int


ANY = object()
MISSING = "a value"
HEX64 = _Hex(64)  # a sha256 in hex


def _fits(value: Any, spec: Any) -> str | None:
    """None when ``value`` fits ``spec``; else a short description of what was expected."""
    if spec is ANY:
        return None
    if isinstance(spec, Maybe):
        return None if value is None else _fits(value, spec.spec)
    if isinstance(spec, OneOf):
        ok = any(type(value) is type(v) and value == v for v in spec.values)
        return None if ok else "one of " + ", ".join(repr(v) for v in spec.values)
    if isinstance(spec, _Hex):
        ok = (
            isinstance(value, str)
            and len(value) == spec.length
            and all(c in "0123456789abcdef" for c in value)
        )
        return None if ok else f"{spec.length} hex digits"
    if spec is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if spec is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else "a number"
    if isinstance(spec, type):
        return None if isinstance(value, spec) else f"a {spec.__name__}"
    if isinstance(spec, list | tuple) and not isinstance(value, list):
        return "a list"
    if isinstance(spec, list | tuple):
        if len(value) > MAX_ITEMS:
            return f"a list of at most {MAX_ITEMS} items"
        if isinstance(spec, tuple) and len(value) != len(spec):
            return f"a list of {len(spec)} items"
        return None
    if isinstance(spec, Mapping):
        return None if isinstance(value, Mapping) else "a mapping"
    raise TypeError(f"bad spec {spec!r}")


def _walk(value: Any, spec: Any, path: str) -> tuple[str, str] | None:
    """(key path, expectation) of the first mismatch, or None."""
    problem = _fits(value, spec)
    if problem is not None:
        return path, problem
    if isinstance(spec, Maybe) and value is not None:
        return _walk(value, spec.spec, path)
    if isinstance(spec, list):
        for i, item in enumerate(value):
            found = _walk(item, spec[0], f"{path}[{i}]")
            if found:
                return found
    elif isinstance(spec, tuple):
        for i, (item, item_spec) in enumerate(zip(value, spec, strict=True)):
            found = _walk(item, item_spec, f"{path}[{i}]")
            if found:
                return found
    elif isinstance(spec, Mapping):
        for key, item_spec in spec.items():
            where = f"{path}.{key}" if path else key
            if key not in value:
                return where, MISSING
            found = _walk(value[key], item_spec, where)
            if found:
                return found
    return None


def check_document(doc: Any, spec: Any, where: object, fix: str) -> None:
    """Raise StoreError naming ``where``, the key path and ``fix`` unless ``doc`` fits ``spec``."""
    found = _walk(doc, spec, "")
    if found is not None:
        key, expected = found
        what = f"{key} is missing" if expected is MISSING else f"{key or 'it'} is not {expected}"
        raise StoreError(f"{where}: {what}; it was edited or comes from another version. {fix}")
