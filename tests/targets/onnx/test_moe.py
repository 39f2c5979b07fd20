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

from rewriter.errors import ExportInputError

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


# ----------------------------------------------------------------- fused com.microsoft.MoE


@pytest.mark.parametrize("gate, glu, activation, bias", [
    ("sigmoid", True, "silu", False), ("softmax", True, "silu", True),
    ("hard", False, "relu", True), ("softmax", False, "gelu_tanh", False),
    ("sigmoid", True, "quick_gelu", True), ("softmax", False, "silu", False)])
def test_fused_moe_is_one_node_per_block_with_our_routing(tmp_path, gate, glu, activation, bias):
    """fused_moe=True: the routed experts are one com.microsoft.MoE node fed our routing (the
    selection bias, renormalisation, route_scale, hard gates), so onnxruntime gives PyTorch's
    numbers, for a single token, experts without tokens and 99 tokens; the shared expert stays
    outside the node."""
    torch.manual_seed(3)
    block = MoEFFN(40, 24, 5, 2, shared_dim=8, activation=activation, glu=glu, bias=bias,
                   gate=gate, route_scale=2.5 if gate == "sigmoid" else 1.0).eval()
    with torch.no_grad():
        block.router.weight.normal_(0, 1.0)
        block.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, -0.4]))  # selection only
    r = export_onnx(block, tmp_path / "fused.onnx", example_inputs=(torch.randn(2, 7, 40),),
                    fused_moe=True)
    assert r.op_counts["MoE"] == 1 and "NonZero" not in r.op_counts and "ScatterND" not in \
        r.op_counts
    assert r.fused_moe_blocks == 1 and r.unfused == ()
    assert "fused" in r.metadata["rewriter.onnx.moe_dispatch"]
    assert "1 fused com.microsoft.MoE" in r.summary()
    node = next(n for n in onnx.load(str(r.path)).graph.node if n.op_type == "MoE")
    assert node.domain == "com.microsoft"
    fused = make_session(r.path)
    sparse = make_session(export_onnx(block, tmp_path / "sparse.onnx",
                                      example_inputs=(torch.randn(2, 7, 40),)).path)
    for x in (torch.randn(1, 1, 40), torch.randn(2, 7, 40), torch.randn(3, 33, 40)):
        # as close to PyTorch as the sparse form on the same input (a random block's output
        # can be ill-conditioned: both forms measured 1.8e-5 on one 99-token input here)
        err = compare_with_torch(block, fused, (x,))["rel"]
        assert err <= max(TOL, 1.5 * compare_with_torch(block, sparse, (x,))["rel"])
        assert err <= 5 * TOL


def test_fused_moe_keeps_unsupported_blocks_sparse_and_names_them(tmp_path):
    """An activation the fused CPU kernel lacks (exact-erf GELU) or FP8 experts: the block
    keeps the sparse form, the report names it with the reason, the numbers still match."""
    model = torch.nn.Sequential(_moe_block(None, glu=False, bias=True),  # ungated exact GELU
                                _moe_block("none", glu=True))  # FP8 W8A16 experts
    r = export_onnx(model, tmp_path / "kept.onnx", example_inputs=(torch.randn(2, 7, 40),),
                    fused_moe=True)
    assert r.fused_moe_blocks == 0 and "MoE" not in r.op_counts
    assert [u.split(":")[0] for u in r.unfused] == ["0", "1"]
    assert "ungated gelu" in r.unfused[0] and "FP8" in r.unfused[1]
    assert compare_with_torch(model, make_session(r.path), (torch.randn(3, 5, 40),))["rel"] \
        <= TOL


def test_fused_dispatch_weights_equal_our_routing():
    """What the node is fed: softmax of the router input over the selected experts times the
    per-token sum gives our routing weights back (to fp32 rounding), zeros elsewhere; a token
    whose selected weights all underflow stays finite."""
    torch.manual_seed(0)
    w = torch.rand(9, 3) * 2
    w[0] = 0.0  # every selected weight underflowed: log(0) must not reach the node
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(9)])
    clamped = w.clamp_min(torch.finfo(torch.float32).tiny)
    router = torch.full((9, 6), float("-inf")).scatter(1, idx, clamped.log())
    got = torch.softmax(router, -1) * clamped.sum(-1, keepdim=True)
    want = torch.zeros(9, 6).scatter(1, idx, w)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-37)


def test_dense_and_fused_moe_are_exclusive(tmp_path):
    with pytest.raises(ExportInputError, match="dense_moe and fused_moe"):
        export_onnx(_moe_block(None), tmp_path / "m.onnx",
                    example_inputs=(torch.randn(1, 3, 40),), dense_moe=True, fused_moe=True)
    with pytest.raises(ExportInputError, match="fused_moe must be a bool"):
        export_onnx(_moe_block(None), tmp_path / "m.onnx",
                    example_inputs=(torch.randn(1, 3, 40),), fused_moe="yes")
    assert not (tmp_path / "m.onnx").exists()
