"""Builds lowbit's native op library (runtime/native, CMake) as part of every install.

``pip install .``, ``pip install -e .`` and ``pip wheel .`` all run ``build_ext``, which builds
``liblowbit_ops.so`` with runtime/build.py and puts it in the package's ``runtime/`` folder (for an
editable install: in the source tree). All other metadata lives in pyproject.toml.

If the build fails, the install fails with the cause, unless ``LOWBIT_NATIVE=0`` is set: then lowbit
installs without the library, and sessions on models with lowbit ops use the numpy reference
(onnxruntime-extensions) or say how to get the library. See DEVELOPERS.md.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent


def _load_build_module():
    # the lowbit package is not importable while it is being built: load runtime/build.py by path
    spec = importlib.util.spec_from_file_location("_lowbit_native_build", ROOT / "runtime" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class NativeLibrary(Extension):
    """``liblowbit_ops.so``: not a Python extension module, just a file the CMake project builds."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class BuildNative(build_ext):
    """build_ext that runs CMake (runtime/build.py) instead of compiling a Python extension."""

    def get_ext_filename(self, fullname: str) -> str:
        # a plain file name (no ABI tag): onnxruntime loads it by path, Python never imports it
        if fullname.split(".")[-1] == "liblowbit_ops":
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, NativeLibrary):
            return super().build_extension(ext)
        build = _load_build_module()
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # a fresh CMake build folder each time: safe when several installs run at once (for
            # incremental rebuilds while developing: python runtime/build.py --build-dir build/native)
            built = build.build(target.parent,
                                jobs=self.parallel if isinstance(self.parallel, int) and self.parallel > 0 else None)
        except build.BuildError as exc:
            raise CompileError(f"lowbit: building the native op library failed: {exc}. Set LOWBIT_NATIVE=0 to "
                               "install without it (lowbit's ops then run on the slow numpy reference, "
                               "with onnxruntime-extensions)") from None
        if built.resolve() != target.resolve():
            raise CompileError(f"lowbit: the native build produced {built}, expected {target}")


try:
    from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel as _bdist_wheel


class BdistWheel(_bdist_wheel):
    """A wheel tagged py3-none-<platform>: the library is native code but not tied to a CPython ABI."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


native = os.environ.get("LOWBIT_NATIVE", "1") != "0"
if not native:
    print("lowbit: LOWBIT_NATIVE=0, installing without the native op library", file=sys.stderr)

setup(
    ext_modules=[NativeLibrary("lowbit.runtime.liblowbit_ops")] if native else [],
    cmdclass={"build_ext": BuildNative, "bdist_wheel": BdistWheel} if native else {},
)
