"""bench/device_check.py --dry-run: the GPU script's every path on this CPU (Triton interpreter,
tiny shapes), in a fresh process (the interpreter must be chosen before triton is imported)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "device_check.py"


def _run(tmp_path, *args) -> dict:
    out = tmp_path / "dc.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_checks(res):
    assert res["ok"] and res["failed"] == []
    assert res["env"]["kernel_mode"] == "interpret"
    checks = res["checks"]
    kernels = {c["kernel"] for c in checks}
    assert kernels == {"quantize_rowwise", "quantize_blockwise", "cast_e4m3", "fp8_gemm",
                       "triton_fp8_gemm", "fp8_grouped_gemm", "triton_fp8_grouped_gemm"}
    assert all(c["ok"] for c in checks)
    gemm = [c for c in checks if "gemm" in c["kernel"]]
    assert all(0 <= c["rel_err"] <= 1e-5 for c in gemm)
    # every autotune config of both GEMM kernels ran (64x256 included: the vector-scale path)
    configs = {c["config"] for c in checks if c["kernel"] == "fp8_gemm"}
    assert len(configs) == 6 and "64x256 w8 s3" in configs
    assert {c["variant"] for c in checks if c["kernel"] == "fp8_gemm"} == {
        "block", "row+bias", "ragged_k"}


def test_dry_run_checks_and_timings(tmp_path):
    res = _run(tmp_path, "--skip", "e2e", "--rounds", "1")
    _assert_checks(res)
    assert res["e2e"] == "skipped"
    for row in res["dense"]:
        assert {"triton_fp8", "torch_bf16", "quant_rowwise_1x128"} <= set(row["ms"])
        assert all(v > 0 for v in row["ms"].values())
        assert row["fp8_vs_bf16"] > 0
    assert res["grouped"][0]["tflops"]["triton_fp8_grouped"] > 0


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    res = _run(tmp_path)
    _assert_checks(res)
    e2e = res["e2e"]
    assert e2e["loss_finite"] and len(e2e["train_steps"]) == 1
    assert e2e["generate"]["new_tokens"] == 4


def test_e4m3_oracle_is_the_spec():
    """The oracle the GPU cast is judged by decodes E4M3 from its bits: it must equal torch's
    saturating cast here (torch 2.13) on seeded values spanning subnormals, ties, the
    saturation boundary, signed zeros, Inf and NaN."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import device_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import torch

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50_001, generator=gen) * torch.logspace(-5, 3, 50_001)
    grid = device_check._e4m3_grid().float()
    ties = (grid[:-1] + grid[1:]) / 2  # exactly between two codes: ties to even
    special = torch.tensor([0.0, -0.0, 448.0, 464.0, 479.9, 480.0, 1e6, -1e6, float("inf"),
                            -float("inf"), float("nan"), 2.0**-10, -(2.0**-10), 2.0**-9 * 1.5])
    x = torch.cat([x, ties, -ties, special])
    got = device_check.e4m3_oracle(x)
    want = x.to(torch.float8_e4m3fn).view(torch.uint8)
    nan = x.isnan()
    assert torch.equal(got[~nan], want[~nan])
    assert set(got[nan].tolist()) <= {0x7F, 0xFF}
    assert got[-14 + 1] == 0x80 and got[-14] == 0x00  # -0.0 keeps its sign bit
