"""The native op library's build: what the install leaves, what the .so exports and links, the
header lookup, installs with and without it, sessions without it, and the sanitizer run.

The library must have been built by the install (``pip install -e .``): a missing library fails
these tests, it does not skip them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lowbit
from lowbit.core.errors import UserError
from lowbit.runtime import library, ops, reference
from lowbit.runtime import session as session_module

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "runtime"
EXPORTS = {"RegisterCustomOps", "lowbit_isa", "lowbit_version"}


def _build_module():
    """runtime/build.py loaded by path, as setup.py loads it."""
    spec = importlib.util.spec_from_file_location("_lowbit_native_build_test", RUNTIME / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def installed(monkeypatch) -> Path:
    """The library the install built in the package (no LOWBIT_OPS_LIBRARY override)."""
    monkeypatch.delenv("LOWBIT_OPS_LIBRARY", raising=False)
    path = Path(lowbit.__file__).resolve().parent / "runtime" / "liblowbit_ops.so"
    assert path.is_file(), f"{path} is missing: the install did not build the native library (pip install -e .)"
    assert library.path() == path
    return path


def test_library_after_install(installed):
    assert library.available()
    assert library.isa() in ("scalar", "avx2", "avx512vnni")
    assert library.version() == lowbit.__version__


def test_exports_only_the_entry_points(installed):
    out = subprocess.run(["nm", "-D", "--defined-only", str(installed)], capture_output=True, text=True, check=True)
    names = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert names == EXPORTS, names


def test_not_linked_against_onnxruntime(installed):
    dynamic = subprocess.run(["readelf", "-d", str(installed)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert needed and not [n for n in needed if "onnxruntime" in n], needed
    ldd = subprocess.run(["ldd", str(installed)], capture_output=True, text=True, check=True).stdout
    assert "onnxruntime" not in ldd and "not found" not in ldd, ldd
    undefined = subprocess.run(["nm", "-D", "--undefined-only", str(installed)], capture_output=True, text=True,
                               check=True).stdout
    assert not [line for line in undefined.splitlines() if "Ort" in line], undefined


# ------------------------------------------------------------------------------------ headers


def test_bad_ort_include_dir_is_one_line(tmp_path):
    build = _build_module()
    with pytest.raises(build.BuildError) as info:
        build.ort_include_dir({"ORT_INCLUDE_DIR": str(tmp_path)})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"ORT_INCLUDE_DIR={tmp_path} does not contain onnxruntime_c_api.h")
    # the same through the command line: exit status 2, one line on stderr
    run = subprocess.run([sys.executable, str(RUNTIME / "build.py"), "--out", str(tmp_path / "out")],
                         env={**os.environ, "ORT_INCLUDE_DIR": str(tmp_path)}, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"lowbit native build: {message}"]


def test_good_ort_include_dir_is_used_as_is(tmp_path):
    build = _build_module()
    (tmp_path / "onnxruntime_c_api.h").write_text("// stand-in\n")
    assert build.ort_include_dir({"ORT_INCLUDE_DIR": str(tmp_path)}) == tmp_path


def test_debian_mirror_is_read_from_the_machine_configuration(tmp_path):
    build = _build_module()
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm-updates bookworm\nComponents: main\n")
    assert build.debian_mirror([str(parts)]) == "http://mirror.example/debian"
    assert build.debian_suite([str(parts)]) == "bookworm"  # the release, not a pocket, nor the security archive
    one_line = tmp_path / "sources.list"
    one_line.write_text("# comment\ndeb [arch=amd64 signed-by=/k.gpg] https://proxy.example/debian trixie main\n")
    assert build.debian_mirror([str(tmp_path / "none.d"), str(one_line)]) == "https://proxy.example/debian"
    assert build.debian_suite([str(one_line)]) == "trixie"
    (tmp_path / "empty.list").write_text("")
    with pytest.raises(build.BuildError, match="no Debian archive is configured.*ORT_INCLUDE_DIR"):
        build.debian_mirror([str(tmp_path / "empty.list")])
    with pytest.raises(build.BuildError, match="no Debian release suite"):
        build.debian_suite([str(tmp_path / "empty.list")])


def test_unreachable_mirror_is_one_line(tmp_path, monkeypatch):
    build = _build_module()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: the fetch must run
    monkeypatch.setattr(build, "debian_mirror", lambda: "http://127.0.0.1:9/debian")  # nothing listens there
    with pytest.raises(build.BuildError) as info:
        build.ort_include_dir({})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("fetching libonnxruntime-dev (trixie) from http://127.0.0.1:9/debian failed at "
                              "'apt-get update'") and message.endswith("(set ORT_INCLUDE_DIR to skip the fetch)")
    assert list((tmp_path / "lowbit").iterdir()) == []  # nothing half-written left in the cache


def test_headers_are_cached():
    build = _build_module()
    include = build.ort_include_dir({})  # fetched by the install: now a cache hit, no network
    assert include == build.cache_dir() / "ort-headers-21" / "usr" / "include" / "onnxruntime"
    text = (include / "onnxruntime_c_api.h").read_text()
    assert "#define ORT_API_VERSION 21" in text


# ------------------------------------------------------------------------------------ sessions


def _matmul_model(path: Path, name="proj") -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    K, N = 40, 3
    W = reference.pack(rng.integers(0, 16, size=(N, K)), 4, 32)
    scales = rng.uniform(0.1, 1, size=(N, 2)).astype(np.float32)
    node = helper.make_node("MatMulLowBit", ["A", "W", "scales"], ["Y"], name=name, domain=ops.DOMAIN,
                            K=K, N=N, bits=4, block_size=32)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, N])],
                              initializer=[onnx.numpy_helper.from_array(W, "W"),
                                           onnx.numpy_helper.from_array(scales, "scales")])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                   helper.make_opsetid(ops.DOMAIN, 1)])
    onnx.save(model, path)
    A = rng.normal(size=(2, K)).astype(np.float32)
    return A, reference.matmul_lowbit(A, W, scales, K=K, N=N, bits=4, block_size=32)


def test_native_session(installed, tmp_path):
    A, expected = _matmul_model(tmp_path / "m.onnx")
    sess = lowbit.session(tmp_path / "m.onnx", threads=1)
    assert sess.lowbit_implementation == "native" == session_module.implementation(sess)
    np.testing.assert_allclose(sess.run(None, {"A": A})[0], expected, rtol=1e-5, atol=1e-5)
    assert session_module.session_options().get_session_config_entry("session.qdq_matmulnbits_accuracy_level") == "4"


def test_stock_model_registers_nothing(tiny_path):
    sess = lowbit.session(tiny_path)
    assert sess.lowbit_implementation == "stock" == session_module.implementation(tiny_path)


def test_bad_accuracy_level():
    with pytest.raises(UserError, match="accuracy_level must be one of 0, 1, 2, 3, 4, not 7"):
        session_module.session_options(accuracy_level=7)


def test_reference_fallback_without_library(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_OPS_LIBRARY", "none")
    A, expected = _matmul_model(tmp_path / "m.onnx")
    assert session_module.implementation(tmp_path / "m.onnx") == "reference"
    sess = lowbit.session(tmp_path / "m.onnx")
    assert sess.lowbit_implementation == "reference"
    np.testing.assert_allclose(sess.run(None, {"A": A})[0], expected, rtol=1e-6, atol=1e-6)


def test_missing_library_message(tmp_path):
    """LOWBIT_OPS_LIBRARY=none and no onnxruntime-extensions: one line naming the node and the fix."""
    _matmul_model(tmp_path / "m.onnx", name="layers.0.proj")
    code = ("import sys; sys.modules['onnxruntime_extensions'] = None\n"  # as if it were not installed
            "import lowbit\n"
            "try:\n"
            f"    lowbit.session({str(tmp_path / 'm.onnx')!r})\n"
            "except lowbit.UserError as e:\n"
            "    print(e); sys.exit(e.exit_code)\n")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LOWBIT_OPS_LIBRARY": "none"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == (f"{tmp_path / 'm.onnx'}: node 'layers.0.proj' (lowbit.MatMulLowBit) needs lowbit's native "
                        "op library, which is not available (LOWBIT_OPS_LIBRARY=none hides it): reinstall lowbit "
                        "with `pip install .` on a machine with a C++17 compiler and cmake, or `pip install "
                        "onnxruntime-extensions` to run lowbit's ops on the slow numpy reference")


def test_library_override_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_OPS_LIBRARY", str(tmp_path / "nope.so"))
    with pytest.raises(UserError, match=r"LOWBIT_OPS_LIBRARY=.*nope.so is not a file"):
        library.path()


# ------------------------------------------------------------------------------------ installs


def _wheel(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600)


def test_wheel_contains_the_library(tmp_path):
    run = _wheel(tmp_path, {})
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = tmp_path.glob("lowbit-*.whl")
    assert wheel.name.startswith("lowbit-0.1.0-py3-none-linux_"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert "lowbit/runtime/liblowbit_ops.so" in names
    assert not [n for n in names if n.endswith(".so") and n != "lowbit/runtime/liblowbit_ops.so"]
    assert "lowbit/runtime/native/CMakeLists.txt" in names and "lowbit/runtime/native/ops.cc" in names


def test_failed_build_fails_the_install_unless_lowbit_native_0(tmp_path):
    bad = {"ORT_INCLUDE_DIR": str(tmp_path / "no-headers")}
    run = _wheel(tmp_path / "a", bad)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert (f"lowbit: building the native op library failed: ORT_INCLUDE_DIR={tmp_path / 'no-headers'} does not "
            "contain onnxruntime_c_api.h") in output
    assert "Set LOWBIT_NATIVE=0 to install without it" in output
    run = _wheel(tmp_path / "b", {**bad, "LOWBIT_NATIVE": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = (tmp_path / "b").glob("lowbit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lowbit/runtime/session.py" in names and not [n for n in names if n.endswith(".so")]


# ------------------------------------------------------------------------------------ sanitizers


def test_isa_objects_define_no_shared_code(tmp_path):
    """In the release build, the *_avx2/*_avx512 objects (compiled with those ISAs' flags) define no
    weak (COMDAT) code: an inline function or template they instantiate could be the copy the
    linker keeps for every caller, and run AVX-512 instructions on the scalar path of a CPU
    without them. Weak data (type info, vtables, the exception personality) holds no code."""
    build_dir = tmp_path / "build"
    _build_module().build(tmp_path / "out", build_dir=build_dir, quiet=True)
    objects = sorted(build_dir.rglob("*_avx2.cc.o")) + sorted(build_dir.rglob("*_avx512.cc.o"))
    assert len(objects) == len(list((RUNTIME / "native").glob("*_avx2.cc")) + list((RUNTIME / "native").glob("*_avx512.cc")))
    for obj in objects:
        symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
        weak = [line.split()[-1] for line in symbols.splitlines()
                if line.split()[-2] in ("W", "V", "u") and not line.split()[-1].startswith(("_ZTI", "_ZTS", "_ZTV", "DW.ref."))]
        assert weak == [], f"{obj.name}: " + "; ".join(weak[:5])


def test_native_ops_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """A separate -fsanitize=address,undefined build (the library and the kernels' self-tests), and
    test_native_ops.py run against it on every ISA path: clean exits, every test passing."""
    build = _build_module()
    library_path = build.build(tmp_path / "out", build_dir=tmp_path / "build", sanitize=True, selftest=True,
                               quiet=True)
    needed = subprocess.run(["readelf", "-d", str(library_path)], capture_output=True, text=True).stdout
    assert "libasan" in needed and "libubsan" in needed
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    selftests = sorted((tmp_path / "out").glob("lowbit_selftest_*"))
    assert len(selftests) == len(list((RUNTIME / "native").glob("selftest_*.cc")))
    for selftest in selftests:
        run = subprocess.run([str(selftest)], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{selftest.name}: " + run.stdout[-2000:] + run.stderr[-3000:]
        assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr, run.stderr[-3000:]
    # python is not built with ASan: its runtime must come first, and libstdc++ with it so that ASan's
    # __cxa_throw interceptor finds the real one (else the first C++ exception aborts)
    preload = [subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True,
                              check=True).stdout.strip() for name in ("libasan.so", "libstdc++.so")]
    assert all(os.path.isabs(p) for p in preload), f"g++ lacks the sanitizer runtime: {preload}"
    env.update(LD_PRELOAD=" ".join(preload), LOWBIT_OPS_LIBRARY=str(library_path))
    for isa in ("scalar", "avx2", "avx512vnni"):
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(ROOT / "tests" / "test_native_ops.py"), "-k", "not isa_path"],
                             env={**env, "LOWBIT_ISA": isa}, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"LOWBIT_ISA={isa}: " + run.stdout[-3000:] + run.stderr[-3000:]
        assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr, run.stderr[-3000:]
        summary = run.stdout.strip().splitlines()[-1]
        assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
        assert int(summary.split()[0]) >= 100, summary
