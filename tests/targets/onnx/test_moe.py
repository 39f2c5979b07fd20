"""targets/onnx/moe.py and MoE routing in the graph: sparse (TopK, per-expert NonZero/Gather,
ScatterND add) and dense_moe=True forms of one block give PyTorch's numbers, including single
tokens and experts without tokens; tied router scores pick the same (lowest) experts in
PyTorch and onnxruntime (case 05)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from rewriter.models.moe import MoEFFN
from rewriter.targets.fp8_linear import FP8MoEFFN
from rewriter.targets.onnx import export_onnx
from rewriter.targets.onnx.moe import dense_dispatch, moe_blocks, moe_dispatch
from rewriter.targets.onnx_runtime import compare_with_torch, make_session

TOL = 1e-5


def _moe_block(fp8: str | None, glu: bool = True, bias: bool = False):
    torch.manual_seed(1)
    block = MoEFFN(40, 24, 5, 2, shared_dim=8, activation="silu" if glu else "gelu", glu=glu,
                   bias=bias, gate="softmax")
    with torch.no_grad():
        block.router.weight.normal_(0, 1.0)
    if fp8 is not None:
        block = FP8MoEFFN(block, mode="inference", activations=fp8)
    return block.eval()


@pytest.mark.parametrize("fp8, glu, bias, dense_moe", [
    (None, False, True, False), (None, False, True, True), ("fp8", True, False, True),
    ("none", False, True, True)])
def test_moe_block_sparse_and_dense_forms(tmp_path, fp8, glu, bias, dense_moe):
    """One MoE block, sparse routing or (dense_moe=True) every expert on every token with
    zero weights off the top-k (static shapes): same numbers, including a single token and
    experts without tokens."""
    block = _moe_block(fp8, glu, bias)
    r = export_onnx(block, tmp_path / "moe.onnx", example_inputs=(torch.randn(2, 7, 40),),
                    dense_moe=dense_moe)
    ops = r.op_counts
    assert ops["TopK"] >= 1  # routing (the tie rule may add a TopK: models.moe.select_topk)
    if dense_moe:
        assert "NonZero" not in ops and "ScatterND" not in ops
        assert r.metadata["rewriter.onnx.moe_dispatch"] == "dense"
    else:
        assert ops["NonZero"] == 5 and ops["ScatterND"] == 5
    session = make_session(r.path)
    for x in (torch.randn(1, 1, 40), torch.randn(2, 7, 40), torch.randn(3, 33, 40)):
        with torch.no_grad():
            block(x)
        if x.shape[1] == 1:
            assert int((block.last_load == 0).sum()) == 3  # one token, top 2 of 5 experts
        assert compare_with_torch(block, session, (x,))["rel"] <= TOL


@pytest.mark.parametrize("gate", ["hard", "softmax"])
def test_tied_router_scores_pick_the_lowest_experts_in_torch_and_onnx(tmp_path, gate):
    """Case 05: a zero router gives every token 5 equal scores; ONNX TopK takes the lowest
    indices on ties, and so does torch routing: both pick experts {0, 1}, the outputs agree."""
    torch.manual_seed(0)
    block = MoEFFN(32, 16, 5, 2, activation="silu", gate=gate).eval()
    with torch.no_grad():
        block.router.weight.zero_()
    x = torch.randn(3, 7, 32)
    r = export_onnx(block, tmp_path / "tie.onnx", example_inputs=(x,))
    proto = onnx.load(str(r.path))
    assert "TopK" in r.op_counts
    # the selected experts: what the per-expert Equal(topk_idx, e) of the dispatch compares
    consts = {i.name for i in proto.graph.initializer} | {
        o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    compared = Counter(v for n in proto.graph.node if n.op_type == "Equal"
                       and sum(i in consts for i in n.input) == 1
                       for v in n.input if v not in consts)
    (selected,) = [v for v, count in compared.items() if count == 5]  # one Equal per expert
    proto.graph.output.append(onnx.helper.make_tensor_value_info(
        selected, onnx.TensorProto.INT64, None))
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    out, idx = session.run([proto.graph.output[0].name, selected], {"x": x.numpy()})
    assert idx.shape == (21, 2) and (np.sort(idx, -1) == [0, 1]).all(), idx[:3]
    with torch.no_grad():
        torch_idx = block._route(x.reshape(-1, 32))[0]
        lowest = block._dispatch_sorted(x.reshape(-1, 32), torch.tensor([[0, 1]] * 21),
                                        torch.full((21, 2), 1.0 if gate == "hard" else 0.5))[0]
    assert torch_idx.sort(-1).values.tolist() == [[0, 1]] * 21
    torch.testing.assert_close(torch.from_numpy(out).reshape(21, 32), lowest, rtol=1e-5,
                               atol=1e-6)
    assert compare_with_torch(block, r.path, (x,))["rel"] <= TOL



def test_dense_dispatch_equals_the_sparse_path_and_is_scoped():
    block = _moe_block(None, glu=True, bias=False)
    model = torch.nn.Sequential(block, torch.nn.Identity())
    assert moe_blocks(model) == [block]
    x = torch.randn(13, 40)
    with torch.no_grad():
        idx, weights, _ = block._route(x)
        sparse = block._dispatch_masked(x, idx, weights)
        dense = dense_dispatch(block, x, idx, weights)
        torch.testing.assert_close(dense, sparse, rtol=1e-5, atol=1e-6)
        with moe_dispatch(model, dense=True):
            assert "_dispatch_masked" in block.__dict__
            torch.testing.assert_close(block._dispatch_masked(x, idx, weights), dense)
        assert "_dispatch_masked" not in block.__dict__
        with moe_dispatch(model, dense=False):
            assert "_dispatch_masked" not in block.__dict__
