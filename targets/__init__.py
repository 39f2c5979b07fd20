"""Execution back ends: FP8 formats and their torch reference (``fp8``, ``fp8_ops``), FP8
modules (``fp8_linear``, ``fp8_embedding``), Triton kernels (``triton_fp8``), ONNX export
(``onnx``) and onnxruntime (``onnx_runtime``), checkpoint formats (``checkpoint``,
``hf_checkpoint``)."""
