"""Triton FP8 kernels vs the torch reference (targets/fp8.py).

Quantization must be bit-identical; GEMMs equal the dequantise-then-fp32-matmul reference to
1e-5 relative (max abs error / max abs reference). Without CUDA the kernels run on Triton's
interpreter, which has to be switched on before triton is first imported (this module does so
at collection; a conftest doing it earlier would make that independent of collection order).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from rewriter.targets import fp8 as ref  # noqa: E402
from rewriter.targets import triton_fp8 as tf  # noqa: E402

if not tf.triton_available():  # e.g. triton was imported before TRITON_INTERPRET was set
    pytest.skip(f"triton cannot run here (kernel mode {tf._kernel_mode()!r}, no CUDA); set "
                "TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

# the interpreter's numpy warns on Inf / Inf (a tile holding Inf has scale Inf: NaN, as torch)
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DEV = "cpu" if tf._interpreting() else "cuda"
# the interpreter's fp8 dot is exact; a GPU's tensor cores add within a 128-deep block with
# less than fp32 precision (hence DeepSeek-V3's promotion), so they get a looser bound
GEMM_TOL = 1e-5 if DEV == "cpu" else 2e-3
BF16_TOL = 8e-3  # one bf16 rounding of the output


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8).cpu()


def assert_same_fp8(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-identical E4M3 tensors; NaN must stay NaN (its sign bit is not compared)."""
    assert got.dtype == ref.FP8_DTYPE and got.shape == want.shape
    g_nan, w_nan = got.float().isnan().cpu(), want.float().isnan().cpu()
    assert torch.equal(g_nan, w_nan), "NaN positions differ"
    g, w = _bits(got)[~w_nan], _bits(want)[~w_nan]
    bad = (g != w).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} codes differ, first: got {g[bad[:5, 0]].tolist()} " \
                             f"want {w[bad[:5, 0]].tolist()}"


def assert_same_scales(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    got, want = got.cpu(), want.cpu()
    assert torch.equal(got.isnan(), want.isnan()), "NaN scales differ"
    ok = ~want.isnan()
    assert torch.equal(got[ok], want[ok]), (got[ok] - want[ok]).abs().max()


# --------------------------------------------------------------------------- rounding helper


def _neighbourhoods() -> torch.Tensor:
    """Every E4M3 value, every midpoint between neighbours (ties), each +-1 fp32 ulp, both signs,
    plus the saturation region, Inf, NaN and fp32 subnormals."""
    codes = torch.arange(256, dtype=torch.uint8).view(ref.FP8_DTYPE).float()  # 254 finite + NaN
    grid = torch.unique(codes[~codes.isnan()].abs())  # sorted, 0 .. 448
    mids = ((grid[:-1].double() + grid[1:].double()) / 2).float()
    assert torch.equal(mids.double(), (grid[:-1].double() + grid[1:].double()) / 2)  # exact
    edges = torch.tensor([448.0, 464.0, 480.0, 500.0, 1e4, 3e38, float("inf"), 1e-45, 1e-40,
                          2.0**-10, 2.0**-11, 3 * 2.0**-11, 31.16, 15.75, 0.0])
    base = torch.cat([codes, grid, mids, edges])
    up = torch.nextafter(base, torch.full_like(base, float("inf")))
    down = torch.nextafter(base, torch.full_like(base, -float("inf")))
    x = torch.cat([base, up, down])
    return torch.cat([x, -x, torch.tensor([float("nan"), -float("nan")])])


def test_rounding_helper_matches_torch_on_every_neighbourhood():
    x = _neighbourhoods()
    assert x.numel() > 3000
    got = tf.triton_cast_e4m3(x.to(DEV))
    assert_same_fp8(got, x.to(ref.FP8_DTYPE))
    # NaN keeps its sign bit as torch writes it
    nan = x.isnan()
    assert torch.equal(_bits(got)[nan], _bits(x.to(ref.FP8_DTYPE))[nan])


def test_rounding_helper_random_bits():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (20000,), generator=g, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)
    x = torch.cat([x, x * 2.0**-100, x * 2.0**-120])  # pull many into the E4M3 range
    assert_same_fp8(tf.triton_cast_e4m3(x.to(DEV)), x.to(ref.FP8_DTYPE))


# ------------------------------------------------------------------------------- quantization


def _normal(m, k):
    return torch.randn(m, k)


def _log_uniform(m, k):
    mag = torch.exp(torch.empty(m, k).uniform_(torch.log(torch.tensor(1e-6)).item(),
                                               torch.log(torch.tensor(1e4)).item()))
    return mag * torch.sign(torch.randn(m, k))


