"""The aarch64 NEON kernels (issue #8), cross-built for aarch64 and run here under qemu-user.

On aarch64 the kernels dispatch at run time to ``scalar`` < ``neon`` (every aarch64 CPU) <
``neon-dotprod`` (ARMv8.2 ``sdot``, HWCAP_ASIMDDP), capped by ``LOWBIT_ISA`` (DEVELOPERS.md, "ARM
(aarch64) paths"). One session build (the library and the self-tests, with
``lowbit.runtime.edge``'s cross toolchain; a build folder is kept for the object files) serves:

- ``lowbit_selftest_matmul`` on qemu's ``max`` CPU (has dotprod) at every level and on a
  ``cortex-a53`` (has not), which must report ``neon`` on its own: every path up to the level
  within the self-test's bound (1e-5 of Σ|terms|, measured ~1e-7), and the NEON int8 outputs
  bit-identical to the scalar path's (the kernels do its integer arithmetic and float rounding);
- ``lowbit_selftest_conv`` (ConvLowBit and Hadamard) at the top level, which checks every path:
  scalar, neon and neon-dotprod (sdot for int8 general convs) within 2e-5 of max|y| (measured
  ≤ 8e-7), Hadamard within 1e-4 (measured ≤ 5e-7);
- the ``*_neon``/``*_dotprod`` objects define no weak code: a shared inline function compiled
  for ARMv8.2 could be the copy every caller gets, and crash a CPU without it;
- ``lowbit_selftest_matmul`` again from a ``-fsanitize=address,undefined`` build (the sanitizer
  runtimes linked statically: the cross toolchain has no aarch64 libasan.so), on both CPUs.
  (The conv self-test is clean under the sanitizers too, but takes minutes under qemu: by hand.)

The conv self-test takes ~45 s under qemu, the matmul one ~1 s (~10 s sanitized); the builds ~30 s
each. Toolchain and qemu
downloads are cached in ~/.cache/lowbit (tests/test_edge.py fetches the same).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from lowbit.runtime import build as native_build
from lowbit.runtime import edge

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "runtime" / "native"
LEVELS = ["scalar", "neon", "neon-dotprod"]
MATMUL_BOUND, CONV_BOUND, HADAMARD_BOUND = 1e-5, 2e-5, 1e-4
BLOCKS = [f"{bits}/{bs}" for bits in (2, 4) for bs in (16, 32, 64, 128, 256)]


@pytest.fixture(scope="session")
def arm64(tmp_path_factory) -> Path:
    """The aarch64 library and self-tests in <root>/out, the CMake build folder in <root>/build."""
    root = tmp_path_factory.mktemp("arm64")
    tc = edge.cross_toolchain("aarch64")
    library = native_build.build(root / "out", build_dir=root / "build", selftest=True, quiet=True,
                                 cmake_args=[f"-DCMAKE_TOOLCHAIN_FILE={tc.cmake_file}"])
    for binary in (library, *(root / "out").glob("lowbit_selftest_*")):
        assert edge.elf_machine(binary) == edge.ARCHES["aarch64"][1], binary  # really aarch64
    return root


def _run(selftest: Path, cpu: str, isa: str | None) -> subprocess.CompletedProcess:
    """The self-test under qemu as CPU model ``cpu``, with LOWBIT_ISA=isa (None: no cap)."""
    qemu, *rest = edge.emulator("aarch64")
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_ISA"}
    if isa is not None:
        env["LOWBIT_ISA"] = isa
    return subprocess.run([qemu, "-cpu", cpu, *rest, str(selftest)], env=env, capture_output=True, text=True,
                          timeout=900)


# (qemu CPU, LOWBIT_ISA, the level the library must pick)
CASES = [("max", None, "neon-dotprod"), ("max", "neon", "neon"), ("max", "scalar", "scalar"),
         ("cortex-a53", None, "neon"), ("cortex-a53", "neon-dotprod", "neon"), ("cortex-a53", "scalar", "scalar")]


@pytest.mark.parametrize("cpu,cap,level", CASES, ids=[f"{c}-{i or 'nocap'}" for c, i, _ in CASES])
def test_matmul_selftest_every_level(arm64, cpu, cap, level):
    run = _run(arm64 / "out" / "lowbit_selftest_matmul", cpu, cap)
    where = f"lowbit_selftest_matmul -cpu {cpu} LOWBIT_ISA={cap}"
    assert run.returncode == 0, f"{where}: " + run.stdout[-3000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0] == f"isa: {level}", where
    assert "all checks passed" in lines, where
    # one row per (path, format, accuracy): "  <path> <format> <accuracy> 2/16:<err> … 4/256:<err>"
    rows = {}
    for line in lines:
        m = re.match(r"  (\S+) +(uniform|codebook) +(float|int8) +(.*)$", line)
        if m:
            figures = dict(re.findall(r"(\d/\d+):(\S+)", m.group(4)))
            rows[m.group(1), m.group(2), m.group(3)] = {k: float(v) for k, v in figures.items()}
    paths = LEVELS[:LEVELS.index(level) + 1]
    expected = [(p, f, a) for p in paths for f in ("uniform", "codebook") for a in ("float", "int8")]
    assert sorted(rows) == sorted(expected), where
    for key, figures in rows.items():
        assert list(figures) == BLOCKS, (where, key)
        assert max(figures.values()) <= MATMUL_BOUND, (where, key, figures)  # measured ≤ 1e-7
    if level != "scalar":  # the NEON int8 kernels reproduce the scalar path bit for bit
        assert "neon int8 outputs differing from the scalar path: 0" in lines, where
        for path in paths[1:]:
            for fmt in ("uniform", "codebook"):
                assert rows[path, fmt, "int8"] == rows["scalar", fmt, "int8"], (where, path, fmt)


def test_conv_and_hadamard_selftest(arm64):
    """The self-test checks every path up to the CPU's level against its reference, and calls the
    paths' kernels directly: one run at the top level covers the scalar, NEON and sdot kernels."""
    run = _run(arm64 / "out" / "lowbit_selftest_conv", "max", None)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert lines[0] == "isa: neon-dotprod"
    assert "all checks passed" in lines
    conv = {m.group(1): [float(e) for e in re.findall(r"/(?:float|int8) (\S+)", line)]
            for line in lines if (m := re.match(r"conv (\S+) +max rel err:", line))}
    hadamard = {m.group(1): float(m.group(2))
                for line in lines if (m := re.match(r"hadamard (\S+) +max err (\S+)", line))}
    assert set(conv) == set(hadamard) == set(LEVELS), lines
    for path, errs in conv.items():  # uniform/float, uniform/int8, codebook/float, codebook/int8
        assert len(errs) == 4 and max(errs) <= CONV_BOUND, (path, errs)  # measured ≤ 8e-7
    assert max(hadamard.values()) <= HADAMARD_BOUND, hadamard  # measured ≤ 5e-7


