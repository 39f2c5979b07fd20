"""onnxruntime session helper: providers, running, comparing with PyTorch, the FP8
teacher-forced check, the W8A8-safe parity check (activation quantization bypassed), and the
one-onnxruntime-per-environment rule."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
import rewriter.targets.onnx_runtime as onnx_runtime
import torch
from onnx import numpy_helper
from rewriter.targets.fp8 import dequantize_blockwise
from rewriter.targets.fp8_linear import FP8Linear
from rewriter.targets.onnx import export_onnx
from rewriter.targets.onnx_runtime import (
    OnnxRuntimeError,
    activations_bypassed,
    check_fp8_linears,
    check_onnxruntime_install,
    check_parity,
    compare_with_torch,
    default_providers,
    make_session,
    run_onnx,
)

from rewriter.errors import InputError

ROOT = Path(__file__).resolve().parents[2]


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 4)
        self.b = torch.nn.Linear(6, 3)

    def forward(self, x, y):
        return {"first": self.a(x), "second": self.b(x * y)}


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    path = tmp_path_factory.mktemp("ort") / "two.onnx"
    x = (torch.randn(2, 5, 6), torch.randn(2, 5, 6))
    report = export_onnx(model, path, example_inputs=x)
    return model, report


def test_session_and_run_by_name_or_position(two_heads):
    model, report = two_heads
    assert report.input_names == ("x", "y") and report.output_names == ("first", "second")
    session = make_session(report.path)
    assert session.get_providers() == ["CPUExecutionProvider"]
    x, y = torch.randn(3, 9, 6), torch.randn(3, 9, 6)
    by_name = run_onnx(session, {"x": x, "y": y.numpy()})
    by_pos = run_onnx(report.path, (x, y))
    assert list(by_name) == ["first", "second"]
    for k in by_name:
        np.testing.assert_array_equal(by_name[k], by_pos[k])
    with torch.no_grad():
        ref = model(x, y)
    np.testing.assert_allclose(by_name["second"], ref["second"].numpy(), rtol=1e-5, atol=1e-6)
    diff = compare_with_torch(model, session, (x, y))
    assert diff["rel"] <= 1e-6 and set(diff["per_output"]) == {"first", "second"}
    assert diff["shape"] in ((3, 9, 4), (3, 9, 3)) and diff["providers"] == [
        "CPUExecutionProvider"]
    assert 0.0 <= diff["argmax_agreement"] <= 1.0


def test_compare_detects_a_different_model(two_heads):
    model, report = two_heads
    other = TwoHeads().eval()
    diff = compare_with_torch(other, report.path, (torch.randn(1, 2, 6), torch.randn(1, 2, 6)))
    assert diff["rel"] > 1e-2


def test_bad_inputs_and_options(two_heads, tmp_path):
    _, report = two_heads
    session = make_session(report.path, ["CPUExecutionProvider"], threads=1,
                           optimization="basic")
    with pytest.raises(InputError, match="missing"):  # feeds are the user's input
        run_onnx(session, {"x": torch.randn(1, 2, 6)})
    with pytest.raises(InputError, match="takes 2 inputs"):
        run_onnx(session, (torch.randn(1, 2, 6),))
    with pytest.raises(OnnxRuntimeError,
                       match="size 5 on axis 2, but the ONNX graph fixes that axis to 6"):
        run_onnx(session, (torch.randn(1, 2, 5), torch.randn(1, 2, 5)))
    with pytest.raises(FileNotFoundError):
        make_session(tmp_path / "nothing.onnx")
    with pytest.raises(OnnxRuntimeError, match="not available.*CPUExecutionProvider"):
        make_session(report.path, ["NoSuchExecutionProvider"])
    with pytest.raises(InputError, match="optimization"):
        make_session(report.path, optimization="max")
    with pytest.raises(InputError, match="threads"):
        make_session(report.path, threads=0)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(OnnxRuntimeError, match="could not load"):
        make_session(broken)


def test_cuda_first_when_available(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_providers() == ["CPUExecutionProvider"]


def test_exactly_one_onnxruntime_distribution(monkeypatch):
    assert check_onnxruntime_install() in ("onnxruntime", "onnxruntime-gpu")
    real = importlib.metadata.version

    def both(name):
        return "1.0" if name in ("onnxruntime", "onnxruntime-gpu") else real(name)

    monkeypatch.setattr(importlib.metadata, "version", both)
    with pytest.raises(OnnxRuntimeError, match="both onnxruntime and onnxruntime-gpu"):
        check_onnxruntime_install()


def test_no_extra_pulls_both_onnxruntimes():
    """The CPU and GPU builds provide the same module: no extra may contain both, and no
    extra may contain one of them as a side effect of another."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})

    def names(reqs):
        return {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}

    for extra, reqs in extras.items():
        assert not {"onnxruntime", "onnxruntime-gpu"} <= names(reqs), extra
    assert not names(project.get("dependencies", [])) & {"onnxruntime", "onnxruntime-gpu"}


