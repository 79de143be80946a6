"""Value checks shared by every place numbers enter zotune: config fields and command-line numbers
(named ranges), the training step's loss, g and lr, replay-log lines and federated replies
(finiteness). Each caller turns a failed check into its own error naming the file, line or field."""

from __future__ import annotations

import math
import numbers
import sys

# name -> (test, what the value was expected to be). Every test also requires a finite number.
RANGES = {
    "positive": (lambda x: x > 0, "a positive number"),
    "non_negative": (lambda x: x >= 0, "a non-negative number"),
    "unit_interval": (lambda x: 0 <= x < 1, "a number in [0, 1)"),
    "closed_unit": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
    "fraction": (lambda x: 0 < x <= 1, "a number in (0, 1]"),
}


def all_finite(values) -> bool:
    """True when values (a number, a tensor, or a sequence of numbers) holds only finite numbers."""
    torch = sys.modules.get("torch")  # a tensor means torch is loaded; config checks do not load it
    if torch is not None and isinstance(values, torch.Tensor):
        return bool(torch.isfinite(values).all())
    if _is_number(values):
        return math.isfinite(values)
    try:
        return all(_is_number(x) and math.isfinite(x) for x in values)
    except TypeError:  # not a sequence
        return False


def _is_number(x) -> bool:
    """A real number (Python's or numpy's), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def range_error(value, rule: str | None) -> str | None:
    """None when value is within the named range (None: any finite number), else what was expected.
    Integers name themselves: "a positive integer"."""
    if not _is_number(value):
        return None  # not a number: types are checked where the value is parsed
    if not all_finite(value):
        return "a finite number"
    if rule is None:
        return None
    test, expected = RANGES[rule]
    if test(value):
        return None
    return expected.replace("number", "integer") if isinstance(value, int) else expected
