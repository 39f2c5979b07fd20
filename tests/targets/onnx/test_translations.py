"""targets/onnx/translations.py: the custom translation table, unknown custom ops named from
the ExportedProgram (node and op), nothing left behind on failure."""

from __future__ import annotations

import pytest
import torch
from rewriter.targets.fp8_linear import ACTIVATION_MODES
from rewriter.targets.onnx import export_onnx
from rewriter.targets.onnx import fp8 as onnx_fp8
from rewriter.targets.onnx.translations import fp8_translation_table, untranslated_ops

from rewriter.errors import ExportInputError, OnnxExportError

_ops = torch.ops.rewriter


@torch.library.custom_op("onnx_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class _Mystery(torch.nn.Module):
    def forward(self, x):
        return torch.ops.onnx_test.mystery(x + 1)


def test_unsupported_op_is_named_and_nothing_is_left_behind(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"earlier export")
    with pytest.raises(OnnxExportError, match="onnx_test.mystery") as info:
        export_onnx(_Mystery(), target, example_inputs=(torch.randn(2, 3),))
    err = info.value
    assert err.stage == "translate" and err.node == "mystery" and "onnx_test" in err.op
    assert "no ONNX translation" in str(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert target.read_bytes() == b"earlier export"



def test_translation_table_follows_the_activation_mode():
    assert ACTIVATION_MODES == ("fp8", "none")
    own, w8a8, w8a16 = (fp8_translation_table(a) for a in (None, "fp8", "none"))
    assert set(own) == set(w8a8) == set(w8a16) and len(own) == 8
    linear, weight_only = _ops.fp8_linear.default, _ops.fp8_weight_only_linear.default
    assert own[linear] is w8a8[linear] is onnx_fp8.fp8_linear
    assert w8a16[linear] is onnx_fp8.fp8_linear_weight_only
    assert own[weight_only] is w8a16[weight_only] is onnx_fp8.fp8_weight_only_linear
    assert w8a8[weight_only] is onnx_fp8.fp8_weight_only_as_w8a8
    for bad in ("int8", "FP8", 8):
        with pytest.raises(ExportInputError, match="activations must be one of None, 'fp8'"):
            fp8_translation_table(bad)


def test_untranslated_ops_names_custom_ops_without_a_translation():
    program = torch.export.export(_Mystery(), (torch.randn(2, 3),), strict=False)
    assert untranslated_ops(program, {}) == [("mystery", "onnx_test.mystery.default")]
    table = {torch.ops.onnx_test.mystery.default: lambda x: x}
    assert untranslated_ops(program, table) == []  # aten ops are the exporter's own
