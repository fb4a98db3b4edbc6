"""The command line: every command works, --help everywhere, --json parses, exit codes hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowbit.passes.base import registry

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["compress", "inspect", "compare", "passes", "demo"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_everywhere(run_cli, command):
    code, out, _ = run_cli(*([command] if command else []), "--help")
    assert code == 0 and "usage: lowbit" in out


def test_compress_json_and_report(run_cli, tmp_path, tiny_path):
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32))
    code, out, err = run_cli("compress", tiny_path, "-o", tmp_path / "o.onnx", "--passes", "fold-bn,cleanup",
                             "--calib", tmp_path / "calib.npz", "--report", tmp_path / "r.json", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data == json.loads((tmp_path / "r.json").read_text())
    assert [p["name"] for p in data["passes"]] == ["fold-bn", "cleanup"]
    assert data["passes"][0]["error"]["rel"] <= 1e-5
    assert data["info"]["before"]["op_types"]["BatchNormalization"] == 1
    assert "BatchNormalization" not in data["info"]["after"]["op_types"]
    assert data["info"]["before"]["macs"] == data["info"]["after"]["macs"] == 4 * 3 * 9 * 64


def test_compress_table(run_cli, tmp_path, tiny_path):
    code, out, _ = run_cli("compress", tiny_path, "-o", tmp_path / "o.onnx", "--passes", "fold-bn,cleanup")
    assert code == 0
    for word in ("fold-bn", "cleanup", "file size", "parameters", "MACs", "time s", "SQNR"):
        assert word in out
    nodes = next(line.split() for line in out.splitlines() if line.startswith("nodes"))
    assert nodes == ["nodes", "3", "2", "1.50x"]


def test_inspect_json(run_cli, tiny_path):
    code, out, _ = run_cli("inspect", tiny_path, "--json", "--batch", "2")
    assert code == 0
    data = json.loads(out)
    assert data["params"] == 4 * 3 * 9 + 4 + 4 * 4
    assert data["macs"] == 2 * 4 * 3 * 9 * 64
    assert data["op_types"] == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}


def test_compare_json(run_cli, tmp_path, tiny_path):
    run_cli("compress", tiny_path, "-o", tmp_path / "o.onnx", "--passes", "fold-bn")
    code, out, err = run_cli("compare", tiny_path, tmp_path / "o.onnx", "--json", "--calib", "random:8")
    assert code == 0, err
    data = json.loads(out)
    assert data["error"]["rel"] <= 1e-5
    assert 0.2 < data["latency"]["ratio"] < 5


def test_passes_lists_every_pass(run_cli):
    code, out, _ = run_cli("passes", "--json")
    assert code == 0
    data = json.loads(out)
    assert [p["name"] for p in data] == list(registry())
    for entry in data:
        assert entry["preserves"] in ("exact", "lossy") and entry["summary"]
        assert all(opt["doc"] and opt["type"] for opt in entry["options"])


def test_console_script_and_checkout_script(tmp_path, tiny_path):
    """`lowbit` (installed) and `python cli.py` (checkout) behave the same, exit codes included."""
    installed = subprocess.run([sys.executable, "-m", "lowbit.cli", "inspect", str(tiny_path), "--json"],
                               capture_output=True, text=True, timeout=120)
    checkout = subprocess.run([sys.executable, str(ROOT / "cli.py"), "inspect", str(tiny_path), "--json"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert installed.returncode == checkout.returncode == 0, checkout.stderr
    assert json.loads(installed.stdout)["macs"] == json.loads(checkout.stdout)["macs"] == 4 * 3 * 9 * 64
    bad = subprocess.run([sys.executable, str(ROOT / "cli.py"), "compress", str(tiny_path), "-o", str(tiny_path),
                          "--passes", "cleanup"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_internal_error_exits_1(run_cli, tmp_path, tiny_path):
    from lowbit.passes import base

    class Crash(base.Pass):
        """Raises (test only)."""

        name = "test-crash"

        def run(self, model, ctx):
            raise ZeroDivisionError("boom")

    try:
        code, _, err = run_cli("compress", tiny_path, "-o", tmp_path / "o.onnx", "--passes", "cleanup,test-crash")
    finally:
        base.unregister("test-crash")
    assert code == 1
    assert "pass test-crash (after cleanup): ZeroDivisionError: boom" in err
    assert not (tmp_path / "o.onnx").exists()


def test_demo_json(run_cli, tmp_path):
    code, out, err = run_cli("demo", "--json", "-o", tmp_path / "demo.onnx")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "digits" and data["before"]["metric"] >= 0.95
    assert data["before"]["metric"] - data["after"]["metric"] <= 0.003  # W8A8: at most 0.3 pt top-1
    assert data["after"]["file_bytes"] * 2.5 < data["before"]["file_bytes"]
    assert data["before"]["latency_ms"] > 0 and data["after"]["latency_ms"] > 0
    assert (tmp_path / "demo.onnx").stat().st_size == data["after"]["file_bytes"]
