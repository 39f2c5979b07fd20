"""Execution back ends: FP8 formats and reference, Triton kernels, ONNX export (to come)."""
