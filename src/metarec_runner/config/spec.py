"""What one config value may be: :class:`Spec` and its constructors (Int, Number, Choice...)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from metarec_runner.errors import ConfigError

_ABSENT = object()
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def show(value: object) -> str:
    """A value as the user would type it: ``null``, ``true``, ``'abc'``, ``[5, 10]``, ``0.01``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Spec:
    """What one key accepts.

    Attributes:
        kind: ``int`` | ``number`` | ``bool`` | ``text`` | ``choice`` | ``ints`` (a list of
            integers) | ``names`` (a list of strings) | ``ratios`` (three fractions summing
            to 1) | ``device`` | ``mapping``.
        ge, gt, le, lt: bounds of a number, an integer, or of every item of ``ints``.
        choices: allowed values of ``choice``, or of every item of ``names``.
        nullable: ``null`` is allowed (and means what the YAML comment says).
        empty: an empty list is allowed (``ints``, ``names``).
        distinct: the entries of ``ints`` must differ (cut-offs do; hidden widths need not).
        example: a valid value, shown in the fix (``like 0.01``).
        why: why zero is wrong where it is out of range, shown with it (``a zero learning
            rate trains nothing``).
    """

    kind: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] = ()
    nullable: bool = False
    empty: bool = True
    distinct: bool = True
    example: str = ""
    why: str = ""

    # -- descriptions ----------------------------------------------------------------------
    def _bounds(self) -> str:
        parts = []
        if self.gt is not None:
            parts.append(f"> {_fmt(self.gt)}")
        if self.ge is not None:
            parts.append(f">= {_fmt(self.ge)}")
        if self.lt is not None:
            parts.append(f"< {_fmt(self.lt)}")
        if self.le is not None:
            parts.append(f"<= {_fmt(self.le)}")
        return " and ".join(parts)

    def _number_words(self, noun: str) -> str:
        if self.gt == 0 and self.ge is None and self.lt is None and self.le is None:
            return f"a positive {noun}"
        bounds = self._bounds()
        article = "an" if noun[0] in "aeiou" else "a"
        return f"{article} {noun} {bounds}" if bounds else f"{article} {noun}"

    def describe(self) -> str:
        """The accepted values in words: ``a positive number``, ``an integer >= 1 or null``."""
        words = {
            "int": lambda: self._number_words("integer"),
            "number": lambda: self._number_words("number"),
            "bool": lambda: "true or false",
            "text": lambda: "a non-empty string",
            "choice": lambda: "one of " + ", ".join(self.choices),
            "ints": lambda: ("a" if self.empty else "a non-empty") + " list of "
                            + ("distinct " if self.distinct else "") + "integers"
                            + (f" {self._bounds()}" if self._bounds() else ""),
            "names": lambda: ("a" if self.empty else "a non-empty") + " list of distinct names"
                             + (f" from {', '.join(self.choices)}" if self.choices else ""),
            "ratios": lambda: "three fractions > 0 summing to 1 (train, validation, test)",
            "device": lambda: "one of auto, cpu, cuda, cuda:N",
            "mapping": lambda: "a group of keys",
        }[self.kind]()
        return f"{words} or null" if self.nullable else words

    def _fix(self, key: str) -> str:
        if self.kind == "choice":
            null = " or null" if self.nullable else ""
            return f"choose one of {', '.join(self.choices)}{null}"
        like = f" like {self.example}" if self.example else ""
        if self.nullable:
            return f"set {key} to {self.describe()[: -len(' or null')]}{like}, or null"
        return f"set {key} to {self.describe()}{like}"

    def _error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(key, f"{problem}; {self._fix(key)}")

    # -- the check -------------------------------------------------------------------------
    def _in_range(self, x: float) -> bool:
        return ((self.gt is None or x > self.gt) and (self.ge is None or x >= self.ge)
                and (self.lt is None or x < self.lt) and (self.le is None or x <= self.le))

    def _range_problem(self, x: float, shown: str) -> str:
        why = f" ({self.why})" if self.why and x == 0 else ""
        return f"must be {self._bounds()}, got {shown}{why}"

    def check(self, key: str, value: object) -> None:
        """Raise a one-line ConfigError naming ``key`` unless ``value`` is accepted."""
        if value is None:
            if self.nullable:
                return
            noun = {"int": "an integer", "number": "a number", "bool": "true or false",
                    "text": "a string", "choice": "one of " + ", ".join(self.choices)}
            raise self._error(key, f"must be {noun.get(self.kind, self.describe())}, got null")
        getattr(self, f"_check_{self.kind}")(key, value)

    def _check_int(self, key: str, value: object) -> None:
        if not _is_int(value):
            raise self._error(key, f"must be an integer, got {show(value)}")
        if not self._in_range(value):
            raise self._error(key, self._range_problem(value, show(value)))

    def _check_number(self, key: str, value: object) -> None:
        if not _is_number(value):
            raise self._error(key, f"must be a number, got {show(value)}")
        if not math.isfinite(value):
            raise self._error(key, f"must be a finite number, got {show(value)}")
        if not self._in_range(value):
            raise self._error(key, self._range_problem(value, show(value)))

    def _check_bool(self, key: str, value: object) -> None:
        if not isinstance(value, bool):
            raise self._error(key, f"must be true or false, got {show(value)}")

    def _check_text(self, key: str, value: object) -> None:
        if not isinstance(value, str) or not value.strip():
            raise self._error(key, f"must be a non-empty string, got {show(value)}")

    def _check_choice(self, key: str, value: object) -> None:
        if not isinstance(value, str) or value not in self.choices:
            raise self._error(key, f"unknown value {show(value)}")

    def _check_device(self, key: str, value: object) -> None:
        if not isinstance(value, str) or not _DEVICE.match(value):
            raise self._error(key, f"unknown device {show(value)}")

    def _check_mapping(self, key: str, value: object) -> None:
        if not isinstance(value, dict):
            raise self._error(key, f"must be a group of keys, got {show(value)}")

    def _list(self, key: str, value: object) -> list:
        if not isinstance(value, list):
            raise self._error(key, f"must be a list, got {show(value)}")
        if not value and not self.empty:
            raise self._error(key, "must not be empty")
        return value

    def _check_ints(self, key: str, value: object) -> None:
        items = self._list(key, value)
        bad = [v for v in items if not _is_int(v)]
        if bad:
            raise self._error(key, f"must hold integers only, got {show(bad[0])} in {show(items)}")
        bad = [v for v in items if not self._in_range(v)]
        if bad:
            why = f" ({self.why})" if self.why and bad[0] == 0 else ""
            raise self._error(key, f"every entry must be {self._bounds()}, got {show(bad[0])} "
                                   f"in {show(items)}{why}")
        if self.distinct and len(set(items)) != len(items):
            raise self._error(key, f"has repeated entries {show(items)}")

    def _check_names(self, key: str, value: object) -> None:
        items = self._list(key, value)
        bad = [v for v in items if not isinstance(v, str)
               or (self.choices and v not in self.choices)]
        if bad:
            what = "unknown name" if isinstance(bad[0], str) else "not a name"
            raise self._error(key, f"{what} {show(bad[0])} in {show(items)}")
        if len(set(items)) != len(items):
            raise self._error(key, f"has repeated entries {show(items)}")

    def _check_ratios(self, key: str, value: object) -> None:
        if (not isinstance(value, list) or len(value) != 3
                or not all(_is_number(v) and math.isfinite(v) for v in value)):
            raise self._error(key, f"must be a list of three numbers, got {show(value)}")
        if min(value) <= 0:
            raise self._error(key, f"every fraction must be > 0 (validation selects the epoch, "
                                   f"test reports), got {show(value)}")
        if abs(sum(value) - 1.0) > 1e-6:
            raise self._error(key, f"must sum to 1, got {show(value)} (sum {sum(value):g})")


