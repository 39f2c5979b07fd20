"""FP8 embedding tables (``FP8Config(embeddings="fp8")``): the module against a float64
quantize-dequantize reference, the tied head on the same table, the lowering pass's decisions,
and the ONNX export (one FLOAT8E4M3FN table, no fp32 copy, onnxruntime parity at (1,1), (2,7),
(3,33)).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from rewriter.models import hf
from rewriter.passes.lower_fp8 import FP8Config
from rewriter.targets.fp8 import AMAX_FLOOR, FP8InferenceModeError
from rewriter.targets.fp8_embedding import FP8Embedding, FP8TiedHead, quantize_rows
from rewriter.targets.onnx import export_onnx
from rewriter.targets.onnx_runtime import check_fp8_linears, compare_with_torch, make_session
from torch import nn

import rewriter
from rewriter import MoEConfig, models
from rewriter.graph_ops import weight_bytes

SHAPES = ((1, 1), (2, 7), (3, 33))
TOL = 1e-5
FP8_EMB = FP8Config(activations="none", embeddings="fp8")


# ------------------------------------------------------------------------------ reference


def _e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """float64 -> nearest E4M3 value (ties to even, saturating at 448), in float64."""
    a = v.abs().clamp(max=448.0)
    _, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1)
    ulp = torch.exp2((e - 1).clamp(min=-6).double() - 3)  # 3 mantissa bits; subnormals 2^-9
    return torch.sign(v) * (torch.round(a / ulp) * ulp).clamp(max=448.0)


def _reference_rows(w: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s) in float64: s = max(amax|row|, AMAX_FLOOR) / 448 as an fp32 number."""
    amax = w.double().abs().amax(dim=1)
    floor = torch.tensor(AMAX_FLOOR, dtype=torch.float32).double()
    s = (torch.maximum(amax.float().double(), floor).float() / 448.0).float().double()
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return _e4m3_round(w.float().double() / s[:, None]), s


def _table(v: int = 301, d: int = 77, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=gen) * torch.logspace(-4, 2, v)[:, None]  # row magnitudes
    w[5] = 0.0  # zero row: the floor's scale
    w[7, 3] = 1e3  # outlier row
    w[9] = torch.randn(d, generator=gen) * 1e-42  # subnormal row: below the amax floor -> 0
    w[11] = torch.randn(d, generator=gen) * 1e-35  # tiny but above the floor
    return w


# ------------------------------------------------------------------------------ the module


