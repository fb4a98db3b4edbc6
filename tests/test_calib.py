"""Calibration sources: .npz, folders, random:N, module:function — validated and streamed."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest

from helpers import tiny_cnn
from lowbit.core.calib import open_calibration
from lowbit.core.errors import UserError


def _count(calib) -> int:
    return sum(feed["input"].shape[0] for feed in calib)


def test_npz_batches_and_values(tmp_path):
    data = np.random.default_rng(0).standard_normal((37, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", input=data)
    calib = open_calibration(str(tmp_path / "c.npz"), tiny_cnn(), batch_size=16)
    batches = list(calib)
    assert [b["input"].shape[0] for b in batches] == [16, 16, 5]
    np.testing.assert_array_equal(np.concatenate([b["input"] for b in batches]), data)
    assert calib.num_samples == 37
    assert _count(calib) == 37  # re-iterable


def test_npz_compressed_and_cast(tmp_path):
    data = np.random.default_rng(0).standard_normal((10, 3, 8, 8))  # float64: cast to the model's float32
    np.savez_compressed(tmp_path / "c.npz", input=data)
    batches = list(open_calibration(str(tmp_path / "c.npz"), tiny_cnn(), batch_size=4))
    assert batches[0]["input"].dtype == np.float32
    np.testing.assert_allclose(np.concatenate([b["input"] for b in batches]), data, rtol=1e-6)


def test_one_feed_per_entry(tmp_path):
    data = np.zeros((5, 2, 3, 8, 8), np.float32)  # 5 feeds of batch 2
    np.savez(tmp_path / "c.npz", input=data)
    batches = list(open_calibration(str(tmp_path / "c.npz"), tiny_cnn()))
    assert len(batches) == 5 and batches[0]["input"].shape == (2, 3, 8, 8)


def test_fixed_batch_model_takes_samples_in_its_own_batch(tmp_path):
    """An export with a fixed batch of 2 gets its 6 samples as 3 feeds of 2, whatever --batch-size says."""
    model = tiny_cnn()
    model.graph.inputs[0].shape = ir.Shape([2, 3, 8, 8])
    np.savez(tmp_path / "c.npz", input=np.zeros((6, 3, 8, 8), np.float32))
    batches = list(open_calibration(str(tmp_path / "c.npz"), model, batch_size=16))
    assert [b["input"].shape for b in batches] == [(2, 3, 8, 8)] * 3
    np.savez(tmp_path / "odd.npz", input=np.zeros((5, 3, 8, 8), np.float32))
    with pytest.raises(UserError, match="5 samples, not a multiple of the model's fixed batch size 2"):
        open_calibration(str(tmp_path / "odd.npz"), model)


def test_folder(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"part{i}.npz", input=np.full((4, 3, 8, 8), i, np.float32))
    calib = open_calibration(str(tmp_path), tiny_cnn(), batch_size=3)
    values = [float(b["input"][0, 0, 0, 0]) for b in calib]
    assert values == [0, 0, 1, 1, 2, 2]
    assert _count(calib) == 12


def test_random_warns_and_is_seeded():
    with pytest.warns(UserWarning, match="random calibration data"):
        a = open_calibration("random:20", tiny_cnn(), batch_size=8, seed=1)
        b = open_calibration("random:20", tiny_cnn(), batch_size=8, seed=1)
    assert _count(a) == 20
    np.testing.assert_array_equal(next(iter(a))["input"], next(iter(b))["input"])


def test_module_function(tmp_path):
    (tmp_path / "feeds.py").write_text(
        "import numpy as np\n"
        "def feeds():\n"
        "    for i in range(3):\n"
        "        yield {'input': np.full((2, 3, 8, 8), i, np.float32)}\n"
        "def broken():\n"
        "    yield {'input': np.zeros((2, 5, 8, 8), np.float32)}\n"
    )
    calib = open_calibration(f"{tmp_path / 'feeds.py'}:feeds", tiny_cnn())
    assert _count(calib) == 6
    bad = open_calibration(f"{tmp_path / 'feeds.py'}:broken", tiny_cnn())
    with pytest.raises(UserError, match=r"shape \(2, 5, 8, 8\)"):
        list(bad)
    with pytest.raises(UserError, match="has no function 'nothing'"):
        open_calibration(f"{tmp_path / 'feeds.py'}:nothing", tiny_cnn())


@pytest.mark.parametrize("spec, message", [
    ("random:0", "positive number"),
    ("random:x", "positive number"),
    ("no/such/file.npz", "no such file"),
    ("no_such_module_xyz:f", "cannot import"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        open_calibration(spec, tiny_cnn())


def test_memory_does_not_grow_with_samples(tmp_path):
    """Streaming 6000 samples (4.6 MB) in batches of 16 holds about one batch (12 KiB) at a time."""
    samples = 6000
    np.savez(tmp_path / "big.npz", input=np.random.default_rng(0).standard_normal((samples, 3, 8, 8)).astype(np.float32))
    calib = open_calibration(str(tmp_path / "big.npz"), tiny_cnn(), batch_size=16)
    tracemalloc.start()
    seen = 0
    for feed in calib:
        seen += feed["input"].shape[0]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seen == samples
    whole = samples * 3 * 8 * 8 * 4
    assert peak < whole / 20, f"peak {peak} bytes while streaming a {whole}-byte array"
