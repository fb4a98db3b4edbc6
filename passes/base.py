"""The pass base class, the registry of passes, and typed options parsed from text.

A pass is one class: ``name`` (used in pipelines), ``Options`` (a dataclass whose fields are the
pass's options; each field's ``metadata["doc"]`` documents it, units included), ``preserves``
(``"exact"``: outputs must stay equal within ``tolerance``, relative; ``"lossy"``: the error it adds
is measured and reported), and ``run(model, ctx) -> bool`` which rewrites the ``onnx_ir`` model
in place and says whether it changed anything. Its class docstring is what ``lowbit passes``
shows. Subclasses register themselves by defining ``name``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal

import onnx_ir as ir

from lowbit.core.errors import UserError, did_you_mean

_REGISTRY: dict[str, type["Pass"]] = {}


def option(default: Any, doc: str, **kwargs) -> Any:
    """A documented pass option: ``weights: int = option(4, "weight bits")``."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": doc}, **kwargs)
    return dataclasses.field(default=default, metadata={"doc": doc}, **kwargs)


@dataclasses.dataclass
class NoOptions:
    """A pass without options."""


class Pass:
    """Base of every lowbit pass; see the module docstring for the contract."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    preserves: ClassVar[Literal["exact", "lossy"]] = "exact"
    #: relative output tolerance for exact passes (max |Δ| / max |reference|)
    tolerance: ClassVar[float] = 1e-5
    #: the pass reads ``ctx.input_model``, a copy of the model before the pipeline's first pass
    wants_input_model: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
                raise RuntimeError(f"two passes are named {cls.name!r}: {_REGISTRY[cls.name]} and {cls}")
            _REGISTRY[cls.name] = cls

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def run(self, model: ir.Model, ctx) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        """Canonical pipeline text of this pass with its non-default options."""
        args = []
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            if value != _default_of(f):
                args.append(f"{f.name}={format_value(value)}")
        return f"{self.name}({','.join(args)})" if args else self.name

    def __repr__(self) -> str:
        return f"<pass {self.describe()}>"


def macs_budget(text: str, pass_name: str) -> float | None:
    """The fraction F of a ``budget='macs:F'`` option (0 < F ≤ 1), None when it is empty."""
    if not text:
        return None
    kind, _, value = text.partition(":")
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if kind != "macs" or not 0 < fraction <= 1:
        raise UserError(f"option 'budget' of pass {pass_name} must be 'macs:F' with 0 < F ≤ 1, not {text!r}")
    return fraction


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def registry() -> dict[str, type[Pass]]:
    """All registered passes by name (importing ``lowbit.passes`` registers the built-in ones)."""
    import lowbit.passes  # noqa: F401  - registers built-in passes

    return dict(sorted(_REGISTRY.items()))


def unregister(name: str) -> None:
    """Remove a pass from the registry (for passes defined in tests or plugins)."""
    _REGISTRY.pop(name, None)


def get_pass(name: str) -> type[Pass]:
    passes = registry()
    if name not in passes:
        raise UserError(f"unknown pass '{name}'{did_you_mean(name, passes)} (see 'lowbit passes')")
    return passes[name]


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def option_type_name(f: dataclasses.Field, hints: dict) -> str:
    tp = hints[f.name]
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(option_type_name_from(a) for a in typing.get_args(tp))
    return option_type_name_from(tp)


def option_type_name_from(tp) -> str:
    if tp is type(None):
        return "none"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {option_type_name_from(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, where: str) -> Any:
    """Convert a text (pipeline) or TOML value to the option's annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None):
                if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
                    return None
                continue
            try:
                return _convert(value, arg, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[-1] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        for choice in args:
            if str(choice) == str(value):
                return choice
        raise UserError(f"{where} must be one of {', '.join(map(str, args))}, not {value!r}{did_you_mean(str(value), map(str, args))}")
    if origin in (list, tuple):
        items = value
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            items = [v.strip() for v in split_top_level(text, ",")] if text else []
        if not isinstance(items, (list, tuple)):
            items = [items]
        converted = [_convert(v, args[0] if args else str, where) for v in items]
        return tuple(converted) if origin is tuple else converted
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} takes a table (use a recipe file), not {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{where} must be true or false, not {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{where} must be an integer, not {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be an integer, not {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a number, not {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where} must be text, not {value!r}")
        return str(value)
    raise TypeError(f"{where}: unsupported option type {tp}")


def make_options(pass_cls: type[Pass], raw: dict[str, Any]):
    """Build ``pass_cls.Options`` from raw values, naming the pass and option in every error."""
    fields = {f.name: f for f in dataclasses.fields(pass_cls.Options)}
    hints = typing.get_type_hints(pass_cls.Options)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise UserError(f"unknown option '{key}' for pass {pass_cls.name}{did_you_mean(key, fields)}")
        values[key] = _convert(value, hints[key], f"option '{key}' of pass {pass_cls.name}")
    try:
        options = pass_cls.Options(**values)
    except TypeError as exc:
        raise UserError(f"pass {pass_cls.name}: {exc}") from None
    check = getattr(options, "validate", None)
    if check is not None:
        check()  # raises UserError naming the option
    return options


def split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside parentheses, brackets, braces and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise UserError(f"unbalanced '{ch}' in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if quote or depth:
        raise UserError(f"unbalanced {'quote' if quote else 'parenthesis'} in {text!r}")
    parts.append(text[start:])
    return parts
