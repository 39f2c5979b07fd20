"""onnxruntime session helper: providers, running, comparing with PyTorch, the FP8
teacher-forced check, and the one-onnxruntime-per-environment rule."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
import rewriter.targets.onnx_runtime as onnx_runtime
import torch
from onnx import numpy_helper
from rewriter.targets.fp8_linear import FP8Linear
from rewriter.targets.onnx_export import export_onnx
from rewriter.targets.onnx_runtime import (
    OnnxRuntimeError,
    check_fp8_linears,
    check_onnxruntime_install,
    compare_with_torch,
    default_providers,
    make_session,
    run_onnx,
)

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
    with pytest.raises(ValueError, match="missing"):
        run_onnx(session, {"x": torch.randn(1, 2, 6)})
    with pytest.raises(ValueError, match="takes 2 inputs"):
        run_onnx(session, (torch.randn(1, 2, 6),))
    with pytest.raises(OnnxRuntimeError, match="failed to run"):
        run_onnx(session, (torch.randn(1, 2, 5), torch.randn(1, 2, 5)))
    with pytest.raises(FileNotFoundError):
        make_session(tmp_path / "nothing.onnx")
    with pytest.raises(OnnxRuntimeError, match="not available.*CPUExecutionProvider"):
        make_session(report.path, ["NoSuchExecutionProvider"])
    with pytest.raises(ValueError, match="optimization"):
        make_session(report.path, optimization="max")
    with pytest.raises(ValueError, match="threads"):
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


def test_module_has_no_gpu_only_imports():
    # importable and usable on a CPU-only onnxruntime build
    assert onnx_runtime.default_providers() == ["CPUExecutionProvider"] or \
        torch.cuda.is_available()