# -- spec constructors (read as the table below) ----------------------------------------------

def Int(ge: int | None = None, *, gt: int | None = None, le: int | None = None,
        nullable: bool = False, example: object = "", why: str = "") -> Spec:
    """An integer (booleans are not integers here)."""
    return Spec("int", ge=ge, gt=gt, le=le, nullable=nullable, example=str(example), why=why)


def Number(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
           le: float | None = None, nullable: bool = False, example: object = "",
           why: str = "") -> Spec:
    """A finite int or float."""
    return Spec("number", gt=gt, ge=ge, lt=lt, le=le, nullable=nullable, example=str(example),
                why=why)


def Bool() -> Spec:
    """``true`` or ``false``."""
    return Spec("bool")


def Text(nullable: bool = False, example: str = "") -> Spec:
    """A non-empty string."""
    return Spec("text", nullable=nullable, example=example)


def Choice(*choices: str, nullable: bool = False) -> Spec:
    """One of ``choices``."""
    return Spec("choice", choices=choices, nullable=nullable)


def Ints(ge: int | None = None, *, empty: bool = True, distinct: bool = True, example: str = "",
         why: str = "") -> Spec:
    """A list of integers, each ``>= ge`` (distinct unless ``distinct=False``)."""
    return Spec("ints", ge=ge, empty=empty, distinct=distinct, example=example, why=why)


def Names(*choices: str, empty: bool = True, nullable: bool = False,
          example: str = "") -> Spec:
    """A list of distinct strings (from ``choices`` when given)."""
    return Spec("names", choices=choices, empty=empty, nullable=nullable, example=example)


# -- the runtime modules' choices, restated (tests compare them with the modules') -----------

