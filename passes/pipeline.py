"""Pipelines as text and as recipe files.

Text: passes separated by commas, options in parentheses::

    fold-bn,cleanup,quantize(weights=4,block=32)

Recipe (TOML), the same content with typed values and room for tables::

    # either one line of pipeline text …
    pipeline = "fold-bn,cleanup"
    # … or one table per pass, in order
    [[pass]]
    name = "quantize"
    weights = 4
    block = 32

Both produce a list of configured ``Pass`` objects; ``describe_pipeline`` turns it back into text
that parses to the same list (it is stored in the output model's metadata for reproducibility).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from lowbit.core.errors import UserError
from lowbit.passes.base import Pass, get_pass, make_options, split_top_level

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_ITEM = re.compile(r"^\s*([A-Za-z][\w-]*)\s*(?:\((.*)\))?\s*$", re.S)


def parse_pipeline(text: str) -> list[Pass]:
    """Parse pipeline text into configured passes; every error names the pass and option."""
    if not text or not text.strip():
        raise UserError("the pipeline is empty; give passes such as 'fold-bn,cleanup'")
    passes = []
    for item in split_top_level(text, ","):
        if not item.strip():
            raise UserError(f"empty pass name in pipeline {text!r} (stray comma?)")
        match = _ITEM.match(item)
        if not match:
            raise UserError(f"cannot read {item.strip()!r} in pipeline {text!r}; write name(option=value,...)")
        name, args = match.group(1), match.group(2)
        cls = get_pass(name)
        raw = {}
        if args and args.strip():
            for arg in split_top_level(args, ","):
                if "=" not in arg:
                    raise UserError(f"option {arg.strip()!r} of pass {name} has no value; write option=value")
                key, value = arg.split("=", 1)
                key, value = key.strip(), value.strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                if key in raw:
                    raise UserError(f"option '{key}' of pass {name} is given twice")
                raw[key] = value
        passes.append(cls(make_options(cls, raw)))
    return passes


def load_recipe(path: str | Path) -> list[Pass]:
    """Read a TOML recipe: ``pipeline = "text"`` or ``[[pass]]`` tables (not both)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a valid TOML recipe ({exc})") from None
    unknown = set(data) - {"pipeline", "pass"}
    if unknown:
        raise UserError(f"{path}: unknown recipe key '{sorted(unknown)[0]}'; use 'pipeline' or [[pass]] tables")
    if ("pipeline" in data) == ("pass" in data):
        raise UserError(f"{path}: give either 'pipeline = \"...\"' or [[pass]] tables, exactly one of them")
    if "pipeline" in data:
        if not isinstance(data["pipeline"], str):
            raise UserError(f"{path}: 'pipeline' must be text such as \"fold-bn,cleanup\"")
        try:
            return parse_pipeline(data["pipeline"])
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
    tables = data["pass"]
    if not isinstance(tables, list) or not tables:
        raise UserError(f"{path}: [[pass]] must be a list of tables, each with a 'name'")
    passes = []
    for index, table in enumerate(tables, 1):
        table = dict(table)
        name = table.pop("name", None)
        if not isinstance(name, str):
            raise UserError(f"{path}: [[pass]] number {index} has no 'name'")
        try:
            cls = get_pass(name)
            passes.append(cls(make_options(cls, table)))
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
    return passes


def describe_pipeline(passes: list[Pass]) -> str:
    return ",".join(p.describe() for p in passes)
