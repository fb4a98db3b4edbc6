"""lowbit's embedded reference models, their data, and small synthetic graphs for tests.

* ``digits_cnn.onnx`` — residual CNN on scikit-learn's 8x8 digits, with BatchNormalization
  nodes kept (metric: top-1 on a fixed held-out split, ``evaluate.digits_top1``);
* ``tiny_llama.onnx`` — LLaMA-style byte-level decoder (RMSNorm, RoPE, SwiGLU; metric: bits
  per byte on held-out Python help text, ``evaluate.llama_bits_per_byte``);
* ``metrics.json`` — the float metrics and provenance measured when the files were made;
* ``data`` — the evaluation and calibration data (numpy only);
* ``synthetic`` — seeded ResNet / MobileNet / transformer blocks built with ``onnx_ir``;
* ``train_digits_cnn`` / ``train_tiny_llama`` — the torch scripts that made the two files;
* ``demo`` — ``lowbit demo``: the default pipeline on an embedded model, before and after;
* ``efficientnet_lite0`` / ``export_minilm`` — torch export scripts of pip-installed pretrained
  models (EfficientNet-Lite0, all-MiniLM-L6-v2), used by tests and benchmarks, never committed;
* ``imagenet_eval`` / ``minilm`` — their evaluation data and metrics (numpy and onnxruntime only).

Submodules are imported on demand; importing this package loads nothing heavy.
"""