@pytest.mark.parametrize("pow2", [False, True])
def test_lookup_matches_float64_quantize_dequantize(pow2):
    w = _table()
    emb = FP8Embedding(w, pow2=pow2)
    q64, s64 = _reference_rows(w, pow2)
    assert emb.weight_q.dtype == torch.float8_e4m3fn and emb.weight_q.shape == w.shape
    assert emb.weight_scale.dtype == torch.float32 and emb.weight_scale.shape == (301,)
    assert torch.equal(emb.weight_scale.double(), s64)
    assert torch.equal(emb.weight_q.double(), q64)  # every FP8 value, bit for bit
    ids = torch.randint(0, 301, (3, 33), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = torch.tensor([5, 7, 300])
    out = emb(ids)
    ref = (q64 * s64[:, None])[ids]  # (3, 33, 77) float64
    assert out.shape == (3, 33, 77) and out.dtype == torch.float32
    assert torch.equal(out[0, 0], torch.zeros(77))
    assert ((out.double() - ref).abs() <= ref.abs() * 2.0 ** -24).all()  # one fp32 rounding
    rel = (out.double() - w[ids].double()).norm() / w[ids].double().norm()
    assert 0 < rel < 0.05  # E4M3 with a scale per row: ~2-3% relative error


def test_module_dtypes_and_bad_input():
    w = _table(40, 19).bfloat16()
    emb = FP8Embedding.from_embedding(nn.Embedding.from_pretrained(w, padding_idx=0))
    ids = torch.tensor([[0, 1, 39]], dtype=torch.int32)
    out = emb(ids)
    assert out.dtype == torch.bfloat16 and emb.padding_idx == 0
    q, s = quantize_rows(w)
    assert torch.equal(out.float(), (q.float() * s[:, None])[ids.long()].bfloat16().float())
    with pytest.raises(TypeError, match="integer ids"):
        emb(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="max_norm"):
        FP8Embedding.from_embedding(nn.Embedding(4, 3, max_norm=1.0))
    with pytest.raises(ValueError, match="2-D float table"):
        quantize_rows(torch.zeros(3, dtype=torch.int64))


def test_tied_head_reads_the_same_table():
    w = _table(67, 130)
    emb = FP8Embedding(w)
    bias = torch.randn(67)
    head = FP8TiedHead(emb, bias)
    assert head.weight_q is emb.weight_q and head.weight_scale is emb.weight_scale
    x = torch.randn(2, 5, 130, generator=torch.Generator().manual_seed(2))
    q64, s64 = _reference_rows(w, False)
    ref = x.double() @ (q64 * s64[:, None]).T + bias.double()
    got = head(x)
    assert got.shape == (2, 5, 67)
    assert (got.double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert weight_bytes(nn.ModuleList([emb, head])) == 67 * 130 + 67 * 4 + 67 * 4  # one table


# ------------------------------------------------------------------------------ the pass


def _llama_tied(layers: int = 1):
    model = models.build_model("llama-tiny-tied", seed=1, n_layer=layers)
    return model, lambda b, t, seed=0: models.example_inputs(model, b, t, seed=seed)


def test_config_validation_names_the_field():
    assert FP8Config().embeddings == "keep"
    with pytest.raises(ValueError, match="FP8Config.embeddings must be one of keep, fp8"):
        FP8Config(embeddings="int8")
    with pytest.raises(ValueError, match="FP8Config.embeddings='fp8'.*mode='inference'"):
        FP8Config(mode="training", embeddings="fp8")


def test_decisions_report_the_embedding_and_the_tied_head():
    model, inputs = _llama_tied()
    keep = rewriter.convert(model, fp8=FP8Config(activations="none"), example_inputs=inputs(2, 7))
    fp8 = rewriter.convert(model, fp8=FP8_EMB, example_inputs=inputs(2, 7))
    kept = {d.fqn: d for d in rewriter.conversion_info(keep).fp8_decisions}
    assert kept["tok_embeddings"].kind == "embedding" and not kept["tok_embeddings"].lowered
    assert "kept in high precision" in kept["tok_embeddings"].reason
    assert "head" in kept["output"].reason and not kept["output"].lowered
    assert isinstance(keep.tok_embeddings, nn.Embedding) and keep.output.weight is \
        keep.tok_embeddings.weight

    got = {d.fqn: d for d in rewriter.conversion_info(fp8).fp8_decisions}
    assert got["tok_embeddings"].lowered and "FP8Embedding" in got["tok_embeddings"].reason
    assert got["tok_embeddings"].params == 256 * 64
    assert got["output"].kind == "tied_head" and got["output"].lowered
    assert "tied to tok_embeddings" in got["output"].reason
    assert isinstance(fp8.tok_embeddings, FP8Embedding) and isinstance(fp8.output, FP8TiedHead)
    assert fp8.output.weight_q is fp8.tok_embeddings.weight_q  # still tied: one table
    assert isinstance(model.tok_embeddings, nn.Embedding)  # the user's model is untouched
    # weight_bytes counts the FP8 table once: 1 B a weight + 4 B a row instead of 4 B a weight
    assert weight_bytes(keep) - weight_bytes(fp8) == 256 * 64 * 4 - (256 * 64 + 256 * 4)
    table = rewriter.inspect(fp8).fp8_table()
    assert "tok_embeddings" in table and "FP8Embedding" in table and "tied_head" in table

    x = inputs(3, 33, seed=4)
    with torch.no_grad():
        a, b = keep(*x), fp8(*x)
    assert ((a - b).norm() / a.norm()) < 0.05  # only the table's rounding differs


def test_untied_head_filters_and_graph_mode():
    model = models.build_model("gpt-tiny", seed=1)
    x = models.example_inputs(model, 2, 7)
    conv = rewriter.convert(model, fp8=FP8_EMB, example_inputs=x)
    got = {d.fqn: d for d in rewriter.conversion_info(conv).fp8_decisions}
    assert got["tok_emb"].lowered and got["pos_emb"].lowered
    assert not got["lm_head"].lowered and "output head" in got["lm_head"].reason
    assert type(conv.lm_head) is nn.Linear  # untied head: DeepSeek-V3's high precision

    only_tok = rewriter.convert(model, fp8=FP8_EMB, example_inputs=x,
                                filter_fn=lambda mod, fqn: fqn != "pos_emb")
    reasons = {d.fqn: d.reason for d in rewriter.conversion_info(only_tok).fp8_decisions}
    assert reasons["pos_emb"] == "excluded by filter_fn"
    assert isinstance(only_tok.pos_emb, nn.Embedding)

    graph = rewriter.convert(model, fp8=FP8_EMB, example_inputs=x, mode="graph")
    assert any("rewriter.fp8_embedding" in str(n.target) for n in graph.graph.nodes)
    assert torch.equal(graph(*x), conv(*x))


# ------------------------------------------------------------------------------ ONNX


def _fp8_tables(proto) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in proto.graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT8E4M3FN}


def _check_file(proto, conv) -> None:
    """Every FP8Embedding's table is one FLOAT8E4M3FN initializer, bit for bit, read by one
    Cast; no fp32 initializer holds the table (dequantized or not, either layout)."""
    inits = _fp8_tables(proto)
    tables = {id(m.weight_q): m for m in conv.modules() if isinstance(m, FP8Embedding)}
    assert tables
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    for emb in tables.values():
        raw = emb.weight_q.view(torch.uint8).numpy()
        same = [n for n, i in inits.items() if tuple(i.dims) == raw.shape
                and np.array_equal(numpy_helper.to_array(i).view(np.uint8), raw)]
        assert len(same) == 1, same  # one FP8 table, whether a head is tied to it or not
        assert consumers[same[0]] == ["Cast"], consumers[same[0]]
        deq = emb.dequantized().numpy()
        for init in proto.graph.initializer:
            if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) != 2:
                continue
            arr = numpy_helper.to_array(init)
            for cand in (deq, deq.T):
                assert arr.shape != cand.shape or not np.allclose(arr, cand, rtol=0.1,
                                                                  atol=1e-3), init.name


