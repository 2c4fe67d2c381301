"""Checks of one setting's value, as config rules and plug-ins declare them (a dataset adapter's and a method's
`setting_checks`, a protocol's): each takes (key, value) and returns what would be valid, or None if the value
is. `bench.experiment.config_checks` applies them to a composed configuration."""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable

from bench.core.errors import UserError

Check = Callable[[str, Any], "str | None"]  # (key, value) -> what is valid, or None if the value is

def show(value: Any) -> str:
    return "null" if value is None else repr(value)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int | None = None, high: int | None = None, null: bool = False) -> Check:
    def check(key: str, v: Any) -> str | None:
        if v is None and null:
            return None
        if not is_int(v) or (low is not None and v < low) or (high is not None and v > high):
            bounds = " and ".join(b for b in (low is not None and f">= {low}", high is not None and f"<= {high}") if b)
            return f"an integer{' ' + bounds if bounds else ''}{' or null' if null else ''}"
        return None

    return check


def number(low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False,
           null: bool = False) -> Check:
    def check(key: str, v: Any) -> str | None:
        if v is None and null:
            return None
        ok = is_number(v) and (low is None or (v > low if low_open else v >= low)) and \
            (high is None or (v < high if high_open else v <= high))
        if ok:
            return None
        if low is not None and high is not None:
            span = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            span = f" {'>' if low_open else '>='} {low:g}"
        else:
            span = ""
        return f"a number{span}{' or null' if null else ''}"

    return check


def one_of(options: Iterable[Any] | Callable[[], Iterable[Any]], null: bool = False) -> Check:
    def check(key: str, v: Any) -> str | None:
        valid = list(options() if callable(options) else options)
        if (v is None and null) or (v is not None and v in valid and not isinstance(v, (list, dict))):
            return None
        return f"one of {', '.join(map(str, valid))}{' or null' if null else ''}"

    return check


def switch(key: str, v: Any) -> str | None:
    return None if isinstance(v, bool) or v == "auto" else "true, false or auto"


def text(null: bool = False) -> Check:
    def check(key: str, v: Any) -> str | None:
        return None if (isinstance(v, str) and v.strip()) or (v is None and null) else \
            f"a non-empty text{' or null' if null else ''}"

    return check


def list_of(item: Check, nonempty: bool = False, distinct: bool = False, length: int | None = None) -> Check:
    """A list whose every element passes `item`; its errors name the element (`eval.seeds[1]='x'`)."""

    def check(key: str, v: Any) -> str | None:
        if not isinstance(v, list) or (nonempty and not v):
            return f"a {'non-empty ' if nonempty else ''}list, e.g. [a, b]"
        if length is not None and len(v) != length:
            return f"a list of {length}"
        for i, element in enumerate(v):
            problem = item(f"{key}[{i}]", element)
            if problem:
                raise UserError(f"{key}[{i}]={show(element)} is not valid: expected {problem}")
        if distinct and len({repr(e) for e in v}) != len(v):
            return "a list without repeated entries"
        return None

    return check


def folder_or_null(key: str, v: Any) -> str | None:
    if v is not None and not (isinstance(v, str) and os.path.isdir(os.path.expanduser(v))):
        raise UserError(f"{key}: {v} does not exist or is not a folder (null reads the dataset's copy in the "
                        f"synthetic benchmark)")
    return None


def number_or_numbers(key: str, v: Any) -> str | None:
    if is_number(v) or (isinstance(v, list) and v and all(is_number(x) for x in v)):
        return None
    return "a number, or a list of one number per channel"