def _rewrite(proto, name, fn, path):
    for init in proto.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(init).copy()), name))
    onnx.save(proto, str(path))


def test_fp8_teacher_forced_check_catches_wrong_numbers(tmp_path):
    torch.manual_seed(0)
    lin = FP8Linear(torch.randn(96, 300), torch.randn(96), mode="inference")
    x = torch.randn(2, 7, 300)
    report = export_onnx(lin, tmp_path / "lin.onnx", example_inputs=(x,))
    good = check_fp8_linears(report.path, (x,), model=lin)
    assert good == {"linears": 1, "w8a8": 1, "w8a16": 0, "q_mismatches": 0,
                    "scale_mismatches": 0, "weight_mismatches": 0, "max_rel": good["max_rel"],
                    "fp8_initializers": 1}
    assert good["max_rel"] <= 1e-6
    proto = onnx.load(str(report.path))
    fp8 = {i.name for i in proto.graph.initializer
           if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in fp8)
    bad = tmp_path / "bad.onnx"

    def one_block_off(s):  # the scales of the first 128-block of K, 1% off
        s[0, :] *= 1.01
        return s

    _rewrite(proto, dq.input[1], one_block_off, bad)
    assert check_fp8_linears(bad, (x,), model=lin)["weight_mismatches"] == 1

    def not_blocked(s):
        s[0, 0] *= 2
        return s

    _rewrite(proto, dq.input[1], not_blocked, bad)
    with pytest.raises(ValueError, match="not per 128-row block"):
        check_fp8_linears(bad, (x,))
    # the activations' scale amax / 448 computed with a wrong constant
    proto = onnx.load(str(report.path))
    e4m3_max = next(i.name for i in proto.graph.initializer
                    if i.data_type == onnx.TensorProto.FLOAT and i.dims == []
                    and numpy_helper.to_array(i) == 448.0)
    _rewrite(proto, e4m3_max, lambda v: np.array(440.0, dtype=np.float32), bad)
    wrong = check_fp8_linears(bad, (x,))
    assert wrong["scale_mismatches"] > 0


def test_fp8_check_reads_a_weight_scale_the_graph_computes(tmp_path):
    """A hybrid model's export left a weight scale as a node output, not an initializer
    (NemotronH): the check reads its value from the run."""
    torch.manual_seed(1)
    lin = FP8Linear(torch.randn(96, 300), torch.randn(96), mode="inference")
    x = torch.randn(2, 7, 300)
    report = export_onnx(lin, tmp_path / "lin.onnx", example_inputs=(x,))
    proto = onnx.load(str(report.path))
    fp8 = {i.name for i in proto.graph.initializer
           if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in fp8)
    scale = dq.input[1]
    next(i for i in proto.graph.initializer if i.name == scale).name = scale + "_stored"
    proto.graph.node.insert(0, onnx.helper.make_node("Identity", [scale + "_stored"], [scale]))
    onnx.save(proto, str(tmp_path / "computed.onnx"))
    got = check_fp8_linears(tmp_path / "computed.onnx", (x,), model=lin)
    assert (got["linears"], got["weight_mismatches"], got["q_mismatches"]) == (1, 0, 0)
    assert got["max_rel"] <= 1e-6


def test_module_has_no_gpu_only_imports():
    # importable and usable on a CPU-only onnxruntime build
    assert onnx_runtime.default_providers() == ["CPUExecutionProvider"] or \
        torch.cuda.is_available()


class _Chain(torch.nn.Module):
    """fp32 linear -> GELU -> W8A8 FP8 linear -> W8A8 FP8 linear: the FP8 layers' inputs come
    from fp32 matmuls, whose summation order differs between onnxruntime and PyTorch."""

    def __init__(self, d: int = 200, h: int = 136, n: int = 40):
        super().__init__()
        self.first = torch.nn.Linear(d, h)
        self.mid = FP8Linear(torch.randn(h, h) / h**0.5, torch.randn(h), mode="inference")
        self.last = FP8Linear(torch.randn(n, h) / h**0.5, None, mode="inference")

    def forward(self, x):
        return self.last(torch.nn.functional.gelu(self.mid(torch.nn.functional.gelu(
            self.first(x)))))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    torch.manual_seed(0)
    model = _Chain().eval()
    report = export_onnx(model, tmp_path_factory.mktemp("parity") / "chain.onnx",
                         example_inputs=(torch.randn(2, 7, 200),))
    return model, report


