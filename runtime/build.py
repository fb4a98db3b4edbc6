"""Build lowbit's native op library (``liblowbit_ops.so``) with CMake.

Used by ``setup.py`` at install time — loaded by file path, since the ``lowbit`` package is not
importable while it is being built, so this module imports nothing from ``lowbit`` — and by the
sanitizer test, which builds a separate ``-fsanitize=address,undefined`` copy.

onnxruntime's C API headers (``onnxruntime_c_api.h``, API version 21) come from ``ORT_INCLUDE_DIR``
when it is set, else from Debian's ``libonnxruntime-dev`` package of the ``trixie`` suite, fetched
with apt into a private state folder (the machine's own apt state is never touched) through the
Debian mirror this machine is already configured with, and cached in
``~/.cache/lowbit/ort-headers-<version>``. The same private-apt download (:func:`apt_fetch`) fetches
the aarch64 cross toolchain and qemu for ``lowbit.runtime.edge``, which also drives :func:`build`
(``cmake_args``) for cross builds. The library itself is not linked against libonnxruntime: it
calls onnxruntime only through the API table handed to ``RegisterCustomOps``.

Command line (the same thing setup.py does)::

    python runtime/build.py --out DIR [--sanitize] [--selftest]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent / "native"
LIBRARY_NAME = "liblowbit_ops.so"

#: the Debian package and suite the ORT headers come from (ORT 1.21, C API version 21)
ORT_PACKAGE = "libonnxruntime-dev"
ORT_SUITE = "trixie"
ORT_API_VERSION = 21


class BuildError(RuntimeError):
    """The native build cannot proceed; the message is one sentence naming the cause."""


def cache_dir() -> Path:
    """Where fetched headers are kept between builds (``$XDG_CACHE_HOME/lowbit`` or ~/.cache/lowbit)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowbit"


def ort_include_dir(env: dict | None = None) -> Path:
    """The folder holding ``onnxruntime_c_api.h``: ``ORT_INCLUDE_DIR`` if set, else fetched headers."""
    env = os.environ if env is None else env
    given = env.get("ORT_INCLUDE_DIR")
    if given:
        folder = Path(given).expanduser()
        if not (folder / "onnxruntime_c_api.h").is_file():
            raise BuildError(f"ORT_INCLUDE_DIR={given} does not contain onnxruntime_c_api.h "
                             "(point it at onnxruntime's include folder, or unset it to fetch the headers)")
        return folder
    return fetch_ort_headers()


_APT_SOURCES = ("/etc/apt/sources.list.d", "/etc/apt/sources.list")


