import math

import pytest
import torch
from rewriter.targets.fp8 import (
    AMAX_FLOOR,
    E4M3_MAX,
    FP8_DTYPE,
    compute_scale,
    dequantize_blockwise,
    dequantize_rowwise,
    fake_quantize_rowwise,
    fp8_gemm_reference,
    quantize_blockwise,
    quantize_rowwise,
    quantize_tensorwise,
    sqnr_db,
)

# every finite E4M3 value, from its bit patterns: an independent definition of the grid
_GRID = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).double()
_GRID = torch.unique(_GRID[torch.isfinite(_GRID)])  # sorted


def _round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even onto the E4M3 grid, saturating at ±448, in float64."""
    v = v.double().clamp(-E4M3_MAX, E4M3_MAX)
    idx = torch.searchsorted(_GRID, v).clamp(1, _GRID.numel() - 1)
    lo, hi = _GRID[idx - 1], _GRID[idx]
    d_lo, d_hi = v - lo, hi - v
    lo_bits = lo.float().to(FP8_DTYPE).view(torch.uint8).long()
    pick_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (lo_bits % 2 == 0))
    return torch.where(pick_lo, lo, hi)


def _inputs(kind: str, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(*shape, generator=g) * 3
    if kind == "log_uniform":
        mag = torch.exp(torch.empty(*shape).uniform_(math.log(1e-6), math.log(1e4), generator=g))
        return mag * torch.where(torch.rand(*shape, generator=g) < 0.5, -1.0, 1.0)
    if kind == "outliers":
        x = torch.randn(*shape, generator=g)
        x[:, torch.randperm(shape[1], generator=g)[:3]] *= 1000
        return x
    if kind == "subnormal":  # most scaled values land below 2^-6 (E4M3's subnormals)
        x = torch.randn(*shape, generator=g) * 1e-3
        x[:, ::128] = 2.0  # a large value per tile sets the scale
        return x


@pytest.mark.parametrize("kind", ["normal", "log_uniform", "outliers", "subnormal"])
@pytest.mark.parametrize("shape", [(1, 200), (7, 1000), (130, 129)])
def test_rowwise_quantization_is_rne_saturating_e4m3(kind, shape):
    x = _inputs(kind, shape)
    q, s = quantize_rowwise(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape
    assert s.shape == (shape[0], math.ceil(shape[1] / 128))
    tiles = torch.nn.functional.pad(x.abs(), (0, (-shape[1]) % 128)).view(shape[0], -1, 128)
    torch.testing.assert_close(s, tiles.amax(-1) / E4M3_MAX, rtol=0, atol=0)
    scaled = x.double() / s.double().repeat_interleave(128, 1)[:, : shape[1]]
    expected = _round_e4m3(scaled.float().double())
    assert torch.equal(q.double(), expected)  # bit-identical to the independent grid rounding
    assert q.float().abs().max() <= E4M3_MAX


def test_blockwise_scales_cover_128x128_blocks_with_partial_edges():
    w = _inputs("normal", (300, 200), seed=3)
    q, s = quantize_blockwise(w)
    assert s.shape == (3, 2)
    assert s[2, 1] == w[256:, 128:].abs().max() / E4M3_MAX
    back = dequantize_blockwise(q, s)
    assert sqnr_db(w, back) > 28


def test_zero_tiles_nan_and_pow2():
    x = torch.zeros(3, 130)
    x[1, 129] = 5.0
    q, s = quantize_rowwise(x)
    floor = (torch.tensor(AMAX_FLOOR, dtype=torch.float32) / E4M3_MAX).item()
    assert s[0].tolist() == [floor, floor] and q.float().abs().sum() == 5.0 * 448 / 5.0
    y = _inputs("normal", (4, 256))
    y[2, 7] = float("nan")
    q, s = quantize_rowwise(y)
    back = dequantize_rowwise(q, s)
    assert torch.isnan(back[2, :128]).all()  # the NaN's tile is NaN, not silently wrong
    assert torch.isfinite(back[2, 128:]).all() and torch.isfinite(back[[0, 1, 3]]).all()
    q2, s2 = quantize_rowwise(_inputs("normal", (4, 256)), pow2=True)
    assert torch.equal(torch.exp2(torch.log2(s2).round()), s2)
    assert (s2 >= _inputs("normal", (4, 256)).abs().view(4, 2, 128).amax(-1) / 448).all()


def test_gemm_reference_matches_fp32_within_fp8_noise():
    a = _inputs("normal", (37, 300), seed=1)
    b = _inputs("normal", (96, 300), seed=2) * 0.05
    bias = torch.randn(96)
    out = fp8_gemm_reference(*quantize_rowwise(a), *quantize_blockwise(b), bias=bias)
    assert sqnr_db(a @ b.T + bias, out) > 27  # E4M3 x E4M3: ~29 dB on Gaussians
    rowwise = fp8_gemm_reference(*quantize_rowwise(a), *quantize_rowwise(b), b_layout="row")
    assert sqnr_db(a @ b.T, rowwise) > 27
    with pytest.raises(ValueError, match="b_layout"):
        fp8_gemm_reference(*quantize_rowwise(a), *quantize_rowwise(b), b_layout="col")


def _row_sqnr(ref, approx):
    r = ref.double()
    return float((10 * torch.log10(r.pow(2).sum(1) / (r - approx.double()).pow(2).sum(1))).mean())


def test_fine_grained_scaling_beats_per_tensor_on_outlier_channels():
    """Outlier channels (x1000, their weights compensate) plus quiet tokens (x0.01, e.g. after
    an attention sink): one tensor scale pushes quiet tokens into E4M3's subnormals; 1x128 /
    128x128 scales do not. Per-token output SQNR, averaged over tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=g)
    cols = [3, 200, 511, 900]
    x[:, cols] *= 1000
    x[::3] *= 0.01
    w = torch.randn(384, 1024, generator=g) * 0.02
    w[:, cols] /= 1000
    ref = x @ w.T
    fine = fp8_gemm_reference(*quantize_rowwise(x), *quantize_blockwise(w))
    (tq, ts), (uq, us) = quantize_tensorwise(x), quantize_tensorwise(w)
    tensorwise = (tq.float() * ts) @ (uq.float() * us).T
    fine_db, tensor_db = _row_sqnr(ref, fine), _row_sqnr(ref, tensorwise)
    print(f"per-token SQNR: fine-grained {fine_db:.1f} dB, per-tensor {tensor_db:.1f} dB")
    assert fine_db > 27
    assert fine_db - tensor_db > 5.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 dims"):
        quantize_rowwise(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        quantize_blockwise(torch.ones(4, 4, dtype=torch.int32))
    q, s = quantize_rowwise(torch.randn(8, 300).t())  # non-contiguous input is fine
    assert q.shape == (300, 8) and q.is_contiguous()


@pytest.mark.parametrize("kind", ["normal", "log_uniform", "outliers", "subnormal"])
@pytest.mark.parametrize("shape", [(1, 200), (7, 1000), (130, 129), (5, 256)])
@pytest.mark.parametrize("pow2", [False, True])
def test_fake_quantize_is_dequantize_of_quantize_bit_for_bit(kind, shape, pow2):
    x = _inputs(kind, shape)
    x[0, 0] = float("nan")  # a NaN tile, an inf tile, a zero row and a -0
    x[-1, -1] = float("inf")
    x[min(1, shape[0] - 1), :] = 0.0
    x[0, -1] = -0.0
    for xt in (x, x.bfloat16(), x.double()):
        ref = dequantize_rowwise(*quantize_rowwise(xt, pow2=pow2))
        out = fake_quantize_rowwise(xt, pow2=pow2)
        assert out.shape == ref.shape and out.stride() == ref.stride()  # same layout for matmuls
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32))  # NaN bits included
    empty = fake_quantize_rowwise(torch.zeros(0, shape[1]))
    assert empty.shape == (0, shape[1])