def test_activations_bypassed_switches_w8a8_to_weight_only_and_back(chain):
    model, _ = chain
    x = torch.randn(3, 5, 200)
    with torch.no_grad():
        w8a8 = model(x)
        with activations_bypassed(model) as n:
            assert n == 2 and model.mid.activations == model.last.activations == "none"
            bypassed = model(x)
        assert model.mid.activations == model.last.activations == "fp8"
        again = model(x)
    assert torch.equal(w8a8, again) and not torch.equal(w8a8, bypassed)
    h = torch.nn.functional.gelu(model.first(x))  # weight-only: x @ dequantized W^T + b
    w_mid = dequantize_blockwise(model.mid.weight_q, model.mid.weight_scale)
    w_last = dequantize_blockwise(model.last.weight_q, model.last.weight_scale)
    h = torch.nn.functional.gelu(h @ w_mid.T + model.mid.bias)
    torch.testing.assert_close(bypassed, h @ w_last.T)


def test_check_parity_judges_w8a8_with_quantization_bypassed(chain):
    model, report = chain
    x = torch.randn(3, 33, 200)
    parity = check_parity(model, report.path, x)
    assert parity["passed"] and parity["failures"] == [], parity
    assert parity["mode"] == "bypassed" and parity["rel"] <= 1e-5
    fp8 = parity["fp8"]
    assert fp8["linears"] == fp8["w8a8"] == 2 and fp8["max_rel"] <= 1e-6, fp8
    assert fp8["q_mismatches"] == fp8["scale_mismatches"] == fp8["weight_mismatches"] == 0
    # the quantized graph's own numbers: information (reported, not judged)
    assert set(parity["quantized"]) == {"rel", "max_abs", "argmax_agreement"}
    assert 0.0 <= parity["quantized"]["argmax_agreement"] <= 1.0


def test_bypassed_file_is_the_weight_only_export(chain, tmp_path):
    """Removing the activation QDQ pairs of the W8A8 file gives the graph that
    export_onnx(activations="none") writes: same outputs, no QuantizeLinear left."""
    model, report = chain
    proto = onnx.load(str(report.path))
    assert onnx_runtime.bypass_activation_quantization(proto) == 2
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" not in ops and ops.count("DequantizeLinear") == 2  # the weights
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(tmp_path / "bypassed.onnx"))
    plain = export_onnx(model, tmp_path / "plain.onnx", example_inputs=(torch.randn(2, 7, 200),),
                        activations="none")
    x = torch.randn(2, 11, 200)
    a = run_onnx(tmp_path / "bypassed.onnx", (x,))["output"]
    b = run_onnx(plain.path, (x,))["output"]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


def test_check_parity_fails_on_wrong_fp8_numbers_or_a_different_model(chain, tmp_path):
    model, report = chain
    x = torch.randn(2, 9, 200)
    # the activations' scale amax / 448 computed with a wrong constant in the W8A8 graph
    proto = onnx.load(str(report.path))
    e4m3_max = next(i.name for i in proto.graph.initializer
                    if i.data_type == onnx.TensorProto.FLOAT and i.dims == []
                    and numpy_helper.to_array(i) == 448.0)
    bad = tmp_path / "bad.onnx"
    _rewrite(proto, e4m3_max, lambda v: np.array(440.0, dtype=np.float32), bad)
    parity = check_parity(model, bad, x)
    assert not parity["passed"] and parity["rel"] <= 1e-5  # the bypassed graph is fine
    assert any("scale mismatches" in f for f in parity["failures"]), parity["failures"]
    # another model's weights: the bypassed outputs and the FP8 weights both disagree
    torch.manual_seed(1)
    other = _Chain().eval()
    parity = check_parity(other, report.path, x)
    assert not parity["passed"] and parity["rel"] > 1e-2
    assert parity["fp8"]["weight_mismatches"] == 2, parity["fp8"]
    assert any(f.startswith("bypassed outputs: rel") for f in parity["failures"])


def test_check_parity_without_activation_quantization_is_a_direct_comparison(two_heads):
    model, report = two_heads
    x = (torch.randn(3, 9, 6), torch.randn(3, 9, 6))
    parity = check_parity(model, report.path, x)
    assert parity["passed"] and parity["mode"] == "exact" and parity["fp8"] is None
    assert parity["quantized"] is None and parity["rel"] <= 1e-6
    assert not check_parity(TwoHeads().eval(), report.path, x)["passed"]
