"""onnxruntime sessions for exported models, and parity checks against PyTorch.

    sess = make_session("model.onnx")                   # CUDA when available, else CPU
    outs = run_onnx(sess, {"input_ids": ids})           # {"logits": ndarray}
    diff = compare_with_torch(model, "model.onnx", {"input_ids": ids})
    diff["rel"], diff["max_abs"], diff["argmax_agreement"]
    parity = check_parity(model, "model.onnx", {"input_ids": ids})   # W8A8-safe verdict
    parity["passed"], parity["failures"]

``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same Python module, so exactly one of
them may be in an environment: :func:`check_onnxruntime_install` says which one is there and
raises when both are (pip would let the second overwrite the first's files).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from rewriter.errors import InputError, OnnxRuntimeError

from . import fp8 as fp8_ref
from .fp8_linear import FP8Linear, FP8MoEFFN
from .onnx import flatten_outputs

__all__ = [
    "OnnxRuntimeError",
    "activations_bypassed",
    "check_fp8_linears",
    "check_onnxruntime_install",
    "bypass_activation_quantization",
    "check_parity",
    "compare_with_torch",
    "default_providers",
    "make_session",
    "run_onnx",
]

_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def check_onnxruntime_install() -> str:
    """The one onnxruntime distribution installed ("onnxruntime" or "onnxruntime-gpu").

    Raises :class:`OnnxRuntimeError` when none or both are installed."""
    found = []
    for dist in _DISTRIBUTIONS:
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        found.append(dist)
    if len(found) > 1:
        raise OnnxRuntimeError(
            "both onnxruntime and onnxruntime-gpu are installed in this environment; they "
            "provide the same module and overwrite each other's files. Keep one: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'rewriter[onnxruntime]'"
            " (or '[onnxruntime-gpu]')")
    if not found:
        raise OnnxRuntimeError("onnxruntime is not installed: pip install 'rewriter[onnxruntime]'"
                               " (CPU) or 'rewriter[onnxruntime-gpu]' (CUDA)")
    return found[0]


def _ort():
    try:  # optional dependency (the [onnxruntime] / [onnxruntime-gpu] extras): lazy
        import onnxruntime
    except ImportError as e:
        raise OnnxRuntimeError("onnxruntime is not installed: pip install 'rewriter["
                               "onnxruntime]' (CPU) or 'rewriter[onnxruntime-gpu]'") from e
    return onnxruntime


def default_providers() -> list[str]:
    """["CUDAExecutionProvider", "CPUExecutionProvider"] when onnxruntime has CUDA and torch
    sees a GPU, else ["CPUExecutionProvider"]."""
    available = _ort().get_available_providers()
    if "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path: str | os.PathLike, providers: Sequence[str] | None = None, *,
                 threads: int | None = None, optimization: str = "all",
                 spinning: bool = True, fold_weight_dequantization: bool = True):
    """An ``onnxruntime.InferenceSession`` for ``path``.

    ``providers``: default :func:`default_providers` (CUDA when available, else CPU); a
    provider onnxruntime does not have raises, naming the ones it has. ``threads``: intra-op
    threads (default onnxruntime's). ``optimization``: "all", "extended", "basic" or
    "disable" (graph optimization level). ``spinning=False``: the intra-op threads sleep
    between runs instead of spinning (use it when onnxruntime shares the cores with other
    work, e.g. interleaved with PyTorch in a benchmark). ``fold_weight_dequantization``
    (default True): FP8 weights are dequantized once, when the session loads (onnxruntime's
    constant folding of ``DequantizeLinear`` on initializers, session config
    ``session.disable_quant_qdq=1``), instead of on every run; the file stays FP8, the session
    holds fp32 weights (4 bytes per weight of RAM). The dequantized weights are the same
    ``q * scale`` products; the MatMul on a constant weight may use prepacked kernels, so
    results move by summation order only (~1e-7 relative). Activation quantization (W8A8)
    still runs per call. False keeps
    onnxruntime's default (QDQ kept for quantized-kernel fusion; no FP8 kernels on CPU)."""
    ort = _ort()
    check_onnxruntime_install()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {str(path)!r}")
    available = ort.get_available_providers()
    providers = list(default_providers() if providers is None else providers)
    if not providers:
        raise InputError("providers must name at least one execution provider")
    missing = [p for p in providers if p not in available]
    if missing:
        raise OnnxRuntimeError(f"execution provider(s) {missing} not available in this "
                               f"onnxruntime build; available: {available}")
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    if optimization not in levels:
        raise InputError(f"optimization must be one of {', '.join(levels)}, got "
                         f"{optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 3  # errors only: no "removing unused initializer" chatter
    if not isinstance(fold_weight_dequantization, bool):
        raise InputError(f"fold_weight_dequantization must be a bool, got "
                         f"{fold_weight_dequantization!r}")
    if fold_weight_dequantization:  # DequantizeLinear of initializers folded at load
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise InputError(f"threads must be a positive int, got {threads!r}")
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:
        raise OnnxRuntimeError(f"onnxruntime could not load {str(path)!r}: {e}") from e
    used = session.get_providers()
    if providers[0] not in used:
        warnings.warn(f"{providers[0]} could not be used; running on {used}", stacklevel=2)
    return session


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _feeds(session, inputs: Any) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = (inputs,)
    if isinstance(inputs, Mapping):
        unknown = set(inputs) - set(names)
        missing = set(names) - set(inputs)
        if unknown or missing:
            raise InputError(f"inputs do not match the model's inputs {names}: "
                             f"unknown {sorted(unknown)}, missing {sorted(missing)}")
        return {k: _numpy(inputs[k]) for k in names}
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != len(names):
            raise InputError(f"the model takes {len(names)} inputs {names}, got {len(inputs)}")
        return {k: _numpy(v) for k, v in zip(names, inputs)}
    raise TypeError(f"inputs must be a tensor, a tuple or a dict, got {type(inputs).__name__}")


def _check_fixed_dims(session, feeds: Mapping[str, np.ndarray]) -> None:
    """A clear error when an input's size differs from one the graph fixes (onnxruntime
    itself fails deep inside with 'Shape mismatch attempting to re-use buffer')."""
    for spec in session.get_inputs():
        shape = feeds[spec.name].shape
        for axis, dim in enumerate(spec.shape or ()):
            if isinstance(dim, int) and axis < len(shape) and shape[axis] != dim:
                raise OnnxRuntimeError(
                    f"input {spec.name!r} has size {shape[axis]} on axis {axis}, but the ONNX "
                    f"graph fixes that axis to {dim} (a feature size, or an axis the model's "
                    "code made static when exported: ExportReport.dynamic_axes lists the axes "
                    "that stayed dynamic)")


def run_onnx(session_or_path: Any, inputs: Any) -> dict[str, np.ndarray]:
    """Run an exported model: ``inputs`` a tensor, a tuple (in the model's input order) or a
    dict by input name (torch tensors or numpy arrays). -> {output name: ndarray}."""
    session = (make_session(session_or_path)
               if isinstance(session_or_path, (str, os.PathLike)) else session_or_path)
    feeds = _feeds(session, inputs)
    _check_fixed_dims(session, feeds)
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, feeds)
    except Exception as e:
        raise OnnxRuntimeError(f"onnxruntime failed to run the model: {e}") from e
    return dict(zip(names, values))


def _torch_outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            out = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = model(*inputs)
        else:
            out = model(inputs)
    return [t for _, t in flatten_outputs(out)]


def _session(proto: onnx.ModelProto):
    """A CPU session of an in-memory model (errors only in the log)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(proto.SerializeToString(), sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise OnnxRuntimeError(f"onnxruntime could not load the model: {e}") from e


def _fp8_tensor(array: np.ndarray) -> torch.Tensor:
    """An onnxruntime / onnx FLOAT8E4M3FN array (ml_dtypes or raw uint8) -> torch fp8."""
    raw = np.ascontiguousarray(array).view(np.uint8)
    return torch.from_numpy(raw.copy()).view(torch.float8_e4m3fn)


def _find_fp8_linears(graph, fp8_inits: set[str]) -> list[dict[str, Any]]:
    """MatMul(A, DequantizeLinear(FP8 W^T (K, N), axis 0)) or MatMul(A, Transpose(
    DequantizeLinear(FP8 W (N, K), axis 1))); A = DequantizeLinear(QuantizeLinear(x)) (W8A8)
    or x (W8A16)."""
    producer = {o: n for n in graph.node for o in n.output}
    found = []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        b = producer.get(node.input[1])
        transposed = b is not None and b.op_type == "DequantizeLinear"
        dq = b if transposed else (producer.get(b.input[0]) if b is not None
                                   and b.op_type == "Transpose" else None)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in fp8_inits:
            continue
        a = producer.get(node.input[0])
        ql = producer.get(a.input[0]) if a is not None and a.op_type == "DequantizeLinear" \
            else None
        entry = {"y": node.output[0], "w": dq.input[0], "w_scale": dq.input[1],
                 "transposed": transposed}
        if ql is not None and ql.op_type == "QuantizeLinear":
            entry.update(mode="w8a8", x=ql.input[0], x_scale=ql.input[1], q=ql.output[0])
        else:
            entry.update(mode="w8a16", x=node.input[0])
        found.append(entry)
    return found


def _model_fp8_weights(model: nn.Module) -> dict[bytes, torch.Tensor]:
    """bytes of every inference-mode FP8 weight (N, K) of ``model`` -> its block scales."""
    table = {}
    for m in model.modules():
        if isinstance(m, FP8Linear) and m.mode == "inference":
            pairs = [(m.weight_q, m.weight_scale)]
        elif isinstance(m, FP8MoEFFN) and m.mode == "inference":
            pairs = []
            for name in ("w_gate", "w_up", "w_down"):
                q, s = getattr(m, f"{name}_q"), getattr(m, f"{name}_scale")
                if q is not None:
                    pairs += list(zip(q.unbind(0), s.unbind(0)))
        else:
            continue
        for q, s in pairs:
            table[q.contiguous().view(torch.uint8).numpy().tobytes()] = s
    return table


def check_fp8_linears(path: str | os.PathLike, inputs: Any,
                      model: nn.Module | None = None) -> dict[str, Any]:
    """Teacher-forced check of every FP8 linear of an exported model against
    :mod:`rewriter.targets.fp8`: each linear's own input, taken from the onnxruntime run, is
    quantized by the torch reference and multiplied in fp32; the ONNX result must match.

    W8A8 quantization is a discontinuous function: a one-ulp difference of an upstream fp32
    value (onnxruntime and PyTorch sum matmuls in different orders) that sits on a rounding
    boundary moves one FP8 value by one step, so end-to-end parity of a W8A8 model is
    ~1e-7 except where such a boundary is crossed. This check isolates the FP8 layers from
    that effect. With ``model``, every FP8 weight and block scale in the file must also be
    the model's, bit for bit (``weight_mismatches``). -> ``{"linears", "w8a8", "w8a16",
    "q_mismatches", "scale_mismatches", "weight_mismatches", "max_rel", "fp8_initializers"}``
    (``q``/``scale``: the activations' FP8 values and 1x128 scales)."""
    proto = onnx.load(str(path))
    graph = proto.graph
    fp8_type = onnx.TensorProto.FLOAT8E4M3FN
    fp8_inits = {i.name for i in graph.initializer if i.data_type == fp8_type}
    inits = {i.name: i for i in graph.initializer}
    linears = _find_fp8_linears(graph, fp8_inits)
    meta = {p.key: p.value for p in proto.metadata_props}
    pow2 = "True" in (meta.get("rewriter.onnx.fp8_pow2_scales"),
                      meta.get("rewriter.fp8.pow2_scales"))
    wanted: dict[str, int] = {}
    for lin in linears:
        wanted[lin["x"]] = onnx.TensorProto.FLOAT
        wanted[lin["y"]] = onnx.TensorProto.FLOAT
        if lin["w_scale"] not in inits:  # computed in the graph (not folded): read its value
            wanted[lin["w_scale"]] = onnx.TensorProto.FLOAT
        if lin["mode"] == "w8a8":
            wanted[lin["x_scale"]] = onnx.TensorProto.FLOAT
            wanted[lin["q"]] = fp8_type
    present = {o.name for o in graph.output}
    for name, dtype in wanted.items():
        if name not in present:
            graph.output.append(onnx.helper.make_tensor_value_info(name, dtype, None))
    session = _session(proto)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, _feeds(session, inputs))))

    known = _model_fp8_weights(model) if model is not None else None
    q_bad = s_bad = w_bad = 0
    max_rel = 0.0
    for lin in linears:
        w_q = _fp8_tensor(numpy_helper.to_array(inits[lin["w"]]))  # (N, K) or (K, N)
        scale = (numpy_helper.to_array(inits[lin["w_scale"]]) if lin["w_scale"] in inits
                 else np.asarray(values[lin["w_scale"]], dtype=np.float32))
        s_rows = torch.from_numpy(scale.copy())
        if lin["transposed"]:  # stored W^T (K, N) with (Kb, N) scales
            w_q, s_rows = w_q.T.contiguous(), s_rows.T.contiguous()  # (N, K), (N, Kb)
        w_s = s_rows[::fp8_ref.BLOCK]  # (Nb, Kb): one row per 128-row block
        if not torch.equal(s_rows, w_s.repeat_interleave(fp8_ref.BLOCK, 0)[: s_rows.shape[0]]):
            raise ValueError(f"{lin['w_scale']}: expanded scales are not per 128-row block")
        if known is not None:
            expected_s = known.get(w_q.contiguous().view(torch.uint8).numpy().tobytes())
            w_bad += int(expected_s is None or not torch.equal(expected_s, w_s))
        k = w_q.shape[1]
        x = torch.from_numpy(np.asarray(values[lin["x"]], dtype=np.float32).copy())
        x = x.reshape(-1, k)
        y = torch.from_numpy(np.asarray(values[lin["y"]], dtype=np.float32).copy())
        y = y.reshape(-1, w_q.shape[0])
        if x.shape[0] == 0:
            continue
        if lin["mode"] == "w8a8":
            xq, xs = fp8_ref.quantize_rowwise(x, pow2=pow2)
            q_onnx = _fp8_tensor(values[lin["q"]]).reshape(xq.shape)
            q_bad += int((q_onnx.view(torch.uint8) != xq.view(torch.uint8)).sum())
            xs_onnx = torch.from_numpy(np.asarray(values[lin["x_scale"]]).copy())
            s_bad += int((xs_onnx.reshape(xs.shape) != xs).sum())
            expected = fp8_ref.fp8_gemm_reference(xq, xs, w_q, w_s)
        else:
            expected = x @ fp8_ref.dequantize_blockwise(w_q, w_s).T
        scale = float(expected.abs().max())
        err = float((y - expected).abs().max())
        max_rel = max(max_rel, err / scale if scale > 0 else err)
    return {"linears": len(linears), "w8a8": sum(lin["mode"] == "w8a8" for lin in linears),
            "w8a16": sum(lin["mode"] == "w8a16" for lin in linears), "q_mismatches": q_bad,
            "scale_mismatches": s_bad, "weight_mismatches": w_bad, "max_rel": max_rel,
            "fp8_initializers": len(fp8_inits)}


