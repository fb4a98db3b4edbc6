"""``lowbit-run``, the C++ host (``runtime/native/host``), built for x86-64 by ``lowbit.runtime.edge``.

One build per source digest (``edge.cached_build("x86_64")``: the op library and the host, stripped, plus
onnxruntime 1.21 from npm, ~15 s), then:

* the digits CNN, float and W4-lowered (5 ``lowbit.ConvLowBit`` + 1 ``MatMulNBits``), run by the host
  on 128 held-out digits equals the Python run (``lowbit.runtime.session``), and its JSON report is
  consistent;
* every input error a user can make is refused with exit status 2, one stderr line naming the
  thing, and no output file;
* raw little-endian bytes and ``.npy`` give the same outputs.

Measured when written (2 shared cores, AVX-512 VNNI, host on onnxruntime 1.21.0, Python on
onnxruntime 1.31): host vs Python, max |Δ| / max |Python|, on the [128, 10] logits: 0.0 for both
the float and the lowered model (bit for bit). The bound below is 1e-5 for both: the Python run
registers the very same ``liblowbit_ops.so`` (``LOWBIT_OPS_LIBRARY``), so what may differ is
onnxruntime's own float kernels (MLAS Conv/Gemm/MatMulNBits) between its two versions, i.e. the
order of float32 additions, a few ulps of the largest logit (≈ 1e-6 relative); a real fault (inputs
read in the wrong layout or type, a wrong output, another op library) moves the logits by ≥ 1e-2.
Stripped x86-64 sizes: lowbit-run 127 KiB, liblowbit_ops.so 327 KiB. Host latency (128 digits, 1
thread, median of 50): float 3.8 ms, lowered W4 5.7-6.0 ms (reported, not asserted).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest


from lowbit.core import io
from lowbit.models import data, demo
from lowbit.runtime import edge, library
from lowbit.runtime.session import session

N = 128  # digits per run
RUNS = 5
TOLERANCE = 1e-5  # relative, host vs Python (measured 0.0 for both models; see the module docstring)


def _rel(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


@pytest.fixture(scope="session")
def host_build() -> edge.Build:
    return edge.cached_build("x86_64")  # shared with test_edge.py and `lowbit deploy`


@pytest.fixture(scope="session")
def models(tmp_path_factory, digits_w4_lowered) -> dict[str, Path]:
    """The float digits CNN, its W4 lowering (lowbit ops), and the lowering with a static batch of N."""
    folder = tmp_path_factory.mktemp("host-models")
    lowered = io.load(digits_w4_lowered)
    ops = [f"{n.domain}.{n.op_type}" for n in lowered.graph]
    assert ops.count("lowbit.ConvLowBit") == 5 and ops.count("com.microsoft.MatMulNBits") == 1
    lowered.graph.inputs[0].shape = ir.Shape([N, 1, 8, 8])
    io.save(lowered, folder / "digits_w4_static.onnx")
    return {"float": demo.model_path("digits"), "w4": digits_w4_lowered,
            "w4_static": folder / "digits_w4_static.onnx"}


@pytest.fixture(scope="session")
def digits() -> np.ndarray:
    return np.ascontiguousarray(data.digits_eval_set()[0][:N])


@pytest.fixture(scope="session")
def inputs(tmp_path_factory, digits) -> dict[str, Path]:
    """Input files: the N digits as .npy and raw bytes, and the wrong variants the host must refuse."""
    folder = tmp_path_factory.mktemp("host-inputs")
    files = {"npy": folder / "x.npy", "raw": folder / "x.bin", "short_raw": folder / "short.bin",
             "float64": folder / "x64.npy", "flat": folder / "flat.npy"}
    np.save(files["npy"], digits)
    digits.tofile(files["raw"])
    digits[:-1].tofile(files["short_raw"])  # one image short: 127·64·4 bytes
    np.save(files["float64"], digits.astype(np.float64))
    np.save(files["flat"], digits.reshape(N, 64))
    return files


def _python_run(path: Path, x: np.ndarray, ops_library: Path, monkeypatch) -> tuple[np.ndarray, str]:
    """The model's output in Python, with the host's op library registered; and which ran lowbit's ops."""
    monkeypatch.setenv(library.ENV, str(ops_library))
    sess = session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0], sess.lowbit_implementation


# -------------------------------------------------------------------------------------------------
# the host computes what Python computes