def _outliers(m, k):
    x = torch.randn(m, k)
    x[:, torch.randperm(k)[:3]] *= 1000.0
    return x


def _subnormal(m, k):
    # one element per 128-tile sets amax = 1; the rest scale to ~1e-5 * 448 < 2^-6
    x = torch.randn(m, k) * 1e-5
    x[:, ::128] = 1.0
    return x


def _ties(m, k):
    # amax = 448 * 2^j makes s = 2^j exact, so x / s lands exactly on E4M3 midpoints
    grid = torch.unique(torch.arange(256, dtype=torch.uint8).view(ref.FP8_DTYPE).float()
                        .nan_to_num(0).abs())
    mids = (grid[:-1] + grid[1:]) / 2
    idx = torch.randint(0, mids.numel(), (m, k))
    x = mids[idx] * torch.sign(torch.randn(m, k))
    x[:, ::128] = 448.0
    return x * 2.0 ** torch.randint(-20, 20, (m, 1)).float()


def _binade_carry(m, k):
    # just below a power of two: the mantissa rounds up into the next binade (31.16 -> 32)
    p = 2.0 ** torch.randint(-5, 9, (m, k)).float()
    x = p * (1 - torch.rand(m, k) * 2.0**-5) * torch.sign(torch.randn(m, k))
    x[:, ::128] = 448.0
    return x


def _zero_tiles(m, k):
    x = torch.randn(m, k)
    x[:, :128] = 0.0
    if m > 2:
        x[1] = 0.0
    return x