def test_zero_rows_quantize_and_multiply_to_empty_results():
    """An expert that receives no tokens gives (0, K) activations: every step handles them."""
    from rewriter.targets.fp8 import (
        dequantize_rowwise,
        fake_quantize_rowwise,
        fp8_gemm_reference,
        quantize_blockwise,
        quantize_rowwise,
    )

    for k in (200, 256):
        x = torch.empty(0, k)
        q, s = quantize_rowwise(x)
        assert q.shape == (0, k) and s.shape == (0, -(-k // 128))
        assert dequantize_rowwise(q, s).shape == (0, k)
        assert fake_quantize_rowwise(x).shape == (0, k)
        wq, ws = quantize_blockwise(torch.randn(96, k, generator=torch.Generator().manual_seed(k)))
        assert fp8_gemm_reference(q, s, wq, ws).shape == (0, 96)


# ------------------------------------------------------------------ issue 12: the amax floor

_TINY = [1e-8, 1e-20, 1e-30, 1e-37, 5e-38, 1e-39, 1e-41, 3e-43, 1e-44, 1.4e-45]


def test_amax_floor_is_a_normal_fp32_scale():
    """The floor: a normal fp32 scale whose reciprocal and dequantized multiples are normal."""
    s = torch.tensor(AMAX_FLOOR, dtype=torch.float32) / E4M3_MAX
    tiny_normal = torch.finfo(torch.float32).tiny
    assert s.item() >= tiny_normal and math.isfinite(1 / s.item())
    assert (s * 2.0**-9).item() >= tiny_normal  # smallest non-zero dequantized value
    assert compute_scale(torch.tensor([0.0, 1e-40, float("nan"), 448.0])).tolist()[::3] == \
        [s.item(), 1.0]
    assert math.isnan(compute_scale(torch.tensor([float("nan")])).item())


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("amax", _TINY)
def test_tiny_tiles_never_give_nan_and_keep_relative_error(amax, pow2):
    """DeepGEMM#109 / pytorch/ao#1766: a tile of finite tiny values dequantizes close to x
    (amax >= AMAX_FLOOR: the usual E4M3 relative error, <= 2^-4) or to exactly 0, never NaN."""
    g = torch.Generator().manual_seed(int(-math.log10(amax) * 10))
    x = torch.randn(3, 131, generator=g) * 7.0
    x[1] = torch.randn(131, generator=g) * amax / 4
    x[1, 5] = -amax  # row 1: first tile's amax is exactly `amax`
    q, s = quantize_rowwise(x, pow2=pow2)
    d = dequantize_rowwise(q, s)
    fq = fake_quantize_rowwise(x, pow2=pow2)
    assert torch.isfinite(d).all() and torch.equal(d, fq)
    assert (s >= torch.finfo(torch.float32).tiny).all()  # every scale normal
    big = x.double().abs() >= amax / 8  # elements with a normal E4M3 code
    err = (d.double() - x.double()).abs()
    if amax >= AMAX_FLOOR:
        assert (err[1][big[1]] <= 2.0**-4 * x.double().abs()[1][big[1]]).all()
        assert (d[1, 5].double() / -amax - 1).abs() <= 2.0**-4
    else:
        assert torch.equal(d[1, :128], torch.zeros(128))  # below the floor: 0, not NaN
    # the other rows are untouched by the tiny one
    ref_rows = dequantize_rowwise(*quantize_rowwise(x[[0, 2]], pow2=pow2))
    assert torch.equal(d[[0, 2]], ref_rows)
    w = torch.zeros(130, 129)
    w[0, 0], w[129, 128] = amax, -amax / 3
    qw, sw = quantize_blockwise(w, pow2=pow2)
    assert torch.isfinite(dequantize_blockwise(qw, sw)).all()
    assert (sw >= torch.finfo(torch.float32).tiny).all()
