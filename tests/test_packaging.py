"""The wheel: every module under the lowbit namespace, the embedded models inside, no bare names."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, timeout=300, capture_output=True)
    (wheel,) = tmp_path.glob("lowbit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"lowbit"}, top
    for required in ("lowbit/cli.py", "lowbit/passes/base.py", "lowbit/passes/fold_bn.py", "lowbit/core/io.py",
                     "lowbit/runtime/session.py", "lowbit/analysis/stats.py", "lowbit/models/digits_cnn.onnx",
                     "lowbit/models/tiny_llama.onnx", "lowbit/models/digits_data.npz"):
        assert required in names, required
    assert not [n for n in names if n.startswith(("lowbit/tests/", "lowbit/benchmarks/"))]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "lowbit = lowbit.cli:main" in text
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in core if "torch" in line], "torch must never be a core dependency"
    for dep in ("onnx", "onnx-ir", "onnxruntime", "numpy", "networkx"):
        assert any(line.split()[1].startswith(dep) for line in core), dep
