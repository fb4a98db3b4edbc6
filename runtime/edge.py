"""Deploy lowbit models to edge devices: native and cross builds of the op library and the C++ host.

A device runs a lowered model without Python: the folder ``build(arch, out_dir)`` makes holds

- ``lowbit-run``, the C++ host (``runtime/native/host``; one binary, onnxruntime's public C++ API),
- ``liblowbit_ops.so``, lowbit's op library (registered by the host from beside itself),
- ``libonnxruntime.so.1``, onnxruntime itself (the host's RPATH is ``$ORIGIN``),

and is copied to the device as is. Everything comes from public archives through a cache
(``~/.cache/lowbit``, ``$XDG_CACHE_HOME`` respected), each entry written once and moved into place
with one rename, so concurrent runs never see a half-written one:

- onnxruntime for the host: the npm package ``onnxruntime-node`` (:data:`ORT_NODE_VERSION`), whose
  tarball holds self-contained Linux builds for x86-64 and arm64 (they need only glibc ≥ 2.17 and
  libstdc++) of the same version as the headers the library is compiled against (API 21). The
  tarball is checked against the registry's sha512 ``integrity``, pinned here, before use.
- the aarch64 cross toolchain: Debian's ``g++-12-aarch64-linux-gnu`` and the arm64 cross libc /
  libstdc++ of this machine's own release (``bookworm``), fetched with apt on a private state and
  unpacked with ``dpkg -x`` (nothing is installed; :func:`lowbit.runtime.build.apt_fetch`). The
  compiler is relocatable; the generated CMake toolchain file gives it ``--sysroot`` = the unpacked
  tree, so neither the host's headers (``/usr/include``) nor its libraries can leak into the
  build, and the libc linker scripts' absolute paths resolve inside the tree.
- qemu: Debian's ``qemu-user-static`` of the same release, so aarch64 binaries (the self-tests, the
  host) run here as ``qemu-aarch64-static -L <sysroot> binary …`` — never through binfmt_misc.

:func:`cached_build` keeps one build per target and digest of the native sources (what ``lowbit
deploy`` ships); :func:`run_host` runs a model with a build's ``lowbit-run`` and returns its outputs
and ``--json`` report, for comparing a target against this machine's Python run within
:data:`FLOAT_TOLERANCE` / :data:`LOWBIT_TOLERANCE`.

Why outputs differ between targets at all: onnxruntime's own float kernels (NEON vs AVX) sum in
different orders (~2e-7 relative), and lowbit's int8 ops round their activations to int8 codes,
where a tiny input difference can flip a code. The native sources are compiled with
``-ffp-contract=off`` (CMakeLists.txt) so that GCC does not also fuse ``a*b+c`` into FMAs on aarch64
(its default there; x86-64's portable files have no FMA to fuse): with it, the rotated W2 tiny LLaMA
differed by 5e-3, without it by 2.6e-7 (DEVELOPERS.md, "Edge").
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from lowbit.core.errors import UserError
from lowbit.runtime import build as native_build

#: onnxruntime for the host: npm's onnxruntime-node (ORT 1.21.0, C API 21 = the headers' version)
ORT_NODE_VERSION = "1.21.0"
ORT_NODE_URL = f"https://registry.npmjs.org/onnxruntime-node/-/onnxruntime-node-{ORT_NODE_VERSION}.tgz"
#: ``dist.integrity`` of https://registry.npmjs.org/onnxruntime-node/1.21.0
ORT_NODE_INTEGRITY = "sha512-NeaCX6WW2L8cRCSqy3bInlo5ojjQqu2fD3D+9W5qb5irwxhEyWKXeH2vZ8W9r6VxaMPUan+4/7NDwZMtouZxEw=="
ORT_LIBRARY_NAME = "libonnxruntime.so.1"

#: the targets: lowbit's name (``uname -m``) → npm's folder name and the ELF e_machine
ARCHES = {"x86_64": ("x64", 62), "aarch64": ("arm64", 183)}

#: Debian's packages that make a working, relocatable aarch64 cross compiler plus the arm64 runtime
#: (libc, libstdc++, libgcc_s) under ``usr/aarch64-linux-gnu``, for this machine's release
CROSS_PACKAGES = ("g++-12-aarch64-linux-gnu", "gcc-12-aarch64-linux-gnu", "cpp-12-aarch64-linux-gnu",
                  "gcc-12-aarch64-linux-gnu-base", "binutils-aarch64-linux-gnu", "libc6-dev-arm64-cross",
                  "libc6-arm64-cross", "linux-libc-dev-arm64-cross", "libstdc++-12-dev-arm64-cross",
                  "libstdc++6-arm64-cross", "libgcc-12-dev-arm64-cross", "libgcc-s1-arm64-cross")
CROSS_GCC_VERSION = "12"
QEMU_PACKAGE = "qemu-user-static"

HOST_NAME = "lowbit-run"

#: max |Δ| / max |reference| allowed between this machine's Python run and a target's host run of
#: the same model. Float models: the issue's bar (onnxruntime's x86-64 and arm64 float kernels
#: differ by ~2e-7). Models with lowbit's int8-activation ops: a float difference that small can
#: still move an activation across a rounding boundary of its int8 code, which changes the outputs
#: by a quantization step (~1e-3 relative per flipped code; 5e-3 measured when FMA contraction
#: flipped many, 3e-7 without); DEVELOPERS.md, "Edge", has the measurements.
FLOAT_TOLERANCE = 1e-4
LOWBIT_TOLERANCE = 1e-2


class EdgeError(RuntimeError):
    """Fetching, building or running for a target failed; the message is one sentence naming why
    (download and build failures of :mod:`lowbit.runtime.build` are re-raised as this)."""


class HostError(EdgeError):
    """``lowbit-run`` exited with an error; ``returncode`` and ``stderr`` are the host's own."""

    def __init__(self, message: str, returncode: int, stderr: str):
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def host_arch() -> str:
    """This machine's architecture in lowbit's names (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _check_arch(arch: str) -> str:
    if arch not in ARCHES:
        raise UserError(f"target architecture {arch!r} is not supported (choose one of {', '.join(ARCHES)})")
    return arch


def cache_dir() -> Path:
    return native_build.cache_dir()


# ------------------------------------------------------------------------------------ onnxruntime


def onnxruntime_library(arch: str) -> Path:
    """onnxruntime's shared library for ``arch`` (``…/onnxruntime-node-<v>/<arch>/libonnxruntime.so.1``).

    The first call downloads onnxruntime-node's npm tarball (~80 MB), checks its sha512 against
    :data:`ORT_NODE_INTEGRITY`, and keeps only the two Linux libraries (the tarball is deleted).
    """
    arch = _check_arch(arch)
    root = cache_dir() / f"onnxruntime-node-{ORT_NODE_VERSION}"
    wanted = root / arch / ORT_LIBRARY_NAME
    if wanted.is_file():
        return wanted
    root.parent.mkdir(parents=True, exist_ok=True)
    algorithm, _, expected = ORT_NODE_INTEGRITY.partition("-")
    with tempfile.TemporaryDirectory(prefix=f".{root.name}-", dir=root.parent) as tmp:
        tarball = Path(tmp) / "package.tgz"
        digest = hashlib.new(algorithm)
        try:
            with urllib.request.urlopen(ORT_NODE_URL, timeout=60) as response, open(tarball, "wb") as f:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise EdgeError(f"downloading onnxruntime-node {ORT_NODE_VERSION} from {ORT_NODE_URL} failed: {reason}") from None
        got = base64.b64encode(digest.digest()).decode()
        if got != expected:
            raise EdgeError(f"the onnxruntime-node {ORT_NODE_VERSION} tarball from {ORT_NODE_URL} has {algorithm} "
                            f"{got}, not the pinned {expected}: refusing to use it")
        unpacked = Path(tmp) / "root"
        with tarfile.open(tarball, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, (npm_arch, machine) in ARCHES.items():
                member = members.get(f"package/bin/napi-v3/linux/{npm_arch}/{ORT_LIBRARY_NAME}")
                if member is None or not member.isfile():
                    raise EdgeError(f"the onnxruntime-node {ORT_NODE_VERSION} tarball has no regular file "
                                    f"bin/napi-v3/linux/{npm_arch}/{ORT_LIBRARY_NAME}")
                (unpacked / name).mkdir(parents=True)
                with tar.extractfile(member) as src, open(unpacked / name / ORT_LIBRARY_NAME, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if elf_machine(unpacked / name / ORT_LIBRARY_NAME) != machine:
                    raise EdgeError(f"onnxruntime-node's linux/{npm_arch}/{ORT_LIBRARY_NAME} is not an {name} library")
        tarball.unlink()
        try:
            unpacked.rename(root)
        except OSError:  # another process won the race: its copy is as good as ours
            if not wanted.is_file():
                raise
    return wanted


def elf_machine(path: Path) -> int | None:
    """The ELF header's ``e_machine`` of ``path`` (62: x86-64, 183: aarch64), None if not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


