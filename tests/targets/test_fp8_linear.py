import copy

import pytest
import torch
from rewriter.models.moe import MoEFFN
from rewriter.targets.fp8 import fake_quantize_rowwise, sqnr_db
from rewriter.targets.fp8_linear import FP8Linear, FP8MoEFFN


def test_inference_and_training_modes_compute_the_same_forward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 96)
    x = torch.randn(4, 7, 200)
    inf = FP8Linear.from_linear(lin, mode="inference")
    tr = FP8Linear.from_linear(lin, mode="training")
    torch.testing.assert_close(inf(x), tr(x), rtol=1e-6, atol=1e-6)
    assert tr.weight is lin.weight  # training shares the master weight
    assert sqnr_db(lin(x), inf(x)) > 27
    only_w = FP8Linear.from_linear(lin, mode="inference", activations="none")
    assert sqnr_db(lin(x), only_w(x)) > sqnr_db(lin(x), inf(x))  # W8A16 is closer to fp32
    bytes_fp8 = inf.weight_q.numel() + 4 * inf.weight_scale.numel()
    assert bytes_fp8 <= 0.52 * 2 * lin.weight.numel()  # vs bf16 weights
    with pytest.raises(ValueError, match="activations must be 'fp8'"):
        FP8Linear.from_linear(lin, mode="training", activations="none")


def test_conv1d_layout_is_transposed():
    class Conv1D(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(200, 96) * 0.05)
            self.bias = torch.nn.Parameter(torch.randn(96))

        def forward(self, x):
            return x @ self.weight + self.bias

    conv = Conv1D()
    x = torch.randn(3, 200)
    fp8 = FP8Linear.from_linear(conv, transposed=True, mode="inference")
    assert sqnr_db(conv(x), fp8(x)) > 27


def _moe(glu=True, bias=False, shared=8):
    torch.manual_seed(1)
    block = MoEFFN(40, 24, 5, 2, shared_dim=shared, activation="silu", glu=glu, bias=bias,
                   gate="softmax")
    with torch.no_grad():
        block.router.weight.normal_(0, 1.0)
    return block.eval()


@pytest.mark.parametrize("glu, bias", [(True, False), (False, True)])
def test_fp8_moe_grouped_path_equals_per_expert_path(glu, bias):
    block = _moe(glu, bias)
    x = torch.randn(3, 11, 40)
    inf = FP8MoEFFN(copy.deepcopy(block), mode="inference")
    tr = FP8MoEFFN(copy.deepcopy(block), mode="training")
    grouped = inf(x)
    per_expert = inf._dispatch_masked(
        x.reshape(-1, 40), *inf._route(x.reshape(-1, 40))[:2]).reshape(x.shape)
    if inf.shared is not None:
        per_expert = per_expert + inf.shared(x)
    if inf.b_out is not None:
        per_expert = per_expert + inf.b_out
    torch.testing.assert_close(grouped, per_expert, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped, tr(x), rtol=1e-5, atol=1e-6)
    assert sqnr_db(block(x), grouped) > 25
    assert inf.w_up_q.dtype == torch.float8_e4m3fn and inf.w_up_scale.shape == (5, 1, 1)


def test_fp8_moe_training_reaches_used_experts_and_router():
    block = _moe()
    fp8 = FP8MoEFFN(block, mode="training")
    x = torch.randn(2, 9, 40)
    fp8(x).pow(2).mean().backward()
    used = fp8.last_load > 0
    g = fp8.w_up.grad.flatten(1).norm(dim=1)
    assert bool((g[used] > 0).all()) and bool((g[~used] == 0).all())
    assert fp8.router.weight.grad.abs().sum() > 0
    assert fp8.router.weight.dtype == torch.float32


# ----------------------------------------------------------------------------- dequant cache


def _lin_data(seed=0, m=7, k=200, n=96):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05,
            torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("activations", ["fp8", "none"])
@pytest.mark.parametrize("k, bias, pow2", [(200, True, False), (200, False, True),
                                           (576, True, False), (256, False, False)])
def test_cached_dequantized_weight_gives_the_uncached_bits(activations, k, bias, pow2):
    x, w, b = _lin_data(k=k)
    b = b if bias else None
    kw = dict(mode="inference", activations=activations, pow2=pow2)
    cached = FP8Linear(w, b, **kw)
    uncached = FP8Linear(w, b, cache_dequantized=False, **kw)
    op = (torch.ops.rewriter.fp8_linear(x, cached.weight_q, cached.weight_scale, b, pow2)
          if activations == "fp8" else
          torch.ops.rewriter.fp8_weight_only_linear(x, cached.weight_q, cached.weight_scale, b))
    for xt in (x, x.reshape(7, 1, k), x.bfloat16()):
        with torch.no_grad():
            y = cached(xt)
        assert torch.equal(y, uncached(xt))  # grad mode on, x needs no grad: cached too
        assert torch.equal(cached(xt), y)
    assert torch.equal(cached(x), op)
    assert len(cached._dequant_cache) == 1 and len(uncached._dequant_cache) == 0
    assert cached.dequantized_weight() is cached.dequantized_weight()  # built once


