"""bench/compile_check.py: the Triton kernels compiled for Hopper (and Blackwell) on this CPU.

Each run is a fresh process: compiling needs Triton's real (non-interpreted) decorators, while
other test modules of this session switch the interpreter on before triton is imported.
Asserted: every compile succeeds, FP8 tensor-core MMAs in every GEMM config, shared memory
within the opt-in per-block limit (227 KiB on sm_90 / sm_100), and, where the launcher's
alignment hints apply (all variants but ``unaligned``), a multi-stage K loop and no spills
and, on sm_90, no spills for block-scaled weights (both hold since the per-tile scalar weight
scale; see BENCHMARKS.md for the table).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "compile_check.py"
SMEM_LIMIT = 227 * 1024


def _run(tmp_path, *args) -> dict:
    out = tmp_path / "cc.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *args],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_rows(rows):
    assert rows
    for r in rows:
        rid = f"{r['arch']} {r['kernel']} {r['variant']} {r['config']}"
        assert "error" not in r, rid
        assert r["smem_bytes"] <= SMEM_LIMIT, rid
        if r["stage_bytes"] is None:  # quantization kernels: no MMA, no pipeline
            continue
        assert r["fp8_mma"], f"{rid}: no FP8 MMA"
        if r["arch"] == "sm_90":
            assert all("e4m3.e4m3" in m and m.startswith("wgmma") for m in r["fp8_mma"]), rid
        if r["arch"] == "sm_100":
            assert all("kind::f8f6f4" in m for m in r["fp8_mma"]), rid
        if r["variant"] != "unaligned":
            assert r["stages_reached"] == r["num_stages"], rid
            # the operand ring fits the dynamic shared memory it claims
            assert r["stages_reached"] * r["stage_bytes"] <= r["dynamic_smem"], rid
            # block-scaled weights (Fprop, Dgrad, grouped) on Hopper: no spills. The rowwise B
            # of Wgrad keeps a scale per column: 128x128 spills 16 bytes (reported, not failed)
            if r.get("regs") is not None and r["arch"] == "sm_90" and "row" not in r["variant"]:
                assert r["stack_bytes"] == 0 and r["local_bytes"] == 0, f"{rid}: spills"


def test_one_small_config_compiles_for_hopper(tmp_path):
    res = _run(tmp_path, "--arch", "sm_90", "--select", r"_fp8_gemm_kernel block 64x64")
    rows = res["rows"]
    assert len(rows) == 1 and res["failures"] == []
    r = rows[0]
    assert r["ptx_target"] == "sm_90a"
    assert r["fp8_mma"] == ["wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3"]
    assert r["stage_bytes"] == (64 + 64) * 128
    assert r["stages_reached"] == 5 and r["cp_async"] > 0 and not r["tma"]
    if res["cuobjdump"]:
        assert 0 < r["regs"] <= 255 and r["stack_bytes"] == 0
    _assert_rows(rows)


def test_unaligned_launch_is_reported_not_failed(tmp_path):
    """Without divisibility hints the loads are not vectorised: one stage, spills; a note."""
    res = _run(tmp_path, "--arch", "sm_90", "--select", r"_fp8_gemm_kernel unaligned 64x64")
    (r,) = res["rows"]
    assert r["stages_reached"] == 1 and res["failures"] == []
    assert any("single-stage" in n for n in res["notes"])


@pytest.mark.slow
def test_every_kernel_and_config(tmp_path):
    res = _run(tmp_path, "--arch", "sm_90,sm_100")
    rows = res["rows"]
    assert res["failures"] == []
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_fp8_gemm_kernel", "_fp8_grouped_gemm_kernel", "_quant_rowwise_kernel",
                       "_quant_blockwise_kernel", "_cast_e4m3_kernel"}
    _assert_rows(rows)
    gemm90 = [r for r in rows if r["arch"] == "sm_90" and r["stage_bytes"]]
    assert len({(r["kernel"], r["config"]) for r in gemm90}) == 12  # 6 autotune configs x 2
    if "sm_100" not in res["skipped_archs"]:
        assert any(r["arch"] == "sm_100" for r in rows)