@pytest.mark.parametrize("name,implementation", [("float", "stock"), ("w4", "native")])
def test_host_matches_python(host_build, models, digits, tmp_path, monkeypatch, name, implementation):
    want, ran = _python_run(models[name], digits, host_build.library, monkeypatch)
    assert ran == implementation
    outputs, report = edge.run_host(host_build, models[name], {"input": digits}, runs=RUNS, warmup=1,
                                    workdir=tmp_path)
    assert list(outputs) == ["logits"]
    got = outputs["logits"]
    assert got.shape == (N, 10) and got.dtype == np.float32
    assert _rel(got, want) <= TOLERANCE, _rel(got, want)  # measured 0.0
    assert np.array_equal(got.argmax(1), want.argmax(1))
    # the report: the library beside the executable, onnxruntime from npm, RUNS timed runs
    assert report["ops_library"] == str(host_build.library)
    assert report["onnxruntime"] == edge.ORT_NODE_VERSION
    assert report["runs"] == RUNS and report["threads"] == 1
    latency = report["latency_ms"]
    assert 0 < latency["min"] <= latency["median"] <= latency["max"]
    assert report["outputs"]["logits"] == {"shape": [N, 10], "dtype": "float32",
                                           "file": str(tmp_path / "outputs" / "logits.npy")}


def test_raw_bytes_input_equals_npy(host_build, models, inputs, tmp_path):
    """Raw little-endian float32 bytes, shaped by the model's static [N, 1, 8, 8], are the .npy's data."""
    got = {}
    for kind in ("raw", "npy"):
        run = subprocess.run([str(host_build.host), str(models["w4_static"]), "--input", f"input={inputs[kind]}",
                              "--output-dir", str(tmp_path / kind), "--runs", "1"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stderr == ""
        got[kind] = np.load(tmp_path / kind / "logits.npy")
    assert got["raw"].shape == (N, 10)
    assert np.array_equal(got["raw"], got["npy"])


def test_stripped_host_size(host_build):
    """The host is a thin layer over onnxruntime: 127 KiB stripped when written; 256 KiB is the budget."""
    assert host_build.host.stat().st_size <= 256 * 1024, host_build.host.stat().st_size


# -------------------------------------------------------------------------------------------------
# bad input: exit status 2, one line naming the problem, no output written


def _refused(host_build, tmp_path: Path, *args, match: tuple[str, ...]) -> str:
    out = tmp_path / "out"
    run = subprocess.run([str(host_build.host), *map(str, args), "--output-dir", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit-run: error: "), run.stderr
    for text in match:
        assert text in lines[0], (text, lines[0])
    assert run.stdout == ""
    assert not out.exists()
    return lines[0]


def test_model_file_missing(host_build, inputs, tmp_path):
    missing = tmp_path / "nowhere.onnx"
    _refused(host_build, tmp_path, missing, "--input", f"input={inputs['npy']}",
             match=(f"model file {missing} does not exist",))


def test_lowbit_model_without_op_library(host_build, models, inputs, tmp_path):
    """--no-ops on a model with lowbit nodes: the message names the op and both ways to fix it."""
    _refused(host_build, tmp_path, models["w4"], "--no-ops", "--input", f"input={inputs['npy']}",
                    match=(f"model {models['w4']} uses lowbit's op ConvLowBit but no op library is registered",
                           "put liblowbit_ops.so beside lowbit-run", "--ops PATH"))


def test_op_library_missing(host_build, models, inputs, tmp_path):
    missing = tmp_path / "lib" / "liblowbit_ops.so"
    _refused(host_build, tmp_path, models["w4"], "--ops", missing, "--input", f"input={inputs['npy']}",
             match=(f"op library {missing} (--ops) does not exist",))


def test_raw_input_of_the_wrong_size(host_build, models, inputs, tmp_path):
    need, have = N * 64 * 4, (N - 1) * 64 * 4
    _refused(host_build, tmp_path, models["w4_static"], "--input", f"input={inputs['short_raw']}",
             match=(f"input file {inputs['short_raw']} (for input 'input') has {have} bytes",
                    f"([{N}, 1, 8, 8] float32) needs {need} bytes"))


def test_raw_input_for_a_dynamic_shape(host_build, models, inputs, tmp_path):
    """Raw bytes cannot be shaped when the model's batch is dynamic: the host asks for .npy."""
    _refused(host_build, tmp_path, models["w4"], "--input", f"input={inputs['raw']}",
             match=("model input 'input' has dynamic shape [batch, 1, 8, 8]", str(inputs["raw"]), "as .npy"))


@pytest.mark.parametrize("kind,match", [
    ("float64", ("holds float64 but model input 'input' is float32",)),
    ("flat", (f"has shape [{N}, 64] but model input 'input' is [batch, 1, 8, 8]",)),
])
def test_npy_input_of_the_wrong_dtype_or_shape(host_build, models, inputs, tmp_path, kind, match):
    _refused(host_build, tmp_path, models["w4"], "--input", f"input={inputs[kind]}",
             match=(f"input file {inputs[kind]} (for input 'input')", *match))


def test_unknown_input_name(host_build, models, inputs, tmp_path):
    _refused(host_build, tmp_path, models["w4"], "--input", f"input={inputs['npy']}", "--input",
             f"image={inputs['npy']}", match=(f"model {models['w4']} has no input named 'image' (its inputs: 'input')",))


def test_missing_input(host_build, models, tmp_path):
    _refused(host_build, tmp_path, models["float"],
             match=(f"input 'input' of model {models['float']} is not given", "--input NAME=FILE"))
