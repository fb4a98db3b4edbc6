"""Quantization numerics, independent of any graph: grids, rounding (RTN, GPTQ, codebooks) and
activation range observers. The ``quantize`` pass maps graph weights onto these and back."""