def test_arm_isa_objects_define_no_shared_code(arm64):
    """The *_neon / *_dotprod objects (release build) define no weak code (DEVELOPERS.md): only
    type info, vtables and the like, which hold no instructions."""
    nm = edge.cross_toolchain("aarch64").strip.with_name("aarch64-linux-gnu-nm")
    objects = sorted((arm64 / "build").rglob("*_neon.cc.o")) + sorted((arm64 / "build").rglob("*_dotprod.cc.o"))
    sources = sorted(NATIVE.glob("*_neon.cc")) + sorted(NATIVE.glob("*_dotprod.cc"))
    assert [o.name for o in objects] == [s.name + ".o" for s in sources] and sources
    for obj in objects:
        symbols = subprocess.run([str(nm), str(obj)], capture_output=True, text=True, check=True).stdout
        weak = [line.split()[-1] for line in symbols.splitlines() if line.split()[-2] in ("W", "V", "u")
                and not line.split()[-1].startswith(("_ZTI", "_ZTS", "_ZTV", "DW.ref."))]
        assert weak == [], f"{obj.name}: " + "; ".join(weak[:5])


def test_matmul_selftest_under_sanitizers(tmp_path):
    """Out-of-bounds reads of codes, tables or activations (or undefined behaviour) in the NEON
    MatMul kernels fail the run: ASan/UBSan abort with a report and a non-zero status."""
    tc = edge.cross_toolchain("aarch64")
    cmake = native_build.find_cmake()
    configure = [cmake, "-S", str(native_build.NATIVE_DIR), "-B", str(tmp_path),
                 f"-DCMAKE_TOOLCHAIN_FILE={tc.cmake_file}", "-DLOWBIT_LIBRARY=OFF", "-DLOWBIT_SELFTEST=ON",
                 "-DLOWBIT_SANITIZE=ON",
                 "-DCMAKE_EXE_LINKER_FLAGS=-static-libasan -static-libubsan"]
    for cmd in (configure, [cmake, "--build", str(tmp_path), "--target", "lowbit_selftest_matmul", "--parallel"]):
        run = subprocess.run(cmd, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for cpu, level in (("max", "neon-dotprod"), ("cortex-a53", "neon")):
        qemu, *rest = edge.emulator("aarch64")
        env = {k: v for k, v in os.environ.items() if k != "LOWBIT_ISA"}
        env["ASAN_OPTIONS"] = "detect_leaks=0"  # LeakSanitizer does not run under qemu-user
        run = subprocess.run([qemu, "-cpu", cpu, *rest, str(tmp_path / "lowbit_selftest_matmul")], env=env,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"-cpu {cpu}: " + run.stdout[-2000:] + run.stderr[-3000:]
        lines = run.stdout.splitlines()
        assert lines[0] == f"isa: {level}" and "all checks passed" in lines, run.stdout[-2000:]
        assert "neon int8 outputs differing from the scalar path: 0" in lines
        assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr, run.stderr[-3000:]
