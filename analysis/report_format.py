"""Plain-text formatting shared by reports: aligned tables and human-readable quantities.

``format_table(rows, headers, align="lrr")`` lays rows out in columns separated by two spaces,
with a dashed rule under the header; ``align`` gives one letter per column (``l`` left, ``r``
right; default: numbers right, text left). ``human_bytes`` uses decimal units (1 kB = 1000 B,
as file managers and ``ls -h --si`` do), ``human_count`` the suffixes K, M, G, T (powers of 1000).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["format_table", "human_bytes", "human_count", "format_number", "jsonable"]


def _sig3(n: float) -> str:
    """Three significant digits without exponent: 1.23, 12.3, 123."""
    return f"{n:.2f}" if abs(n) < 9.995 else f"{n:.1f}" if abs(n) < 99.95 else f"{n:.0f}"


def _human(n: float | None, units: tuple[str, ...], small: str) -> str:
    """Scale by 1000 until below 1000; three significant digits; ``None`` → ``"-"``."""
    if n is None:
        return "-"
    n = float(n)
    if abs(n) < 1000:
        return f"{n:g}{small}"
    for unit in units:
        n /= 1000
        if abs(n) < 999.5 or unit == units[-1]:
            break
    return f"{_sig3(n)} {unit}"


def human_bytes(n: float | None) -> str:
    """``1234567`` → ``"1.23 MB"`` (decimal units); ``None`` → ``"-"``."""
    return _human(n, ("kB", "MB", "GB", "TB"), " B")


def human_count(n: float | None) -> str:
    """``12_300_000`` → ``"12.3 M"``, ``950`` → ``"950"``; ``None`` → ``"-"``."""
    return _human(n, ("K", "M", "G", "T", "P"), "")


def format_number(x: Any, digits: int = 4) -> str:
    """Floats with ``digits`` significant digits (``inf`` stays ``inf``), ints as is, None as ``-``."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}g}"
    return str(x)


def _is_number_text(text: str) -> bool:
    text = text.strip().rstrip("%×x")
    for suffix in (" B", " kB", " MB", " GB", " TB", " K", " M", " G", " T", " P"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    try:
        float(text)
    except ValueError:
        return text in ("inf", "-inf", "nan", "-")
    return True


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], align: str | Sequence[str] | None = None,
                 *, indent: str = "") -> str:
    """An aligned text table; cells are converted with ``format_number`` (strings kept as given).

    ``align``: one ``l``/``r`` per column; by default a column is right-aligned when every
    non-empty cell in it looks like a number (``12``, ``1.5 MB``, ``3.2 M``, ``98%``).
    """
    cells = [[format_number(c) if not isinstance(c, str) else c for c in row] for row in rows]
    ncols = len(headers)
    for row in cells:
        if len(row) != ncols:
            raise ValueError(f"table row has {len(row)} cells, expected {ncols}: {row}")
    if align is None:
        align = [
            "r" if cells and all(_is_number_text(r[i]) for r in cells if r[i] != "") else "l" for i in range(ncols)
        ]
    align = list(align)
    if len(align) != ncols:
        raise ValueError(f"align has {len(align)} entries for {ncols} columns")
    widths = [max([len(str(h))] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)]
        return (indent + "  ".join(parts)).rstrip()

    out = [line([str(h) for h in headers]), indent + "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars made Python numbers and ±inf / nan made the strings ``"inf"``,
    ``"-inf"``, ``"nan"``, so ``json.dumps(..., allow_nan=False)`` accepts it (strict JSON)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj
