"""Where lowbit's native op library is, and what it runs on.

``pip install .`` (or ``pip install -e .``) builds ``liblowbit_ops.so`` next to this file
(runtime/build.py). ``LOWBIT_OPS_LIBRARY`` overrides that path — e.g. a sanitizer or cross build —
and ``LOWBIT_OPS_LIBRARY=none`` hides the library, as on a machine where it could not be built
(sessions then fall back to the numpy reference ops, or say how to get the library).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from lowbit.core.errors import UserError

LIBRARY_NAME = "liblowbit_ops.so"
ENV = "LOWBIT_OPS_LIBRARY"


def path() -> Path | None:
    """The native library to register, or None when it is not built (or disabled)."""
    override = os.environ.get(ENV)
    if override:
        if override.lower() == "none":
            return None
        given = Path(override).expanduser()
        if not given.is_file():
            raise UserError(f"{ENV}={override} is not a file (unset it to use the installed library, or set "
                            f"{ENV}=none to run without it)")
        return given.resolve()
    built = Path(__file__).resolve().parent / LIBRARY_NAME
    return built if built.is_file() else None


def available() -> bool:
    """True when the native library is there to be registered."""
    return path() is not None


@functools.lru_cache(maxsize=None)
def _load(library: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library))
    for name in ("lowbit_isa", "lowbit_version"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = []
    return lib


def isa() -> str | None:
    """The instruction set the native kernels run on here ("avx512vnni", "avx2", "scalar"; on
    aarch64 "neon-dotprod", "neon", "scalar"), or None.

    It is chosen once per process (``LOWBIT_ISA=scalar|avx2|neon`` caps it) — by the same loaded copy of
    the library that onnxruntime uses, since both open it by the same path.
    """
    library = path()
    return None if library is None else _load(library).lowbit_isa().decode()


def version() -> str | None:
    """The lowbit version the native library was built from, or None without a library."""
    library = path()
    return None if library is None else _load(library).lowbit_version().decode()
