"""Train and export ``digits_cnn.onnx``, the small residual CNN on scikit-learn's 8x8 digits.

Run as ``python -m lowbit.models.train_digits_cnn`` (needs torch and scikit-learn, the
``models`` extra). It writes, next to this file:

* ``digits_data.npz`` — the fixed split (see ``lowbit.models.data``);
* ``digits_cnn.onnx`` — the exported float model, input ``input`` float32 [batch, 1, 8, 8] in
  [0, 1], output ``logits`` float32 [batch, 10], IR version 10, ai.onnx opset 21, weights inside;
* the ``digits_cnn`` entry of ``metrics.json`` — top-1 measured by onnxruntime on the held-out
  split, parameter count, file size, training settings.

Architecture (every conv 3x3, stride 1, padding 1, no bias since a BatchNorm follows)::

    Conv(1→16)-BN-ReLU, Conv(16→32)-BN-ReLU,
    residual [Conv(32→32)-BN-ReLU-Conv(32→32)-BN] + skip → ReLU,
    MaxPool 2x2 (8x8 → 4x4), Conv(32→64)-BN-ReLU, global average pool, flatten, Linear(64→10)

The graph is exported without the exporter's optimizer so that every ``BatchNormalization``
node stays in the file: they are what lowbit's ``fold-bn`` pass folds,
``W' = W·γ/√(σ²+ε)``, ``b' = (b−μ)·γ/√(σ²+ε) + β``.

Training is deterministic: one seed for weight initialisation, batch order and augmentation
(random shifts of up to one pixel, zero filled), single-process, deterministic algorithms.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import numpy as np
import torch
from torch import nn

from lowbit.models import _export, data

MODELS_DIR = pathlib.Path(__file__).resolve().parent
ONNX_PATH = MODELS_DIR / "digits_cnn.onnx"
N_CALIB = 256


def make_split() -> dict[str, np.ndarray]:
    """Split scikit-learn's digits as ``data.DIGITS_SPLIT`` says; images NCHW float32 in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / np.float32(16.0))[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, stratify=labels, **data.DIGITS_SPLIT
    )
    return {
        "x_train": np.ascontiguousarray(x_train),
        "y_train": np.ascontiguousarray(y_train),
        "x_test": np.ascontiguousarray(x_test),
        "y_test": np.ascontiguousarray(y_test),
    }


def save_split(split: dict[str, np.ndarray]) -> None:
    """Write ``digits_data.npz`` (calibration images and the held-out split only)."""
    np.savez_compressed(
        data.DIGITS_NPZ,
        x_calib=split["x_train"][:N_CALIB],
        x_test=split["x_test"],
        y_test=split["y_test"],
    )
    data._digits_arrays.cache_clear()


def conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]


class ResidualBlock(nn.Module):
    """``relu(x + BN(Conv(relu(BN(Conv(x))))))`` at constant width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(channels, channels), nn.ReLU(), *conv_bn(channels, channels)
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(1, 16),
            nn.ReLU(),
            *conv_bn(16, 32),
            nn.ReLU(),
            ResidualBlock(32),
            nn.MaxPool2d(2),
            *conv_bn(32, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.mean(dim=(2, 3))
        return self.head(x)


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, filling with zeros."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out[i] = padded[i, :, dy : dy + h, dx : dx + w]
    return out


def train(split: dict[str, np.ndarray], *, epochs: int, seed: int, batch_size: int, lr: float):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsCNN()
    x_train = torch.from_numpy(split["x_train"])
    y_train = torch.from_numpy(split["y_train"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total = 0.0
        for start in range(0, len(x_train), batch_size):
            idx = order[start : start + batch_size]
            xb = random_shift(x_train[idx], generator)
            loss = loss_fn(model(xb), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / len(x_train):.4f}", flush=True)
    model.eval()
    return model


def export(model: nn.Module, path: pathlib.Path, metadata: dict[str, str]):
    """Export with a dynamic batch axis, keeping the BatchNormalization nodes."""
    # The unoptimized graph carries zero conv biases built at run time and unused constants;
    # clean_exported folds those without touching the BatchNormalization nodes.
    return _export.export_torch(model, torch.zeros(2, 1, 8, 8), "input", {0: ("batch", 4096)}, path, metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40, help="training epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    split = make_split()
    save_split(split)

    started = time.perf_counter()
    model = train(split, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr)
    train_seconds = time.perf_counter() - started
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(split["x_test"])).numpy()
    torch_top1 = float(np.mean(torch_logits.argmax(axis=1) == split["y_test"]))

    metadata = {
        "lowbit.model": "digits_cnn",
        "lowbit.metric": "top1",
        "lowbit.dataset": "sklearn load_digits, held-out 30% stratified split (random_state=0)",
    }
    onnx_model = export(model, ONNX_PATH, metadata)

    from lowbit.models import evaluate

    top1 = evaluate.digits_top1(ONNX_PATH)
    record = {
        "file": ONNX_PATH.name,
        "metric": "top1",
        "top1": top1,
        "top1_torch": torch_top1,
        "n_test": int(len(split["y_test"])),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "file_bytes": ONNX_PATH.stat().st_size,
        "ir_version": onnx_model.ir_version,
        "opset": onnx_model.opset_imports[""],
        "op_histogram": _export.op_histogram(onnx_model),
        "training": {
            "epochs": args.epochs,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "optimizer": f"AdamW(weight_decay=1e-4), one-cycle lr peak {args.lr}",
            "augmentation": "random shift up to 1 pixel",
            "train_images": int(len(split["y_train"])),
            "seconds": round(train_seconds, 1),
            "torch": torch.__version__,
        },
    }
    _export.update_metrics("digits_cnn", record)
    print(f"top-1 (onnxruntime) {top1:.4f}, torch {torch_top1:.4f}, {train_seconds:.1f} s")

if __name__ == "__main__":
    main()
