"""Every bad input named in the backbone issue: one sentence, exit 2, nothing written, input unchanged."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import refused
from lowbit.core import io
from lowbit.passes.base import registry


def _png() -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"\x00\xff\x00\x00"
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def compress_args(src, tmp_path, *extra):
    return ("compress", src, "-o", tmp_path / "out.onnx", "--passes", "cleanup", *extra)


def test_missing_file(run_cli, tmp_path):
    refused(run_cli, tmp_path, *compress_args(tmp_path / "nope.onnx", tmp_path), match="nope.onnx: no such file")


def test_empty_file(run_cli, tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    refused(run_cli, tmp_path, *compress_args(tmp_path / "empty.onnx", tmp_path), match="empty")


def test_png_renamed(run_cli, tmp_path):
    (tmp_path / "cat.onnx").write_bytes(_png())
    refused(run_cli, tmp_path, *compress_args(tmp_path / "cat.onnx", tmp_path), match="PNG image, not an ONNX model")


def test_text_file(run_cli, tmp_path):
    (tmp_path / "notes.onnx").write_text("this is not a model\n" * 20)
    refused(run_cli, tmp_path, *compress_args(tmp_path / "notes.onnx", tmp_path), match="notes.onnx")


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9, 0.99])
def test_truncated(run_cli, tmp_path, tiny_path, fraction):
    data = tiny_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: int(len(data) * fraction)])
    tiny_path.unlink()
    refused(run_cli, tmp_path, *compress_args(cut, tmp_path), match="cut.onnx")


def test_corrupt_bytes(run_cli, tmp_path, tiny_path):
    data = bytearray(tiny_path.read_bytes())
    data[10:60] = bytes(range(200, 250))
    tiny_path.write_bytes(bytes(data))
    refused(run_cli, tmp_path, *compress_args(tiny_path, tmp_path), match="tiny.onnx")


def _external(tmp_path: Path, location: str | None = None) -> Path:
    """The tiny model with its tensors in tiny.onnx.data, optionally pointed at ``location``."""
    from helpers import tiny_cnn

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    path = io.save(tiny_cnn(), model_dir / "tiny.onnx", external_data=True)
    assert (model_dir / "tiny.onnx.data").exists()
    if location is not None:
        _external_location(path, location)
    return path


def test_external_data_missing(run_cli, tmp_path):
    path = _external(tmp_path)
    (path.parent / "tiny.onnx.data").unlink()
    refused(run_cli, tmp_path, *compress_args(path, tmp_path), match="tiny.onnx.data', which is missing")


def test_external_data_escapes_folder(run_cli, tmp_path):
    path = _external(tmp_path, "../secret.data")
    shutil.copy(path.parent / "tiny.onnx.data", tmp_path / "secret.data")
    refused(run_cli, tmp_path, *compress_args(path, tmp_path), match="outside the model's folder")


def test_external_data_absolute(run_cli, tmp_path):
    path = _external(tmp_path)
    absolute = str((path.parent / "tiny.onnx.data").resolve())
    _external_location(path, absolute)
    refused(run_cli, tmp_path, *compress_args(path, tmp_path), match="absolute path")


def _external_location(path: Path, location: str) -> None:
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(proto.SerializeToString())


def test_external_data_truncated(run_cli, tmp_path):
    path = _external(tmp_path)
    data = path.parent / "tiny.onnx.data"
    data.write_bytes(data.read_bytes()[:40])
    refused(run_cli, tmp_path, *compress_args(path, tmp_path), match="truncated external data")


def test_external_data_good_loads(tmp_path):
    """The same file with its data in place loads, and values match the in-memory model."""
    from helpers import tiny_cnn

    path = _external(tmp_path)
    loaded = io.load(path)
    expected = tiny_cnn().graph.initializers["w"].const_value.numpy()
    np.testing.assert_array_equal(loaded.graph.initializers["w"].const_value.numpy(), expected)


def test_opset_newer_than_onnxruntime(run_cli, tmp_path, tiny_path):
    proto = onnx.load(tiny_path)
    _, max_opset = io.ort_limits()
    proto.opset_import[0].version = max_opset + 2
    tiny_path.write_bytes(proto.SerializeToString())
    msg = refused(run_cli, tmp_path, *compress_args(tiny_path, tmp_path), match=f"opset {max_opset + 2}")
    assert f"at most opset {max_opset}" in msg


def test_unknown_pass(run_cli, tmp_path, tiny_path):
    msg = refused(run_cli, tmp_path, "compress", tiny_path, "-o", tmp_path / "o.onnx", "--passes", "fold-bm,cleanup",
                  match="unknown pass 'fold-bm'")
    assert "did you mean 'fold-bn'?" in msg


def test_mistyped_option_every_pass(run_cli, tmp_path, tiny_path):
    """Swapping two letters of any option of any pass is caught and the right option suggested."""
    import dataclasses

    checked = 0
    for name, cls in registry().items():
        for field in dataclasses.fields(cls.Options):
            if len(field.name) < 4:
                continue
            typo = field.name[0] + field.name[2] + field.name[1] + field.name[3:]
            if typo == field.name:
                continue
            refused(run_cli, tmp_path, "compress", tiny_path, "-o", tmp_path / "o.onnx", "--passes", f"{name}({typo}=1)",
                    match=f"unknown option '{typo}' for pass {name}; did you mean '{field.name}'?")
            checked += 1
    assert checked >= 2


def test_bad_option_value(run_cli, tmp_path, tiny_path):
    refused(run_cli, tmp_path, "compress", tiny_path, "-o", tmp_path / "o.onnx", "--passes", "cleanup(cse=perhaps)",
            match="option 'cse' of pass cleanup must be true or false")


def test_calibration_missing_input(run_cli, tmp_path, tiny_path):
    np.savez(tmp_path / "calib.npz", pixels=np.zeros((4, 3, 8, 8), np.float32))
    refused(run_cli, tmp_path, *compress_args(tiny_path, tmp_path, "--calib", tmp_path / "calib.npz"),
            match="no array named 'input'")


def test_calibration_wrong_shape(run_cli, tmp_path, tiny_path):
    np.savez(tmp_path / "calib.npz", input=np.zeros((4, 1, 8, 8), np.float32))
    msg = refused(run_cli, tmp_path, *compress_args(tiny_path, tmp_path, "--calib", tmp_path / "calib.npz"),
                  match="shape (4, 1, 8, 8)")
    assert "[N, 3, 8, 8]" in msg


def test_calibration_not_npz(run_cli, tmp_path, tiny_path):
    (tmp_path / "calib.npz").write_bytes(b"nonsense")
    refused(run_cli, tmp_path, *compress_args(tiny_path, tmp_path, "--calib", tmp_path / "calib.npz"),
            match="not a readable .npz")


def test_output_folder_missing(run_cli, tmp_path, tiny_path):
    refused(run_cli, tmp_path, "compress", tiny_path, "-o", tmp_path / "no" / "such" / "out.onnx", "--passes", "cleanup",
            match="does not exist")


def test_output_is_input(run_cli, tmp_path, tiny_path):
    refused(run_cli, tmp_path, "compress", tiny_path, "-o", tiny_path, "--passes", "cleanup", match="is the input model")


def test_output_is_input_via_other_spelling(run_cli, tmp_path, tiny_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(run_cli, tmp_path, "compress", tiny_path, "-o", "./sub/../tiny.onnx", "--passes", "cleanup",
            match="is the input model")


def test_neither_passes_nor_recipe(run_cli, tmp_path, tiny_path):
    refused(run_cli, tmp_path, "compress", tiny_path, "-o", tmp_path / "o.onnx", match="exactly one of --passes")


def test_bad_recipe(run_cli, tmp_path, tiny_path):
    (tmp_path / "r.toml").write_text('[[pass]]\nname = "cleanup"\ncse = "sometimes"\n')
    refused(run_cli, tmp_path, "compress", tiny_path, "-o", tmp_path / "o.onnx", "--recipe", tmp_path / "r.toml",
            match="r.toml: option 'cse' of pass cleanup must be true or false")


def test_inspect_bad_file(run_cli, tmp_path):
    (tmp_path / "x.onnx").write_bytes(_png())
    refused(run_cli, tmp_path, "inspect", tmp_path / "x.onnx", match="PNG image")
