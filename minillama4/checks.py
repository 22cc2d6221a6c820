"""Argument checks for the public entry points: each refusal names the argument and its value and
says what is accepted ("steps=2.5: must be a positive integer"), before any work starts.

Why not plain comparisons: NaN fails every `<` and `<=` test, so `if lr <= 0: raise` lets NaN
through; bool is an int subclass, so `True` would pass as a count; and a float step count only
fails later, deep in range() or torch.
"""

from __future__ import annotations

import math
import numbers


def is_int(value) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_rule(minimum: int) -> str:
    return {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")


def check_int(name: str, value, minimum: int = 0) -> int:
    """An integer >= minimum: TypeError for a non-integer, ValueError below the minimum."""
    if not is_int(value):
        raise TypeError(f"{name}={value!r}: must be {_int_rule(minimum)}")
    if value < minimum:
        raise ValueError(f"{name}={value!r}: must be {_int_rule(minimum)}")
    return int(value)


def check_real(name: str, value, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number in the range [low, high] (an end is excluded when its *_open is set;
    None: unbounded). NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}: must be a number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        if low is not None and high is not None:
            rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            rule = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            rule = f"{'<' if high_open else '<='} {high:g}"
        else:
            rule = ""
        raise ValueError(f"{name}={value!r}: must be a finite number {rule}".rstrip())
    return float(value)


def check_seed(value, allow_none: bool = False, name: str = "seed") -> None:
    """A seed torch's random generators take: an integer in [-2**63, 2**64) (or None, if allowed)."""
    if value is None and allow_none:
        return
    if not is_int(value):
        raise TypeError(f"{name}={value!r}: must be {'None or ' if allow_none else ''}an integer")
    if not -2**63 <= value < 2**64:
        raise ValueError(f"{name}={value}: must lie in [-2**63, 2**64), what torch's random generators take")


def check_bool(name: str, value) -> bool:
    """True or False only: a string "no" or the int 0 as a flag is a mistake (bool("no") is True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: must be True or False")
    return value


def check_choice(name: str, value, choices) -> None:
    if value not in tuple(choices):
        raise ValueError(f"{name}={value!r}: expected one of {tuple(choices)}")


def check_type(name: str, value, kind, hint: str = "") -> None:
    """isinstance(value, kind), else a TypeError naming what was given (and how to get the right thing)."""
    if not isinstance(value, kind):
        want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TypeError(f"{name} must be a {want}, got {type(value).__name__}{'; ' + hint if hint else ''}")


def check_finite_loss(loss: float, step: int, what: str = "loss") -> None:
    """Stop training at the first NaN/inf loss: the next optimizer step would turn every weight into NaN."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"{what} is {loss} at step {step}: training stopped before this step's update "
                                 "(a learning rate or loss coefficient too large, or NaN in the data)")