def compare_with_torch(model: nn.Module, session_or_path: Any, inputs: Any, *,
                       outputs: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``model`` (PyTorch, eval, no grad) and the ONNX model on the same ``inputs``.

    -> ``{"max_abs", "rel", "max_ref", "argmax_agreement", "shape", "providers",
    "per_output": {name: {...}}}`` where ``rel = max|onnx - torch| / max|torch|`` (the worst
    output), and ``argmax_agreement`` the fraction of positions whose argmax over the last dim
    agree (the next-token prediction for logits; None for rank-1 outputs).

    This is a raw comparison: for a W8A8 model (a step function) its ``rel`` passes or fails
    by whether an upstream ulp crosses an FP8 rounding boundary; judge parity with
    :func:`check_parity` instead."""
    session = (make_session(session_or_path)
               if isinstance(session_or_path, (str, os.PathLike)) else session_or_path)
    ort_out = run_onnx(session, inputs)
    torch_out = _torch_outputs(model, inputs)
    names = list(ort_out)
    if len(torch_out) != len(names):
        raise ValueError(f"the model returns {len(torch_out)} tensors, the ONNX graph "
                         f"{len(names)} ({names})")
    chosen = list(outputs) if outputs is not None else names
    per: dict[str, dict[str, Any]] = {}
    for name, ref in zip(names, torch_out):
        if name not in chosen:
            continue
        ref = ref.detach().float().cpu().numpy()
        got = np.asarray(ort_out[name], dtype=np.float32)
        if got.shape != ref.shape:
            raise ValueError(f"output {name!r}: ONNX shape {got.shape} != torch {ref.shape}")
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        max_ref = float(np.abs(ref).max()) if ref.size else 0.0
        agree = None
        if ref.ndim >= 2 and ref.size:
            agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
        per[name] = {"max_abs": max_abs, "max_ref": max_ref,
                     "rel": max_abs / max_ref if max_ref > 0 else max_abs,
                     "argmax_agreement": agree, "shape": tuple(ref.shape),
                     "finite": bool(np.isfinite(got).all() == np.isfinite(ref).all())}
    worst = max(per.values(), key=lambda d: d["rel"])
    return {"max_abs": worst["max_abs"], "rel": worst["rel"], "max_ref": worst["max_ref"],
            "argmax_agreement": worst["argmax_agreement"], "shape": worst["shape"],
            "providers": session.get_providers(), "per_output": per}


@contextlib.contextmanager
def activations_bypassed(model: nn.Module) -> Iterator[int]:
    """While open, every inference-mode FP8 linear / FP8 MoE block of ``model`` runs
    weight-only (``activations="none"``: W8A16, no activation quantization); yields how many
    were W8A8. Restored on exit. Training-mode modules are left alone (their forward always
    quantizes both operands)."""
    changed = [m for m in model.modules() if isinstance(m, (FP8Linear, FP8MoEFFN))
               and m.mode == "inference" and m.activations == "fp8"]
    for m in changed:
        m.activations = "none"
    try:
        yield len(changed)
    finally:
        for m in changed:
            m.activations = "fp8"


def bypass_activation_quantization(proto: onnx.ModelProto) -> int:
    """Rewire ``proto`` (in place) so that every activation QDQ pair, ``DequantizeLinear(
    QuantizeLinear(x))`` with ``x`` computed by the graph (not a constant: weight quantization
    in the graph is kept), passes ``x`` through unchanged; the pairs and the nodes only they
    used (amax, scale) are removed. -> how many pairs. The W8A8 file then computes what its
    model computes with ``activations="none"``."""
    graph = proto.graph
    consts = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    bypass: dict[str, str] = {}
    for node in graph.node:
        q = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in consts:
            bypass[node.output[0]] = q.input[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in bypass:
                node.input[i] = bypass[name]
    for out in graph.output:
        if out.name in bypass:  # a graph output keeps its name: an Identity feeds it
            graph.node.append(onnx.helper.make_node("Identity", [bypass[out.name]], [out.name],
                                                    name=f"{out.name}.bypass"))
    keep = [n for n in graph.node if not (n.op_type == "DequantizeLinear"
                                          and n.output[0] in bypass)]
    while True:  # dead code: the QuantizeLinears and the amax / scale subgraphs they used
        used = {i for n in keep for i in n.input} | {o.name for o in graph.output}
        live = [n for n in keep if set(n.output) & used]
        if len(live) == len(keep):
            break
        keep = live
    del graph.node[:]
    graph.node.extend(keep)
    return len(bypass)


def check_parity(model: nn.Module, path: str | os.PathLike, inputs: Any, *, tol: float = 1e-5,
                 fp8_tol: float = 1e-5) -> dict[str, Any]:
    """onnxruntime-vs-PyTorch parity of an exported model, valid for discontinuous models.

    A W8A8 model (FP8 activation quantization) is a step function of its input: a one-ulp
    difference upstream (onnxruntime and PyTorch sum matmuls in different orders) that lands
    on an FP8 rounding boundary moves an activation by one FP8 step, so end-to-end parity of
    the quantized graph passes or fails by chance. For a graph with activation QDQ this check
    asserts two things that do not depend on such luck:

    1. the file with its activation quantization bypassed
       (:func:`bypass_activation_quantization`: what ``export_onnx(..., activations="none")``
       writes) matches PyTorch run under :func:`activations_bypassed` to ``rel <= tol``
       (fp32 summation order only): every other weight and op of the file is the model's;
    2. :func:`check_fp8_linears` on the file: every FP8 code and 1x128 scale of the
       activations equals :mod:`rewriter.targets.fp8` on the layer's own input, the layer's
       output matches to ``max_rel <= fp8_tol``, and every FP8 weight is the model's.
       ``fp8_tol`` covers the fp32 summation order of one matmul (onnxruntime vs torch): it
       grows with K; SmolLM2's layers (K = 576 and 1536) measured 1.12e-6, so 1e-5, the
       export-parity tolerance of the whole model, not 1e-6.

    The quantized graph's end-to-end difference and next-token agreement are reported
    (``"quantized"``), never judged. A graph without activation QDQ, or a model without
    inference-mode W8A8 layers (training-mode layers cannot be bypassed in PyTorch), is
    compared directly at ``tol``.

    ``inputs``: a tensor, tuple or dict, as for :func:`run_onnx` and the model's forward.
    -> ``{"passed", "mode" ("exact" or "bypassed"), "rel", "max_abs", "argmax_agreement",
    "fp8" (check_fp8_linears' dict or None), "quantized" ({"rel", "max_abs",
    "argmax_agreement"} of the file itself, or None), "failures" [str]}``.
    Raises :class:`OnnxRuntimeError` when onnxruntime is missing or fails."""
    proto = onnx.load(str(path))
    pairs = bypass_activation_quantization(proto)
    failures: list[str] = []
    fp8 = info = None
    with activations_bypassed(model) as n_w8a8:
        if pairs and n_w8a8:
            exact = compare_with_torch(model, _session(proto), inputs)
    if pairs and n_w8a8:
        fp8 = check_fp8_linears(path, inputs, model=model)
        for key in ("q_mismatches", "scale_mismatches", "weight_mismatches"):
            if fp8[key]:
                failures.append(f"FP8 layers: {fp8[key]} {key.replace('_', ' ')}")
        if not fp8["max_rel"] <= fp8_tol:
            failures.append(f"FP8 layers: teacher-forced max_rel {fp8['max_rel']:.3g} > "
                            f"{fp8_tol:g}")
        q = compare_with_torch(model, path, inputs)
        info = {k: q[k] for k in ("rel", "max_abs", "argmax_agreement")}
    else:
        exact = compare_with_torch(model, path, inputs)
    if not exact["rel"] <= tol:
        failures.append(f"{'bypassed ' if fp8 is not None else ''}outputs: rel "
                        f"{exact['rel']:.3g} > {tol:g}")
    return {"passed": not failures, "mode": "bypassed" if fp8 is not None else "exact",
            "rel": exact["rel"], "max_abs": exact["max_abs"],
            "argmax_agreement": exact["argmax_agreement"], "fp8": fp8, "quantized": info,
            "failures": failures}