def test_dequant_cache_is_not_state_and_follows_weight_changes():
    import io

    from rewriter.graph_ops import weight_bytes

    x, w, b = _lin_data(seed=1)
    _, w2, b2 = _lin_data(seed=2)
    m = FP8Linear(w, b, mode="inference")
    other = FP8Linear(w2, b2, mode="inference", cache_dequantized=False)
    keys, nbytes = set(m.state_dict()), weight_bytes(m)
    y = m(x)
    assert set(m.state_dict()) == keys and weight_bytes(m) == nbytes  # stored bytes only
    assert all(t.dtype != torch.float32 or t.numel() < w.numel()
               for t in m.state_dict().values())
    m.load_state_dict(other.state_dict())  # copy_ into the buffers: versions move
    assert torch.equal(m(x), other(x)) and not torch.equal(m(x), y)
    with torch.no_grad():
        m.weight_scale.mul_(2.0)  # in place
        other.weight_scale.mul_(2.0)
    assert torch.equal(m(x), other(x))
    m.weight_q = FP8Linear(w, None, mode="inference").weight_q  # reassigned
    ref = FP8Linear(w, b2, mode="inference", cache_dequantized=False)
    ref.weight_scale = m.weight_scale
    assert torch.equal(m(x), ref(x))
    assert len(copy.deepcopy(m)._dequant_cache) == 0  # copies and pickles start empty
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert len(loaded._dequant_cache) == 0 and torch.equal(loaded(x), m(x))
    m.to("cpu")  # Module._apply drops the copy
    assert len(m._dequant_cache) == 0


def test_dequant_cache_stays_off_where_the_ops_must_run():
    x, w, b = _lin_data(seed=3)
    lin = torch.nn.Linear(200, 96)
    tr = FP8Linear.from_linear(lin, mode="training")
    tr(x)
    assert tr.dequantized_weight() is None and len(tr._dequant_cache) == 0
    off = FP8Linear(w, b, mode="inference", cache_dequantized=False)
    assert off.dequantized_weight() is None
    m = FP8Linear(w, b, mode="inference")
    xg = x.clone().requires_grad_()
    m(xg)  # autograd would record: the op runs (and still has no backward)
    assert len(m._dequant_cache) == 0
    ep = torch.export.export(m, (x,))
    assert "rewriter.fp8_linear.default" in {str(n.target) for n in ep.graph.nodes}
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    assert len(m._dequant_cache) == 0  # neither export nor compile touched it
    assert torch.equal(y, m(x)) and len(m._dequant_cache) == 1
    with pytest.raises(ValueError, match="cache_dequantized"):
        FP8Linear(w, b, mode="inference", cache_dequantized="yes")


def _moe_odd(glu=True, bias=False):
    torch.manual_seed(2)
    block = MoEFFN(200, 96, 5, 2, shared_dim=0, activation="silu", glu=glu, bias=bias,
                   gate="softmax")
    with torch.no_grad():
        block.router.weight.normal_(0, 1.0)
    return block.eval()


@pytest.mark.parametrize("activations", ["fp8", "none"])
@pytest.mark.parametrize("glu, bias", [(True, False), (False, True)])
def test_fp8_moe_cached_experts_give_the_uncached_bits(activations, glu, bias):
    block = _moe_odd(glu, bias)
    kw = dict(mode="inference", activations=activations)
    cached = FP8MoEFFN(copy.deepcopy(block), **kw)
    uncached = FP8MoEFFN(copy.deepcopy(block), cache_dequantized=False, **kw)
    for x in (torch.randn(7, 200), torch.randn(3, 11, 200)):
        with torch.no_grad():
            assert torch.equal(cached(x), uncached(x))
    assert len(cached._dequant_cache) == (3 if glu else 2)
    assert len(uncached._dequant_cache) == 0
    with torch.no_grad():  # in place change of one expert's scales: rebuilt
        cached.w_down_scale[1].mul_(0.5)
        uncached.w_down_scale[1].mul_(0.5)
        x = torch.randn(13, 200)
        assert torch.equal(cached(x), uncached(x))
    assert set(cached.state_dict()) == set(uncached.state_dict())
    with pytest.raises(ValueError, match="cache_dequantized"):
        FP8MoEFFN(copy.deepcopy(block), mode="inference", cache_dequantized=None)


def test_shared_activation_memo_quantizes_a_shared_input_once_with_the_same_bits():
    from rewriter.targets.fp8_linear import ActivationMemo

    x, w, b = _lin_data(seed=4, k=576)
    _, w2, _ = _lin_data(seed=5, k=576)
    memo = ActivationMemo()
    q = FP8Linear(w, b, mode="inference", activation_memo=memo)
    k = FP8Linear(w2, None, mode="inference", activation_memo=memo, pow2=True)
    v = FP8Linear(w2, None, mode="inference", activation_memo=memo)
    plain = [FP8Linear(w, b, mode="inference", cache_dequantized=False),
             FP8Linear(w2, None, mode="inference", cache_dequantized=False, pow2=True),
             FP8Linear(w2, None, mode="inference", cache_dequantized=False)]
    x3 = x.reshape(7, 1, 576)
    for _ in range(2):
        with torch.no_grad():
            assert all(torch.equal(m(x3), p(x3)) for m, p in zip((q, k, v), plain))
        first = memo.fake_quantized(x3, False)
        assert memo.fake_quantized(x3, False) is first  # computed once per input
        x3.mul_(-0.5)  # in place: a new version, quantized again
        assert memo.fake_quantized(x3, False) is not first
    assert torch.equal(memo.fake_quantized(x3, True),
                       fake_quantize_rowwise(x.reshape(7, 576), pow2=True))
    assert copy.deepcopy(memo)._entry is None  # copies start empty
    with pytest.raises(ValueError, match="activation_memo"):
        FP8Linear(w, b, mode="inference", activation_memo=object())


def test_fp8_moe_with_memo_gives_the_uncached_bits():
    from rewriter.targets.fp8_linear import ActivationMemo

    block = _moe_odd(True, True)
    memo = FP8MoEFFN(copy.deepcopy(block), mode="inference", activation_memo=ActivationMemo())
    plain = FP8MoEFFN(copy.deepcopy(block), mode="inference", cache_dequantized=False)
    x = torch.randn(4, 9, 200)
    with torch.no_grad():
        assert torch.equal(memo(x), plain(x))