# ------------------------------------------------------------------------------------ toolchain


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """A cross toolchain unpacked in the cache: compilers, strip, the target's sysroot, CMake file."""

    arch: str
    root: Path          # the unpacked Debian packages (the compiler's --sysroot)
    gcc: Path
    gxx: Path
    strip: Path
    sysroot: Path       # the target's runtime files (lib/ld-linux-aarch64.so.1, libc, libstdc++): qemu -L
    cmake_file: Path    # a CMAKE_TOOLCHAIN_FILE


def cross_toolchain(arch: str = "aarch64") -> Toolchain:
    """Debian's aarch64 cross compiler for this machine's release, fetched once into the cache."""
    arch = _check_arch(arch)
    if arch != "aarch64" or host_arch() != "x86_64":
        raise UserError(f"a cross toolchain for {arch} on a {host_arch()} machine is not available "
                        "(lowbit fetches one for aarch64 on x86_64 only)")
    prefix = "aarch64-linux-gnu"
    gxx_rel = f"usr/bin/{prefix}-g++-{CROSS_GCC_VERSION}"
    try:
        root = native_build.apt_fetch(CROSS_PACKAGES, native_build.debian_suite(),
                                      cache_dir() / "aarch64-toolchain", expect=gxx_rel,
                                      label="the aarch64 cross toolchain (g++-12-aarch64-linux-gnu)",
                                      prepare=_wrap_binutils)
    except native_build.BuildError as exc:
        raise EdgeError(str(exc)) from None
    bin_ = root / "usr" / "bin"
    tc = Toolchain(arch=arch, root=root, gcc=bin_ / f"{prefix}-gcc-{CROSS_GCC_VERSION}", gxx=root / gxx_rel,
                   strip=bin_ / f"{prefix}-strip", sysroot=root / "usr" / prefix,
                   cmake_file=root / "lowbit-toolchain.cmake")
    text = _toolchain_file(tc, prefix)
    if not tc.cmake_file.is_file() or tc.cmake_file.read_text() != text:
        tmp = tc.cmake_file.with_name(f".{tc.cmake_file.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(tc.cmake_file)
    return tc


_WRAPPER = """#!/bin/sh
# generated by lowbit.runtime.edge: Debian's cross binutils need their own libbfd/libopcodes, which
# an unpacked (not installed) package keeps in usr/lib/x86_64-linux-gnu, off the loader's path
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/../lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/.binutils/%s" "$@"
"""


def _wrap_binutils(tree: Path) -> None:
    """Make the unpacked cross binutils (as, ld, ar, strip …) run from where they are.

    They link ``lib{bfd,opcodes,ctf}-…-arm64.so``, which dpkg -x leaves in ``usr/lib/x86_64-linux-gnu``
    of the tree, where the dynamic loader does not look: each such program moves to
    ``usr/bin/.binutils/`` and its name becomes a shell script that runs it with that folder on
    ``LD_LIBRARY_PATH`` (the driver's ``usr/aarch64-linux-gnu/bin/{as,ld}`` links point at these names).
    """
    bin_ = tree / "usr" / "bin"
    real = bin_ / ".binutils"
    for program in sorted(bin_.glob("aarch64-linux-gnu-*")):
        if program.is_symlink() or not program.is_file():
            continue
        data = program.read_bytes()
        if not data.startswith(b"\x7fELF") or not re.search(rb"lib(bfd|opcodes|ctf|sframe)[-.\w]*\.so", data):
            continue
        real.mkdir(exist_ok=True)
        program.rename(real / program.name)
        program.write_text(_WRAPPER % program.name)
        program.chmod(0o755)


def _toolchain_file(tc: Toolchain, prefix: str) -> str:
    # --sysroot=<root>: the driver's built-in /usr/include and /lib/<triplet> (the host's!) become
    # paths inside the tree that do not exist, while its relocated own paths (usr/<triplet>/include,
    # usr/<triplet>/lib, usr/lib/gcc-cross) still resolve; ld resolves libc.so's absolute
    # /usr/<triplet>/lib/… inside the sysroot.
    bin_ = tc.root / "usr" / "bin"
    return "\n".join([
        "# generated by lowbit.runtime.edge: Debian's aarch64 cross compiler unpacked in lowbit's cache",
        "set(CMAKE_SYSTEM_NAME Linux)",
        "set(CMAKE_SYSTEM_PROCESSOR aarch64)",
        f'set(CMAKE_SYSROOT "{tc.root}")',
        f'set(CMAKE_C_COMPILER "{tc.gcc}")',
        f'set(CMAKE_CXX_COMPILER "{tc.gxx}")',
        f'set(CMAKE_AR "{bin_ / (prefix + "-ar")}" CACHE FILEPATH "")',
        f'set(CMAKE_RANLIB "{bin_ / (prefix + "-ranlib")}" CACHE FILEPATH "")',
        f'set(CMAKE_STRIP "{tc.strip}" CACHE FILEPATH "")',
        f'set(CMAKE_FIND_ROOT_PATH "{tc.sysroot}")',
        "set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)",
        "",
    ])


def emulator(arch: str) -> list[str]:
    """The command prefix that runs an ``arch`` binary here: [] natively, qemu-user for aarch64."""
    arch = _check_arch(arch)
    if arch == host_arch():
        return []
    tc = cross_toolchain(arch)
    rel = "usr/bin/qemu-aarch64-static"
    try:
        root = native_build.apt_fetch([QEMU_PACKAGE], native_build.debian_suite(), cache_dir() / "qemu-user-static",
                                      expect=rel, label=f"Debian's {QEMU_PACKAGE}", prepare=_keep_only(rel))
    except native_build.BuildError as exc:
        raise EdgeError(str(exc)) from None
    return [str(root / rel), "-L", str(tc.sysroot)]


def _keep_only(rel: str):
    """A ``prepare`` for apt_fetch that drops everything but ``rel`` (qemu-user-static unpacks to
    370 MB of emulators for every processor; one is needed)."""
    def prepare(tree: Path) -> None:
        keep = tree / rel
        if keep.is_file():
            kept = tree.parent / f"{tree.name}.keep"
            keep.rename(kept)
            shutil.rmtree(tree)
            keep.parent.mkdir(parents=True)
            kept.rename(keep)
    return prepare


# ------------------------------------------------------------------------------------ build


@dataclasses.dataclass(frozen=True)
class Build:
    """What :func:`build` left in ``out_dir``: a folder that runs as is on an ``arch`` machine."""

    arch: str
    out_dir: Path
    library: Path
    host: Path | None = None
    onnxruntime: Path | None = None
    selftests: tuple[Path, ...] = ()


def build(arch: str, out_dir, *, host: bool = True, selftest: bool = False, strip: bool = True,
          jobs: int | None = None) -> Build:
    """Build the op library (and the host ``lowbit-run``, the self-tests) for ``arch`` into ``out_dir``.

    A cross build (aarch64 on x86-64) uses :func:`cross_toolchain`; with ``host``, onnxruntime for
    ``arch`` is copied into ``out_dir`` as ``libonnxruntime.so.1`` and the host is linked against
    it; ``strip`` strips the library, the host and the self-tests with the target's ``strip``.
    """
    arch = _check_arch(arch)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    args: list[str] = []
    strip_tool: str | None = None
    if arch != host_arch():
        tc = cross_toolchain(arch)
        args.append(f"-DCMAKE_TOOLCHAIN_FILE={tc.cmake_file}")
        strip_tool = str(tc.strip)
    elif strip:
        strip_tool = shutil.which("strip")
        if strip_tool is None:
            raise EdgeError("strip (binutils) was not found to strip the native build (install binutils, or pass strip=False)")
    ort = None
    if host:
        ort = out_dir / ORT_LIBRARY_NAME
        source = onnxruntime_library(arch)
        tmp = out_dir / f".{ORT_LIBRARY_NAME}.{os.getpid()}"
        shutil.copyfile(source, tmp)
        tmp.replace(ort)
        args += ["-DLOWBIT_HOST=ON", f"-DORT_LIBRARY={ort}"]
    try:
        library = native_build.build(out_dir, selftest=selftest, jobs=jobs, quiet=True, cmake_args=args)
    except native_build.BuildError as exc:
        raise EdgeError(f"the {arch} build failed: {exc}") from None
    host_path = out_dir / HOST_NAME if host else None
    if host_path is not None and not host_path.is_file():
        raise EdgeError(f"the {arch} build finished without producing {host_path} (is runtime/native/host there?)")
    selftests = tuple(sorted(p for p in out_dir.glob("lowbit_selftest_*") if p.is_file())) if selftest else ()
    if strip:
        for path in (library, host_path, *selftests):
            if path is not None:
                run = subprocess.run([strip_tool, "--strip-all", str(path)], capture_output=True, text=True)
                if run.returncode != 0:
                    raise EdgeError(f"stripping {path} failed: {(run.stderr.strip() or 'no output').splitlines()[-1]}")
    machine = ARCHES[arch][1]
    for path in (library, host_path, *selftests):
        if path is not None and elf_machine(path) != machine:
            raise EdgeError(f"the {arch} build produced {path}, which is not an {arch} binary")
    return Build(arch=arch, out_dir=out_dir, library=library, host=host_path, onnxruntime=ort, selftests=selftests)


def _source_digest(arch: str) -> str:
    """What a build depends on: the native sources, onnxruntime's version, the target, this module."""
    digest = hashlib.sha256(f"{arch}\0{ORT_NODE_VERSION}\0{' '.join(CROSS_PACKAGES)}\0".encode())
    native = native_build.NATIVE_DIR
    for path in sorted(p for p in native.rglob("*") if p.is_file() and p.suffix in (".cc", ".h", ".txt")):
        digest.update(str(path.relative_to(native)).encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(Path(__file__).read_bytes() + Path(native_build.__file__).read_bytes())
    return digest.hexdigest()[:16]


#: how many cached builds per target :func:`cached_build` keeps (the newest)
KEEP_BUILDS = 3


def cached_build(arch: str) -> Build:
    """A stripped build for ``arch`` (host, library, onnxruntime), cached per source digest.

    ``~/.cache/lowbit/edge-builds/<arch>-<digest>``: rebuilt only when the native sources (or
    onnxruntime's version, or this module or runtime/build.py) change, so ``lowbit deploy`` and the
    tests build each target once; written under a temporary name and renamed when complete.
    """
    arch = _check_arch(arch)
    folder = cache_dir() / "edge-builds" / f"{arch}-{_source_digest(arch)}"

    def at(root: Path) -> Build:
        return Build(arch=arch, out_dir=root, library=root / native_build.LIBRARY_NAME, host=root / HOST_NAME,
                     onnxruntime=root / ORT_LIBRARY_NAME)

    done = at(folder)
    if all(p.is_file() for p in (done.library, done.host, done.onnxruntime)):
        return done
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(arch, tmp, host=True, strip=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same build first
            if not done.host.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # builds of older sources (~40 MB each, mostly onnxruntime): keep the few most recent
    older = sorted((p for p in folder.parent.glob(f"{arch}-*") if p.is_dir() and p != folder),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in older[KEEP_BUILDS - 1:]:
        shutil.rmtree(stale, ignore_errors=True)
    return at(folder)


# ------------------------------------------------------------------------------------ running


def run_selftest(path: Path, arch: str, *, isa: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one ``lowbit_selftest_<x>`` of an ``arch`` build here (under qemu when needed).

    ``isa`` caps the kernels' instruction set (``LOWBIT_ISA``). Returns the finished process; its
    exit status says whether every check passed.
    """
    env = dict(os.environ)
    if isa is not None:
        env["LOWBIT_ISA"] = isa
    else:
        env.pop("LOWBIT_ISA", None)
    return subprocess.run([*emulator(arch), str(path)], env=env, capture_output=True, text=True, timeout=timeout)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def run_host(build: Build, model_path, inputs: dict[str, np.ndarray], *, runs: int = 3, warmup: int = 1,
             threads: int = 1, workdir, timeout: float = 600) -> tuple[dict[str, np.ndarray], dict]:
    """Run ``model_path`` with the build's ``lowbit-run`` here (under qemu for another arch).

    ``inputs`` are written as .npy files into ``workdir``, the outputs come back from
    ``workdir/outputs``; returns ``({output name: array}, the host's --json report)``.
    """
    if build.host is None:
        raise UserError(f"the build in {build.out_dir} has no {HOST_NAME} (build it with host=True)")
    model_path = Path(model_path).resolve()
    if not model_path.is_file():
        raise UserError(f"model {model_path} does not exist")
    workdir = Path(workdir).resolve()
    in_dir, out_dir = workdir / "inputs", workdir / "outputs"
    in_dir.mkdir(parents=True, exist_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cmd = [*emulator(build.arch), str(build.host), str(model_path)]
    for name, value in inputs.items():
        file = in_dir / f"{_safe_name(name)}.npy"
        np.save(file, np.ascontiguousarray(value))
        cmd += ["--input", f"{name}={file}"]
    cmd += ["--output-dir", str(out_dir), "--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads),
            "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines() or [f"no message, exit status {run.returncode}"]
        raise HostError(f"{HOST_NAME} ({build.arch}) failed on {model_path.name}: {lines[-1]}",
                        run.returncode, run.stderr)
    try:
        info = json.loads(run.stdout)
    except json.JSONDecodeError:
        raise HostError(f"{HOST_NAME} ({build.arch}) printed no JSON report for {model_path.name}: "
                        f"{run.stdout.strip()[:200]!r}", run.returncode, run.stderr) from None
    outputs = {}
    for name, meta in info.get("outputs", {}).items():
        file = Path(meta.get("file") or out_dir / f"{_safe_name(name)}.npy")
        outputs[name] = np.load(file)
    return outputs, info