def _parity(conv, inputs, path) -> None:
    session = make_session(path, ["CPUExecutionProvider"])
    for b, t in SHAPES:
        diff = compare_with_torch(conv, session, inputs(b, t, seed=3))
        assert diff["rel"] <= TOL, (b, t, diff)


def test_onnx_tied_moe_model_one_fp8_table_and_parity(tmp_path):
    model, inputs = _llama_tied()
    conv = rewriter.convert(model, moe=MoEConfig(num_experts=4, top_k=2), fp8=FP8_EMB,
                            example_inputs=inputs(2, 7))
    report = export_onnx(conv, tmp_path / "tied.onnx", example_inputs=inputs(2, 7))
    proto = onnx.load(str(report.path))
    _check_file(proto, conv)
    assert report.metadata["rewriter.onnx.fp8_embeddings"].startswith("tables FLOAT8E4M3FN")
    cast = next(n for n in proto.graph.node if n.op_type == "Cast"
                and n.input[0] in _fp8_tables(proto))
    readers = sorted(n.op_type for n in proto.graph.node if cast.output[0] in n.input)
    assert readers == ["Gather", "Gemm"]  # the lookup and the tied head, on one table
    assert report.fp8_initializers == len(_fp8_tables(proto))
    _parity(conv, inputs, report.path)

    # W8A8 linears beside it: the FP8 linears are exact given their inputs, the table is shared
    w8a8 = rewriter.convert(model, fp8=FP8Config(embeddings="fp8"), example_inputs=inputs(2, 7))
    report = export_onnx(w8a8, tmp_path / "w8a8.onnx", example_inputs=inputs(2, 7))
    _check_file(onnx.load(str(report.path)), w8a8)
    forced = check_fp8_linears(report.path, inputs(3, 33, seed=3), model=w8a8)
    assert forced["w8a8"] == forced["linears"] == 7 and forced["weight_mismatches"] == 0
    assert forced["q_mismatches"] == forced["scale_mismatches"] == 0 and \
        forced["max_rel"] <= 1e-6, forced