def _nans(m, k):
    x = torch.randn(m, k)
    x.view(-1)[torch.randperm(m * k)[: max(1, m * k // 50)]] = float("nan")
    x[0, -1] = -float("inf") if k > 1 else x[0, -1]
    return x


def _tiny(m, k):
    # tiles whose amax sits near or below AMAX_FLOOR (fp32 subnormal range included): the
    # scale is floored to a normal fp32, never 0 / subnormal (no inf reciprocal, no NaN)
    x = torch.randn(m, k)
    amax = torch.tensor([1e-8, 1e-30, 3e-31, 1e-38, 1e-42, 1.4e-45])
    x = x * amax[torch.arange(m) % amax.numel()][:, None]
    return x


DATA = [_normal, _log_uniform, _outliers, _subnormal, _ties, _binade_carry, _zero_tiles, _nans,
        _tiny]
SHAPES = [(1, 200), (7, 1000), (130, 129)]


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("make", DATA, ids=lambda f: f.__name__.strip("_"))
def test_quantize_rowwise_bit_identical(make, pow2):
    for m, k in SHAPES:
        x = make(m, k)
        q, s = tf.triton_quantize_rowwise(x.to(DEV), pow2=pow2)
        q_ref, s_ref = ref.quantize_rowwise(x, pow2=pow2)
        assert_same_scales(s, s_ref)
        assert_same_fp8(q, q_ref)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("make", DATA, ids=lambda f: f.__name__.strip("_"))
def test_quantize_blockwise_bit_identical(make, pow2):
    for n, k in [(1, 1000), (7, 129), (130, 200)]:
        w = make(n, k)
        q, s = tf.triton_quantize_blockwise(w.to(DEV), pow2=pow2)
        q_ref, s_ref = ref.quantize_blockwise(w, pow2=pow2)
        assert_same_scales(s, s_ref)
        assert_same_fp8(q, q_ref)


def test_pow2_scales_near_powers_of_two():
    # s = amax / 448 just above 2^k, where torch's fp32 log2 rounds down to k (ceil keeps k)
    # for large |k| and up for small ones; the kernel computes this without log2/exp2
    # (k from subnormal scales to the top of fp32; m = 0, 1, 2, ... crosses every threshold)
    ms = (0, 1, 2, 3, 6, 12, 22, 23, 44, 45, 1000)
    amax = [448.0 * 2.0**k * (1 + m * 2.0**-23) for k in range(-140, 119) for m in ms]
    amax += [1e-44, 3e-40, 2e-37, 3e38]
    x = torch.randn(len(amax), 128) * 1e-3
    x[:, 0] = torch.tensor(amax)
    x[:, 127] = torch.tensor(amax) / 3
    s = x.abs().amax(1) / 448  # the rule matters: next power of two != torch's
    b = s.view(torch.int32)
    naive = torch.where(b & 0x7FFFFF == 0, s, torch.exp2(torch.floor(torch.log2(s)) + 1))
    assert (naive != torch.exp2(torch.ceil(torch.log2(s)))).sum() > 500
    q, s = tf.triton_quantize_rowwise(x.to(DEV), pow2=True)
    q_ref, s_ref = ref.quantize_rowwise(x, pow2=True)
    assert_same_scales(s, s_ref)
    assert_same_fp8(q, q_ref)


def test_quantize_dtypes_and_layout():
    x = torch.randn(300, 7)  # non-contiguous view below: (7, 300)
    for xx in (x.t(), x.t().to(torch.bfloat16), x.t().half(), x.t().double()):
        q, s = tf.triton_quantize_rowwise(xx.to(DEV))
        q_ref, s_ref = ref.quantize_rowwise(xx)
        assert_same_scales(s, s_ref)
        assert_same_fp8(q, q_ref)
        q, s = tf.triton_quantize_blockwise(xx.to(DEV))
        q_ref, s_ref = ref.quantize_blockwise(xx)
        assert_same_scales(s, s_ref)
        assert_same_fp8(q, q_ref)
    q, s = tf.triton_quantize_rowwise(torch.zeros(0, 5, device=DEV))
    assert q.shape == (0, 5) and s.shape == (0, 1)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2 dims"):
        tf.triton_quantize_rowwise(torch.randn(2, 3, 4, device=DEV))
    with pytest.raises(TypeError, match="x must be"):
        tf.triton_quantize_rowwise(torch.ones(2, 3, dtype=torch.int32, device=DEV))
    with pytest.raises(TypeError, match="w must be"):
        tf.triton_quantize_blockwise([[1.0]])


# --------------------------------------------------------------------------------------- GEMM


def _operands(m, n, k, b_layout):
    a_q, a_s = ref.quantize_rowwise(torch.randn(m, k))
    w = torch.randn(n, k) * 0.05
    b_q, b_s = ref.quantize_blockwise(w) if b_layout == "block" else ref.quantize_rowwise(w)
    return a_q, a_s, b_q, b_s


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# every value of M {1, 7, 300}, K {200, 1000} (+256: no K tail), N {96, 384}, both layouts,
# bias or not, fp32 and bf16 out, without the full product (the interpreter is slow)
GEMM_CASES = [
    (1, 96, 200, "block", False, torch.float32),
    (1, 384, 1000, "block", True, torch.bfloat16),
    (7, 384, 1000, "row", True, torch.float32),
    (7, 96, 256, "block", True, torch.float32),
    (7, 96, 200, "row", False, torch.bfloat16),
    (300, 96, 200, "block", True, torch.bfloat16),
    (300, 96, 200, "row", True, torch.float32),
]


@pytest.mark.parametrize("m,n,k,b_layout,bias,out_dtype", GEMM_CASES)
def test_gemm_matches_reference(m, n, k, b_layout, bias, out_dtype):
    a_q, a_s, b_q, b_s = _operands(m, n, k, b_layout)
    b = torch.randn(n) if bias else None
    want = ref.fp8_gemm_reference(a_q, a_s, b_q, b_s, b_layout=b_layout, bias=b,
                                  out_dtype=out_dtype)
    got = tf.triton_fp8_gemm(a_q.to(DEV), a_s.to(DEV), b_q.to(DEV), b_s.to(DEV),
                             b_layout=b_layout, bias=None if b is None else b.to(DEV),
                             out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    tol = GEMM_TOL if out_dtype == torch.float32 else BF16_TOL
    assert _rel_err(got, want) <= tol


def test_gemm_promotes_per_block_scales():
    # K-blocks with scales 2^40 apart: a kernel that summed fp8 products across blocks before
    # scaling (or mixed up the scale index) would be far off
    a = torch.randn(5, 384)
    a[:, 128:256] *= 2.0**20
    w = torch.randn(140, 384)
    w[:, 256:] *= 2.0**-20
    w[128:] *= 2.0**10  # second 128-row block of B gets its own scale
    a_q, a_s = ref.quantize_rowwise(a)
    b_q, b_s = ref.quantize_blockwise(w)
    want = ref.fp8_gemm_reference(a_q, a_s, b_q, b_s)
    got = tf.triton_fp8_gemm(a_q.to(DEV), a_s.to(DEV), b_q.to(DEV), b_s.to(DEV))
    assert _rel_err(got, want) <= GEMM_TOL


def test_gemm_edge_shapes_and_errors():
    a_q, a_s, b_q, b_s = _operands(3, 5, 0, "block")
    bias = torch.arange(5.0)
    got = tf.triton_fp8_gemm(a_q.to(DEV), a_s.to(DEV), b_q.to(DEV), b_s.to(DEV),
                             bias=bias.to(DEV))
    assert torch.equal(got.cpu(), bias.expand(3, 5))
    a_q, a_s, b_q, b_s = _operands(4, 130, 200, "block")
    args = [t.to(DEV) for t in (a_q, a_s, b_q, b_s)]
    with pytest.raises(ValueError, match="b_layout"):
        tf.triton_fp8_gemm(*args, b_layout="col")
    with pytest.raises(ValueError, match=r"b_s \(row layout\) must have shape \(130, 2\)"):
        tf.triton_fp8_gemm(*args, b_layout="row")
    with pytest.raises(TypeError, match="a_q must be"):
        tf.triton_fp8_gemm(args[0].float(), *args[1:])
    with pytest.raises(ValueError, match="differ in K"):
        tf.triton_fp8_gemm(args[0][:, :100], *args[1:])
    with pytest.raises(ValueError, match="bias must have shape"):
        tf.triton_fp8_gemm(*args, bias=torch.zeros(3, device=DEV))
    with pytest.raises(ValueError, match="out_dtype"):
        tf.triton_fp8_gemm(*args, out_dtype=torch.int8)
    # a non-contiguous operand is made contiguous
    a_t = a_q.float().t().contiguous().to(ref.FP8_DTYPE).t()
    assert not a_t.is_contiguous()
    got = tf.triton_fp8_gemm(a_t.to(DEV), *args[1:])
    assert _rel_err(got, ref.fp8_gemm_reference(a_q, a_s, b_q, b_s)) <= GEMM_TOL


# ------------------------------------------------------------------------------- grouped GEMM


def _grouped(counts, n, k):
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    t = int(offsets[-1])
    a_q, a_s = ref.quantize_rowwise(torch.randn(t, k))
    qs = [ref.quantize_blockwise(torch.randn(n, k) * 0.05) for _ in counts]
    b_q = torch.stack([q for q, _ in qs])
    b_s = torch.stack([s for _, s in qs])
    return a_q, a_s, b_q, b_s, offsets


@pytest.mark.parametrize("counts,n,k,out_dtype", [
    ([3, 0, 1, 0, 37], 96, 200, torch.float32),  # empty experts, a lone token, multi-tile
    ([1], 200, 129, torch.float32),  # a single token; odd N and K
    ([0, 0, 20, 0], 130, 256, torch.bfloat16),  # all rows in one expert
    ([5, 17, 16, 2, 0, 9], 64, 520, torch.float32),
])
def test_grouped_gemm_matches_reference(counts, n, k, out_dtype):
    a_q, a_s, b_q, b_s, offsets = _grouped(counts, n, k)
    want = tf.fp8_grouped_gemm_reference(a_q, a_s, b_q, b_s, offsets, out_dtype)
    got = tf.triton_fp8_grouped_gemm(*(x.to(DEV) for x in (a_q, a_s, b_q, b_s, offsets)),
                                     out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == want.shape
    assert _rel_err(got, want) <= (GEMM_TOL if out_dtype == torch.float32 else BF16_TOL)
    # the reference itself is the per-expert dense GEMM
    e = max(range(len(counts)), key=lambda i: counts[i])
    lo, hi = int(offsets[e]), int(offsets[e + 1])
    dense = ref.fp8_gemm_reference(a_q[lo:hi], a_s[lo:hi], b_q[e], b_s[e], out_dtype=out_dtype)
    assert torch.equal(want[lo:hi], dense)


def test_grouped_gemm_errors():
    a_q, a_s, b_q, b_s, offsets = _grouped([2, 3], 96, 200)
    args = [x.to(DEV) for x in (a_q, a_s, b_q, b_s)]
    with pytest.raises(TypeError, match="offsets must be torch.int32"):
        tf.triton_fp8_grouped_gemm(*args, offsets.long())
    with pytest.raises(ValueError, match="offsets must have shape"):
        tf.triton_fp8_grouped_gemm(*args, offsets[:2])
    if DEV == "cpu":
        with pytest.raises(ValueError, match="offsets must rise"):
            tf.triton_fp8_grouped_gemm(*args, torch.tensor([0, 4, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="b_q must have 3 dims"):
        tf.triton_fp8_grouped_gemm(args[0], args[1], args[2][0], args[3], offsets.to(DEV))


def test_autotune_env_off_gives_one_config(monkeypatch):
    """REWRITER_FP8_AUTOTUNE=0: every GEMM launches with one config, so Triton skips
    benchmarking (a model's first FP8 step on a GPU compiles each kernel once, not six times)."""
    monkeypatch.setenv(tf.AUTOTUNE_ENV, "0")
    one = tf._tuned("gemm")
    monkeypatch.setenv(tf.AUTOTUNE_ENV, "1")
    all_ = tf._tuned("gemm")
    assert len(one.configs) == 1 and len(all_.configs) == len(tf._gemm_configs()) > 1
    assert one.configs[0].kwargs == tf._gemm_configs()[0].kwargs
