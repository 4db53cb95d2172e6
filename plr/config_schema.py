"""Declarative types and ranges of config keys.

Each field of the config dataclasses (``plr.config``) carries its check in
``dataclasses.field(metadata=...)``; :func:`key` writes both in one line::

    batch_size: int = key(2048, Int(min=1))
    samples: str = key("prefix", Choice("prefix", "sequence"))
    compile: bool = key(False, Bool())
    grad_clip: Optional[float] = key(None, Float(min=0, min_open=True), nullable=True)

``Spec.parse(name, value)`` returns the value in its type (numbers written as
text -- YAML 1.1 reads ``5e-4`` as a string -- become numbers) or raises
``plr.errors.UserError`` naming the key, the expected and the received value.
A field without a spec is checked by its annotation (int, float, bool, str,
Optional[...]).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Optional, Sequence

from .errors import UserError

_NUMBER_WORDS = {"inf", "+inf", "-inf", "infinity", "+infinity", "-infinity", ".inf", "+.inf", "-.inf", "nan", ".nan"}


def _fail(name: str, expected: str, value: Any):
    base = name.split("[")[0]
    raise UserError(f"{name}: expected {expected}, got {value!r}", f"fix {base} in the config or with --set {base}=...")


def _as_number(value: Any):
    """int/float as is; a numeric string (``5e-4``, ``1E-3``, ``.5``, ``1_000``) parsed; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        if text.lower() in _NUMBER_WORDS:
            return float(text.lower().replace(".", ""))
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return None
    return None


class Spec:
    expected = "a value"

    def parse(self, name: str, value: Any) -> Any:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Int(Spec):
    min: Optional[int] = None
    max: Optional[int] = None

    @property
    def expected(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer in [{self.min}, {self.max}]"
        if self.min is not None:
            return f"an integer >= {self.min}"
        return "an integer" if self.max is None else f"an integer <= {self.max}"

    def parse(self, name, value):
        num = _as_number(value)
        if num is None or (isinstance(num, float) and not (math.isfinite(num) and num.is_integer())):
            _fail(name, self.expected, value)
        num = int(num)
        if (self.min is not None and num < self.min) or (self.max is not None and num > self.max):
            _fail(name, self.expected, value)
        return num


@dataclasses.dataclass(frozen=True)
class Float(Spec):
    min: Optional[float] = None
    max: Optional[float] = None
    min_open: bool = False  # min itself excluded
    max_open: bool = False

    @property
    def expected(self) -> str:
        lo = "(" if self.min_open else "["
        hi = ")" if self.max_open else "]"
        if self.min is not None and self.max is not None:
            return f"a finite number in {lo}{self.min}, {self.max}{hi}"
        if self.min is not None:
            return f"a finite number {'>' if self.min_open else '>='} {self.min}"
        if self.max is not None:
            return f"a finite number {'<' if self.max_open else '<='} {self.max}"
        return "a finite number"

    def parse(self, name, value):
        num = _as_number(value)
        if num is None or not math.isfinite(num):
            _fail(name, self.expected, value)
        num = float(num)
        if self.min is not None and (num < self.min or (self.min_open and num == self.min)):
            _fail(name, self.expected, value)
        if self.max is not None and (num > self.max or (self.max_open and num == self.max)):
            _fail(name, self.expected, value)
        return num


def Probability() -> Float:
    """A probability in [0, 1)."""
    return Float(min=0.0, max=1.0, max_open=True)


@dataclasses.dataclass(frozen=True)
class Bool(Spec):
    expected = "true or false"

    def parse(self, name, value):
        if not isinstance(value, bool):
            _fail(name, self.expected, value)
        return value


@dataclasses.dataclass(frozen=True)
class Str(Spec):
    expected = "a string"

    def parse(self, name, value):
        if not isinstance(value, str):
            _fail(name, self.expected, value)
        return value


class Choice(Spec):
    def __init__(self, *choices: str):
        self.choices = choices
        self.expected = f"one of {list(choices)}"

    def parse(self, name, value):
        if not isinstance(value, str) or value not in self.choices:
            _fail(name, self.expected, value)
        return value


@dataclasses.dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    min_len: int = 0
    max_len: Optional[int] = None
    unique: bool = False

    @property
    def expected(self) -> str:
        size = f"at least {self.min_len} " if self.min_len else ""
        if self.max_len is not None and self.max_len == self.min_len:
            size = f"{self.min_len} "
        return f"a list of {size}{'distinct ' if self.unique else ''}values, each {self.item.expected}"

    def parse(self, name, value):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            _fail(name, self.expected, value)
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            _fail(name, self.expected, value)
        out = [self.item.parse(f"{name}[{i}]", v) for i, v in enumerate(value)]
        if self.unique and len(set(out)) != len(out):
            _fail(name, self.expected, value)
        return out


def key(default: Any = dataclasses.MISSING, spec: Optional[Spec] = None, *, nullable: bool = False,
        default_factory: Any = dataclasses.MISSING):
    """A dataclass field with its check: ``name: int = key(10, Int(min=1))``."""
    meta = {"spec": spec, "nullable": nullable}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _spec_from_annotation(tp) -> tuple:
    """(spec, nullable) of a field without metadata, from its type annotation."""
    nullable = False
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else None
    if tp is bool:
        return Bool(), nullable
    if tp is int:
        return Int(), nullable
    if tp is float:
        return Float(), nullable
    if tp is str:
        return Str(), nullable
    return None, nullable


def parse_section(cls, section: str, given: dict) -> dict:
    """The checked values of every field of dataclass ``cls`` (defaults filled)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        name = f"{section}.{f.name}"
        if f.name in given:
            value = given[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise UserError(f"{name}: missing", f"set it with --set {name}=...")
        spec, nullable = f.metadata.get("spec"), f.metadata.get("nullable")
        if spec is None:
            spec, nullable = _spec_from_annotation(hints[f.name])
        if value is None:
            if not nullable:
                _fail(name, spec.expected if spec else "a value", value)
            out[f.name] = None
            continue
        out[f.name] = spec.parse(name, value) if spec is not None else value
    return out