def test_onnx_untied_tables_and_an_fp32_head(tmp_path):
    model = models.build_model("gpt-tiny", seed=1, n_layer=1)
    inputs = lambda b, t, seed=0: models.example_inputs(model, b, t, seed=seed)  # noqa: E731
    conv = rewriter.convert(model, fp8=FP8_EMB, example_inputs=inputs(2, 7))
    report = export_onnx(conv, tmp_path / "gpt.onnx", example_inputs=inputs(2, 7))
    proto = onnx.load(str(report.path))
    _check_file(proto, conv)  # tok_emb and pos_emb, each once
    assert len(_fp8_tables(proto)) == 2 + 4  # two tables, four linears (the head stays fp32)
    _parity(conv, inputs, report.path)


def test_onnx_embedding_only_fp8(tmp_path):
    """No FP8 linear at all: the table alone makes the graph FP8 (opset 21, guarded)."""
    torch.manual_seed(0)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(97, 24)
            self.proj = nn.Linear(24, 11)

        def forward(self, idx):
            return self.proj(self.emb(idx))

    model = Tiny()
    inputs = lambda b, t, seed=0: (torch.randint(0, 97, (b, t), generator=torch.Generator()  # noqa: E731
                                                 .manual_seed(seed)),)
    conv = rewriter.convert(model, fp8=FP8_EMB, example_inputs=inputs(2, 7),
                            filter_fn=lambda mod, fqn: fqn == "emb")
    assert type(conv.proj) is nn.Linear and isinstance(conv.emb, FP8Embedding)
    report = export_onnx(conv, tmp_path / "emb.onnx", example_inputs=inputs(2, 7))
    assert report.opset == 21 and report.fp8_initializers == 1
    _check_file(onnx.load(str(report.path)), conv)
    _parity(conv, inputs, report.path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_onnx_hf_families(tmp_path, family):
    """GPT-2 (tied wte + wpe), LLaMA (untied here), BERT (word, position, token-type)."""
    model = hf.build_hf(family, seed=1)
    inputs = lambda b, t, seed=0: hf.hf_example_inputs(model, b, t, seed=seed)  # noqa: E731
    conv = rewriter.convert(model, moe=MoEConfig(num_experts=4, top_k=2), fp8=FP8_EMB,
                            example_inputs=inputs(2, 7))
    report = export_onnx(conv, tmp_path / f"{family}.onnx", example_inputs=inputs(2, 7))
    _check_file(onnx.load(str(report.path)), conv)
    if family == "gpt2":
        assert conv.lm_head.weight_q is conv.transformer.wte.weight_q
    _parity(conv, inputs, report.path)


def test_weights_are_read_only_and_there_is_no_backward():
    w = _table(67, 130, seed=3)
    emb = FP8Embedding(w)
    head = FP8TiedHead(emb, torch.randn(67, generator=torch.Generator().manual_seed(1)))
    table = emb.weight
    assert torch.equal(table, emb.dequantized()) and torch.equal(head.weight, table)
    ids = torch.tensor([[5, 7, 66], [0, 11, 9]])
    before = emb(ids)
    for module, name in ((emb, "FP8Embedding"), (head, "FP8TiedHead")):
        with pytest.raises(FP8InferenceModeError, match=rf"{name}\.weight .*inference mode"):
            with torch.no_grad():
                module.weight.data.mul_(2)
        with pytest.raises(FP8InferenceModeError):
            module.weight[3] = 0.0
    assert torch.equal(emb(ids), before)
    x = torch.randn(2, 3, 130, generator=torch.Generator().manual_seed(2), requires_grad=True)
    with pytest.raises(FP8InferenceModeError,
                       match=r"rewriter::fp8_embedding_linear: .*FP8Config\(mode='training'\)"):
        head(x).sum().backward()