def _debian_archives(paths) -> list[tuple[str, list[str]]]:
    """(URI, suites) of each entry for a Debian archive (a URI ending in ``/debian``, so not the
    security archive) in deb822 ``*.sources`` stanzas (``URIs:``/``Suites:``) and one-line
    ``sources.list`` entries (``deb [options] URI suite …``), in the order apt reads them."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.sources")) + sorted(p.glob("*.list"))
        elif p.is_file():
            files.append(p)
    entries: list[tuple[str, list[str]]] = []
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = {line.split(":", 1)[0].strip().lower(): line.split(":", 1)[1].split()
                          for line in stanza.splitlines() if ":" in line and not line.lstrip().startswith("#")}
                entries += [(u, fields.get("suites", [])) for u in fields.get("uris", [])]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 2 and words[0] == "deb":
                    entries.append((words[1], words[2:3]))
    return [(uri.rstrip("/"), suites) for uri, suites in entries if uri.rstrip("/").endswith("/debian")]


def debian_mirror(paths=_APT_SOURCES) -> str:
    """The URI of this machine's configured Debian archive (not the security archive), so the fetch
    goes through whatever mirror or proxy the machine already uses."""
    for uri, _ in _debian_archives(paths):
        return uri
    raise BuildError("no Debian archive is configured in /etc/apt to fetch onnxruntime's headers from "
                     "(set ORT_INCLUDE_DIR to a folder containing onnxruntime_c_api.h)")


def debian_suite(paths=_APT_SOURCES) -> str:
    """The release suite this machine is configured for (``bookworm``): the first suite of a Debian
    archive entry that is not a ``-updates``/``-security``/``-backports`` pocket; used to fetch
    packages that match the machine's own release (the cross toolchain and qemu of
    ``lowbit.runtime.edge``)."""
    for _, suites in _debian_archives(paths):
        for suite in suites:
            if not suite.endswith(("-updates", "-security", "-backports", "-proposed-updates")):
                return suite
    raise BuildError("no Debian release suite is configured in /etc/apt (a 'Suites:' line of the Debian archive)")


def apt_fetch(packages: list[str] | tuple[str, ...], suite: str, target: Path, *, expect: str,
              label: str | None = None, hint: str = "", prepare=None) -> Path:
    """Download Debian ``packages`` of ``suite`` with apt and unpack them all into ``target``; returns it.

    apt runs with a private sources list, lists and archive folder under a temporary directory, so
    the machine's apt configuration and state are left as they are (nothing is installed: the
    packages are only unpacked with ``dpkg -x``). ``expect`` is a path relative to ``target`` that
    marks a complete unpack: when it exists nothing is fetched. The unpacked tree is moved into place
    with one rename, so concurrent fetches never see a half-written folder and a failed fetch leaves
    nothing behind. ``prepare(tree)``, when given, adjusts the unpacked tree before it is moved into
    place (e.g. drops what is not needed, or wraps binaries). Errors are one :class:`BuildError` sentence naming ``label`` (default: the
    packages), the mirror and the apt step, followed by ``hint`` (e.g. how to skip the fetch).
    """
    target = Path(target)
    label = label or " ".join(packages)
    hint = f" {hint}" if hint else ""
    if (target / expect).exists():
        return target
    apt = shutil.which("apt-get")
    dpkg = shutil.which("dpkg")
    if apt is None or dpkg is None:
        raise BuildError(f"apt-get and dpkg are needed to fetch Debian's {label} and are not available{hint}")
    mirror = debian_mirror()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as tmp:
        d = Path(tmp)
        (d / "lists" / "partial").mkdir(parents=True)
        (d / "archives" / "partial").mkdir(parents=True)
        (d / "sources.list").write_text(f"deb {mirror} {suite} main\n")
        opts = ["-o", f"Dir::Etc::SourceList={d / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
                "-o", f"Dir::State::Lists={d / 'lists'}", "-o", f"Dir::Cache::Archives={d / 'archives'}",
                "-o", "APT::Sandbox::User=root", "-o", "Debug::NoLocking=true", "-q"]
        for args in (["update"], ["download", *packages]):
            run = subprocess.run([apt, *opts, *args], cwd=d, capture_output=True, text=True)
            # `apt-get update` exits 0 when the mirror cannot be reached, with "Err:"/"W: Failed to fetch" lines
            failed = [line for line in (run.stdout + run.stderr).splitlines()
                      if line.startswith(("Err:", "E:", "W: Failed to fetch"))]
            if run.returncode != 0 or failed:
                last = failed[-1:] or (run.stderr.strip() or run.stdout.strip()).splitlines()[-1:] or ["no output"]
                raise BuildError(f"fetching {label} ({suite}) from {mirror} failed at 'apt-get "
                                 f"{args[0]}': {last[0]}{hint}")
        unpacked = d / "root"
        for package in packages:
            debs = list(d.glob(f"{package}_*.deb"))
            if not debs:
                raise BuildError(f"apt-get download {package} left no .deb in {d}{hint}")
            subprocess.run([dpkg, "-x", str(debs[0]), str(unpacked)], check=True, capture_output=True)
        if prepare is not None:
            prepare(unpacked)
        if not (unpacked / expect).exists():
            raise BuildError(f"Debian's {label} ({suite}) has no {expect}{hint}")
        try:
            unpacked.rename(target)
        except OSError:  # another fetch won the race: its copy is as good as ours
            if not (target / expect).exists():
                raise
    return target


def fetch_ort_headers() -> Path:
    """Fetch and unpack Debian's ``libonnxruntime-dev`` (trixie) once; returns its include folder."""
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise BuildError("onnxruntime's C API headers are needed and apt-get/dpkg are not available to fetch "
                         f"Debian's {ORT_PACKAGE}: set ORT_INCLUDE_DIR to a folder containing onnxruntime_c_api.h")
    expect = "usr/include/onnxruntime/onnxruntime_c_api.h"
    target = apt_fetch([ORT_PACKAGE], ORT_SUITE, cache_dir() / f"ort-headers-{ORT_API_VERSION}", expect=expect,
                       hint="(set ORT_INCLUDE_DIR to skip the fetch)")
    return target / "usr" / "include" / "onnxruntime"


