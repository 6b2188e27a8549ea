"""Hyperparameter validation, in one place: every merge method, surgery kind and aligner
checks its ``__init__`` arguments with these functions, so a bad value in a yaml or an
override is one ConfigError naming the setting, what was expected and what was given.

Each check returns the value converted to its type (``int``, ``float``, ``str``, ``tuple``),
so a constructor reads ``self.steps = validate.integer("merge.steps", steps)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Integral, Real
from typing import Any

from mergelab.errors import ConfigError


def _fail(name: str, expected: str, value: Any, optional: bool) -> ConfigError:
    return ConfigError(f"{name} must be {expected}{' or null' if optional else ''}, got {value!r}")


def integer(
    name: str, value: Any, minimum: int | None = 1, *, optional: bool = False
) -> int | None:
    """``value`` as an int ≥ ``minimum`` (``None`` allowed with ``optional``). Whole floats
    (``4.0``) pass; fractions, bools and strings do not: a count is never rounded silently."""
    expected = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    if value is None:
        if optional:
            return None
        raise _fail(name, expected, value, optional)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _fail(name, expected, value, optional)
    if not isinstance(value, Integral) and not (math.isfinite(value) and value == int(value)):
        raise _fail(name, expected, value, optional)
    out = int(value)
    if minimum is not None and out < minimum:
        raise _fail(name, expected, value, optional)
    return out


def number(
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    optional: bool = False,
) -> float | None:
    """``value`` as a finite float within the given bounds (``gt``/``ge`` below,
    ``lt``/``le`` above; ``None``: unbounded), ``None`` allowed with ``optional``."""
    parts = [f"> {gt}" if gt is not None else "", f">= {ge}" if ge is not None else ""]
    parts += [f"< {lt}" if lt is not None else "", f"<= {le}" if le is not None else ""]
    bounds = " and ".join(p for p in parts if p)
    expected = f"{bounds} (a finite number)" if bounds else "a finite number"
    if value is None:
        if optional:
            return None
        raise _fail(name, expected, value, optional)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise _fail(name, expected, value, optional)
    out = float(value)
    if (
        (gt is not None and not out > gt)
        or (ge is not None and not out >= ge)
        or (lt is not None and not out < lt)
        or (le is not None and not out <= le)
    ):
        raise _fail(name, expected, value, optional)
    return out


def fraction(name: str, value: Any, *, open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a fraction in [0, 1] (``open_low``: 0 excluded; ``open_high``: 1
    excluded)."""
    interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a fraction in {interval}, got {value!r}")
    out = float(value)
    low_ok = out > 0 if open_low else out >= 0
    high_ok = out < 1 if open_high else out <= 1
    if not (low_ok and high_ok):
        raise ConfigError(f"{name} must be a fraction in {interval}, got {value!r}")
    return out


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


def betas(name: str, value: Any) -> tuple[float, float]:
    """Adam's (β1, β2): two numbers in [0, 1)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{name} must be two numbers in [0, 1), got {value!r}")
    if len(value) != 2:
        raise ConfigError(f"{name} must be two numbers in [0, 1), got {list(value)}")
    b1, b2 = (fraction(f"{name}[{i}]", b, open_high=True) for i, b in enumerate(value))
    return b1, b2
