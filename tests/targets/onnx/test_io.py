"""targets/onnx/io.py: example inputs named from forward's signature or dict keys (through
rewriter.capture.normalize_inputs), flat output names, metadata props from a config."""

from __future__ import annotations

import json

import pytest
import torch
from rewriter.targets.onnx.io import (
    Exported,
    default_output_names,
    example_tensors,
    flatten_outputs,
    metadata,
    widen,
)

from rewriter.errors import ExportInputError


class _Two(torch.nn.Module):
    def forward(self, tokens, mask, *rest):
        return {"logits": tokens * mask, "aux": (mask.sum(), None, [tokens.mean()])}


def test_example_tensors_names_and_errors():
    model = _Two()
    a, b, c = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    assert example_tensors(model, (a, b, c))[0] == ["tokens", "mask", "input_2"]
    names, tensors, kwargs = example_tensors(model, {"mask": b, "tokens": a})
    assert names == ["mask", "tokens"] and tensors[0] is b and kwargs
    assert example_tensors(model, a) == (["tokens"], [a], False)
    with pytest.raises(ExportInputError, match="example_inputs must be a tensor"):
        example_tensors(model, 3)
    with pytest.raises(ExportInputError, match="empty"):
        example_tensors(model, ())
    with pytest.raises(ExportInputError, match="'mask' must be a tensor, got int"):
        example_tensors(model, {"tokens": a, "mask": 1})
    with pytest.raises(ExportInputError, match="not a valid ONNX name"):
        example_tensors(model, {"bad name": a})


def test_flatten_outputs_and_the_exported_wrapper():
    model = _Two()
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    flat = flatten_outputs(model(a, b))
    assert [n for n, _ in flat] == ["logits", "aux_0", "aux_2_0"]
    wrapper = Exported(model, ["tokens", "mask"], as_kwargs=True)
    outs = wrapper(a, b)
    assert len(outs) == 3 and torch.equal(outs[0], a * b) and torch.equal(outs[1], b.sum())
    assert repr(wrapper) == "Exported(_Two)"
    head = torch.nn.Linear(4, 11)
    head.config = type("C", (), {"vocab_size": 11})()
    assert default_output_names(head, flatten_outputs(head(torch.randn(2, 4)))) == ["logits"]
    assert widen(torch.randn(1, 1, 4), [0, 1]).shape == (2, 2, 4)


def test_metadata_from_a_config_and_a_bad_config():
    model = torch.nn.Linear(3, 2)
    meta = metadata(model, {"moe": {"num_experts": 8, "top_k": 2, "gate": None}},
                    activations=None, dense_moe=False, opset=20)
    assert meta["rewriter.moe.num_experts"] == "8" and "rewriter.moe.gate" not in meta
    assert json.loads(meta["rewriter.conversion"])["moe"]["top_k"] == 2
    assert meta["rewriter.onnx.opset"] == "20" and "rewriter.onnx.fp8_activations" not in meta
    with pytest.raises(ExportInputError, match="config must be a dict, got list"):
        metadata(model, [1], activations=None, dense_moe=False, opset=20)