def find_cmake() -> str:
    """CMake from the ``cmake`` PyPI package (present in pip's build isolation), else from PATH."""
    try:
        import cmake  # the PyPI package: a self-contained CMake binary

        candidate = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if candidate.is_file():
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("cmake")
    if found is None:
        raise BuildError("cmake was not found (pip install cmake, or install it with the system's package manager)")
    return found


def build(out_dir: Path, *, build_dir: Path | None = None, sanitize: bool = False, selftest: bool = False,
          jobs: int | None = None, quiet: bool = False, cmake_args: list[str] | tuple[str, ...] = ()) -> Path:
    """Configure and build the CMake project in ``runtime/native``; returns the built library's path.

    ``out_dir`` receives ``liblowbit_ops.so`` (and the ``lowbit_selftest_<x>`` executables when
    ``selftest``); ``sanitize`` builds with ``-fsanitize=address,undefined`` (for the tests only);
    ``cmake_args`` are added to the configure step (a toolchain file, ``-DLOWBIT_HOST=ON`` …).
    """
    out_dir = Path(out_dir).resolve()
    include = ort_include_dir()
    cmake = find_cmake()
    owned_tmp = None
    if build_dir is None:
        owned_tmp = tempfile.TemporaryDirectory(prefix="lowbit-native-")
        build_dir = Path(owned_tmp.name)
    build_dir = Path(build_dir).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    configure = [cmake, "-S", str(NATIVE_DIR), "-B", str(build_dir), f"-DORT_INCLUDE_DIR={include}",
                 "-DCMAKE_BUILD_TYPE=Release", f"-DLOWBIT_OUTPUT_DIR={out_dir}",
                 f"-DLOWBIT_SANITIZE={'ON' if sanitize else 'OFF'}", f"-DLOWBIT_SELFTEST={'ON' if selftest else 'OFF'}", *cmake_args]
    jobs = jobs or os.cpu_count() or 1
    compile_ = [cmake, "--build", str(build_dir), "--parallel", str(jobs)]
    try:
        for step, cmd in (("configure", configure), ("compile", compile_)):
            run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if not quiet or run.returncode != 0:
                sys.stdout.write(run.stdout)  # pip shows it with -v, and always when the install fails
                sys.stdout.flush()
            if run.returncode != 0:
                raise BuildError(f"the CMake {step} step failed: {_first_error(run.stdout)} (full output above)")
    except FileNotFoundError as exc:
        raise BuildError(f"cannot run {exc.filename} ({exc.strerror})") from None
    finally:
        if owned_tmp is not None:
            owned_tmp.cleanup()
    library = out_dir / LIBRARY_NAME
    if not library.is_file():
        raise BuildError(f"the CMake build finished without producing {library}")
    return library


def _first_error(output: str) -> str:
    """The first line of a compiler/linker/CMake log that reports an error, for a one-line message."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        low = line.lower()
        if ("error" in low or "undefined reference" in low) and not low.lstrip().startswith(("gmake", "make", "ninja")):
            if line.startswith("CMake Error"):  # the reason is on the next non-empty line
                following = next((l.strip() for l in lines[i + 1:] if l.strip()), "")
                return f"{line.strip()} {following}".strip()
            return line.strip()
    return "see the output"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="folder that receives liblowbit_ops.so (default: runtime/)")
    parser.add_argument("--build-dir", type=Path, help="CMake build folder (default: a temporary one)")
    parser.add_argument("--sanitize", action="store_true", help="build with -fsanitize=address,undefined")
    parser.add_argument("--selftest", action="store_true", help="also build the lowbit_selftest executable")
    args = parser.parse_args(argv)
    try:
        print(build(args.out, build_dir=args.build_dir, sanitize=args.sanitize, selftest=args.selftest))
    except BuildError as e:
        print(f"lowbit native build: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
