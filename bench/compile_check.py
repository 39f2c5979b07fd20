"""Compile every Triton kernel of rewriter.targets.triton_fp8 for a GPU, on a machine without one.

    python bench/compile_check.py --arch sm_90 --json out.json
    python bench/compile_check.py --arch sm_90,sm_100 --select gemm --json out.json

For every kernel, launch variant and launch config (the autotune configs for the GEMMs, the
wrappers' fixed launch parameters for the quantization kernels) it runs ``triton.compile(
ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))`` and reads:

- registers, stack and local bytes, static shared memory: ``cuobjdump --dump-resource-usage``
  (shipped in Triton's wheel) on the cubin; dynamic shared memory: the kernel's metadata;
- pipeline depth reached: the leading dimension of the multi-buffered fp8 operand tiles in the
  TTGIR (``ttg.local_alloc ... memdesc<3x128x128xf8E4M3FN>`` is 3 stages; a 2-D fp8 tile or
  operands loaded straight to registers is 1), plus counts of cp.async / mbarrier ops in PTX;
- FP8 tensor-core MMAs (``wgmma.mma_async ... e4m3`` on sm_90a, ``tcgen05.mma ...
  kind::f8f6f4`` on sm_100a, ``mma.sync ... e4m3`` on sm_89) and TMA (``cp.async.bulk.tensor``).

Arguments are specialised as Triton's launcher does at run time: pointers (16-byte aligned
torch allocations) and integers divisible by 16 get ``tt.divisibility = 16``. Without that
hint (what a bare ``ASTSource`` without ``attrs`` compiles) no load is vectorised, the K loop
is not pipelined and every GEMM config spills; the ``unaligned`` variant (K = 1000) shows it.

Checks (exit status 1 if one fails): every compile succeeds, every GEMM row uses FP8 MMAs,
dynamic + static shared memory fits the opt-in per-block limit (227 KiB on sm_90 / sm_100).
Reported, not checked: spills (stack > 0) and single-stage K loops.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# compiling needs Triton's real (non-interpreted) decorators: set before triton is imported
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as the runtime default; no warning

import triton  # noqa: E402
from rewriter.targets import triton_fp8 as tf  # noqa: E402
from rewriter.targets.fp8 import BLOCK  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

__all__ = ["Launch", "launches", "compile_one", "check", "main"]

SMEM_LIMIT = {90: 227 * 1024, 100: 227 * 1024, 89: 99 * 1024}  # opt-in max per block
_FP8_MMA = re.compile(r"(wgmma\.mma_async\S*e4m3\S*|tcgen05\.mma\S*kind::f8f6f4\S*"
                      r"|mma\.sync\S*e4m3\S*)")
_STAGED = re.compile(r"ttg\.local_alloc\b[^\n]*memdesc<(\d+)x\d+x\d+xf8E4M3FN")
_TILE = re.compile(r"ttg\.local_alloc\b[^\n]*memdesc<\d+x\d+xf8E4M3FN")
_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")

# pointer element types at a representative launch (GEMM outputs in bf16, as in a model)
_PTRS = {
    "x_ptr": "*bf16", "w_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
    "a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "as_ptr": "*fp32", "bs_ptr": "*fp32",
    "bias_ptr": "*fp32", "c_ptr": "*bf16", "off_ptr": "*i32",
}
_CAST_PTRS = {"x_ptr": "*fp32"}  # triton_cast_e4m3 casts x.float()


@dataclass(frozen=True)
class Launch:
    """One compile: a kernel at representative argument values and one launch config."""
    kernel: str
    variant: str
    ints: dict  # runtime integer arguments (their values decide the divisibility hints)
    constexprs: dict  # constexpr arguments, the config's block sizes included
    num_warps: int
    num_stages: int
    align: bool = True  # specialise like the launcher (False: no hints at all)
    ptrs: dict = field(default_factory=dict)  # per-kernel pointer dtype overrides

    @property
    def config(self) -> str:
        blocks = "x".join(str(v) for k, v in self.constexprs.items()
                          if k.startswith("BLOCK") and k != "BLOCK_K")
        return f"{blocks} w{self.num_warps} s{self.num_stages}"

    @property
    def stage_bytes(self) -> int | None:
        """fp8 operand bytes per K step (A and B tiles) for the GEMMs."""
        c = self.constexprs
        if {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(c):
            return (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"]
        return None


def _gemm_variants() -> dict:
    # DeepSeek-V3 shape 4096 x 7168 x 16384; K = 576 (SmolLM2's hidden) is not a multiple of
    # 128 but of 16; K = 1000 is neither; "row" is the Wgrad layout (rowwise-scaled B)
    m, n = 4096, 7168
    v = {}
    for name, k, b_row, bias, align in (("block", 16384, False, False, True),
                                        ("row+bias", 16384, True, True, True),
                                        ("ragged_k", 576, False, False, True),
                                        ("unaligned", 1000, False, False, False)):
        kb = -(-k // BLOCK)
        v[name] = (dict(M=m, N=n, K=k, KB=kb, M_BUCKET=4096),
                   dict(B_ROW=b_row, HAS_BIAS=bias, EVEN_K=k % BLOCK == 0, BLOCK_K=BLOCK,
                        GROUP_M=8), align)
    return v


def _grouped_variants() -> dict:
    # DeepSeek-V3 routed expert up-projection: 256 experts of 2048 x 7168 (here 8 on a rank)
    v = {}
    for name, k in (("aligned", 7168), ("ragged_k", 576)):
        kb = -(-k // BLOCK)
        v[name] = (dict(N=4096, K=k, KB=kb, NB=32, E=8),
                   dict(EVEN_K=k % BLOCK == 0, BLOCK_K=BLOCK), True)
    return v


def launches() -> list[Launch]:
    """Every kernel x variant x config, from the module: the autotuned GEMMs' configs as
    ``_tuned`` builds them; the quantization kernels with their wrappers' launch constants.
    Raises if the module holds a ``@triton.jit`` kernel this list does not cover."""
    out = []
    for name, variants in (("gemm", _gemm_variants()), ("grouped", _grouped_variants())):
        tuner = tf._tuned(name)
        for variant, (ints, flags, align) in variants.items():
            for cfg in tuner.configs:
                out.append(Launch(tuner.fn.__name__, variant, ints,
                                  {**flags, **cfg.kwargs}, cfg.num_warps, cfg.num_stages,
                                  align))
    m, k = 4096, 7168
    kb = k // BLOCK
    out += [  # as triton_quantize_rowwise / _blockwise / triton_cast_e4m3 launch them
        Launch("_quant_rowwise_kernel", "bf16", dict(M=m, K=k, KB=kb),
               dict(POW2=False, BLOCK_M=tf._QUANT_BLOCK_M, BLOCK_K=BLOCK), 4, 3),
        Launch("_quant_rowwise_kernel", "bf16 pow2", dict(M=m, K=k, KB=kb),
               dict(POW2=True, BLOCK_M=tf._QUANT_BLOCK_M, BLOCK_K=BLOCK), 4, 3),
        Launch("_quant_blockwise_kernel", "bf16", dict(N=m, K=k, KB=kb),
               dict(POW2=False, BLOCK=BLOCK), 8, 3),
        Launch("_cast_e4m3_kernel", "fp32", dict(n=m * k), dict(BLOCK_SIZE=1024), 4, 3,
               ptrs=_CAST_PTRS),
    ]
    jitted = {n for n, f in vars(tf).items()
              if n.endswith("_kernel") and isinstance(f, triton.runtime.JITFunction)}
    missing = jitted - {x.kernel for x in out}
    if missing:
        raise RuntimeError(f"kernels without a launch in compile_check: {sorted(missing)}")
    return out


def _source(launch: Launch) -> ASTSource:
    fn = getattr(tf, launch.kernel)
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        if p.name.endswith("_ptr"):
            sig[p.name] = launch.ptrs.get(p.name, _PTRS[p.name])
            divisible = True  # torch allocations are 256-byte aligned
        else:
            value = launch.ints[p.name]
            if value == 1:
                raise ValueError(f"{p.name}=1 would be specialised as a constant")
            sig[p.name] = "i32" if abs(value) < 2**31 else "i64"
            divisible = value % 16 == 0
        if divisible and launch.align:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, sig, {k: launch.constexprs[k] for k in fn.arg_names
                               if k in launch.constexprs}, attrs)


def _cuobjdump() -> Path | None:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return path if path.exists() else None


def _resource_usage(cubin: bytes, tmp: Path) -> dict:
    tool = _cuobjdump()
    if tool is None:
        return {}
    tmp.write_bytes(cubin)
    out = subprocess.run([str(tool), "--dump-resource-usage", str(tmp)], capture_output=True,
                         text=True, timeout=60).stdout
    m = _USAGE.search(out)
    if not m:
        return {}
    reg, stack, shared, local = map(int, m.groups())
    return dict(regs=reg, stack_bytes=stack, static_smem=shared, local_bytes=local)


def compile_one(launch: Launch, arch: int, tmp: Path) -> dict:
    """Compile one launch for sm_<arch>; a dict of what it emits (``error`` if it failed)."""
    row = dict(arch=f"sm_{arch}", kernel=launch.kernel, variant=launch.variant,
               config=launch.config, num_warps=launch.num_warps,
               num_stages=launch.num_stages, aligned=launch.align, ints=launch.ints,
               constexprs=launch.constexprs)
    t0 = time.perf_counter()
    try:
        k = triton.compile(_source(launch), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=launch.num_warps,
                                        num_stages=launch.num_stages))
    except Exception as e:  # a failed compile is a result, not a crash of the whole check
        row.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}",
                   compile_s=round(time.perf_counter() - t0, 2))
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    row.update(_resource_usage(k.asm["cubin"], tmp))
    row["dynamic_smem"] = int(k.metadata.shared)
    row["smem_bytes"] = row["dynamic_smem"] + row.get("static_smem", 0)
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    row["ptx_target"] = target.group(1) if target else None
    row["fp8_mma"] = sorted(set(_FP8_MMA.findall(ptx)))
    row["tma"] = "cp.async.bulk.tensor" in ptx
    row["cp_async"] = len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", ptx))
    row["mbarrier"] = len(re.findall(r"\bmbarrier\.", ptx))
    staged = [int(d) for d in _STAGED.findall(ttgir)]
    row["stages_reached"] = (max(staged) if staged else 1 if _TILE.search(ttgir)
                             else None if launch.stage_bytes is None else 1)
    row["stage_bytes"] = launch.stage_bytes
    return row


def check(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(failures, notes): failures break the check (compile errors, a GEMM without FP8 MMAs,
    shared memory over the per-block limit); notes report spills and single-stage loops."""
    fail, note = [], []
    for r in rows:
        rid = f"{r['arch']} {r['kernel']} {r['variant']} {r['config']}"
        if "error" in r:
            fail.append(f"{rid}: compile failed: {r['error']}")
            continue
        limit = SMEM_LIMIT.get(int(r["arch"][3:]))
        if limit is not None and r["smem_bytes"] > limit:
            fail.append(f"{rid}: shared memory {r['smem_bytes']} > {limit}")
        if r["stage_bytes"] is not None:
            if not r["fp8_mma"]:
                fail.append(f"{rid}: no FP8 tensor-core MMA")
            if r["stages_reached"] is not None and r["stages_reached"] < 2:
                note.append(f"{rid}: K loop single-stage (num_stages={r['num_stages']})")
        if r.get("stack_bytes"):
            note.append(f"{rid}: {r['stack_bytes']} bytes of stack (spills), "
                        f"{r.get('regs')} registers")
    return fail, note


def _archs(text: str) -> list[int]:
    out = []
    for a in text.split(","):
        m = re.fullmatch(r"(?:sm_)?(\d+)a?", a.strip())
        if not m:
            raise SystemExit(f"--arch: expected sm_90, sm_100, ..., got {a!r}")
        out.append(int(m.group(1)))
    return out


def _supported(arch: int) -> str | None:
    """None if this Triton compiles for sm_<arch>, else why not (tried on the cast kernel)."""
    try:
        triton.compile(_source(launches()[-1]), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=4))
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
    return None


def _short_mma(instr: str) -> str:
    """'wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3' -> 'wgmma m64n128k32 e4m3'."""
    shape = re.search(r"m\d+n\d+k\d+", instr)
    kind = re.search(r"kind::(\w+)", instr)
    return " ".join([instr.split(".")[0]] + ([shape.group(0)] if shape else [])
                    + (["e4m3"] if "e4m3" in instr else [kind.group(1)] if kind else []))


def _table(rows: list[dict]) -> str:
    head = ("| arch | kernel | variant | config | regs | stack | smem (bytes) | stages | "
            "FP8 MMA | TMA |\n|---|---|---|---|---:|---:|---:|---:|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['arch']} | {r['kernel']} | {r['variant']} | {r['config']} "
                         f"| error: {r['error'][:60]} ||||||")
            continue
        mma = ", ".join(_short_mma(m) for m in r["fp8_mma"]) or "-"
        lines.append(f"| {r['arch']} | {r['kernel'].strip('_')} | {r['variant']} | "
                     f"{r['config']} | {r.get('regs', '?')} | {r.get('stack_bytes', '?')} | "
                     f"{r['smem_bytes']:,} | {r['stages_reached'] or '-'} | {mma} | "
                     f"{'yes' if r['tma'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="sm_90,sm_100",
                   help="comma list (sm_90 = Hopper sm_90a, sm_100 = Blackwell sm_100a); an "
                        "arch this Triton cannot target is reported and skipped, except the "
                        "first")
    p.add_argument("--json", type=Path, help="write the rows, failures and notes here")
    p.add_argument("--select", default="",
                   help="regex on 'sm_90 kernel variant config' to compile a subset")
    p.add_argument("--table", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    sel = re.compile(args.select)
    rows, skipped = [], {}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"compile_check_{os.getpid()}.cubin"
    archs = _archs(args.arch)
    for i, arch in enumerate(archs):
        why = _supported(arch)
        if why is not None:
            if i == 0:
                print(f"sm_{arch}: not supported by triton {triton.__version__}: {why}")
                return 1
            skipped[f"sm_{arch}"] = why
            print(f"sm_{arch}: skipped ({why})", flush=True)
            continue
        for launch in launches():
            if not sel.search(f"sm_{arch} {launch.kernel} {launch.variant} {launch.config}"):
                continue
            r = compile_one(launch, arch, tmp)
            rows.append(r)
            print(f"sm_{arch} {launch.kernel} {launch.variant} {launch.config}: "
                  + (r["error"] if "error" in r else
                     f"regs {r.get('regs')} stack {r.get('stack_bytes')} smem "
                     f"{r['smem_bytes']} stages {r['stages_reached']} "
                     f"mma {','.join(r['fp8_mma']) or '-'} tma {r['tma']} "
                     f"({r['compile_s']} s)"), flush=True)
    tmp.unlink(missing_ok=True)
    fail, note = check(rows)
    if args.table:
        print(_table(rows))
    for n in note:
        print("note:", n)
    for f in fail:
        print("FAIL:", f)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            triton=triton.__version__, python=sys.version.split()[0],
            cuobjdump=str(_cuobjdump()) if _cuobjdump() else None, skipped_archs=skipped,
            rows=rows, failures=fail, notes=note), indent=1))
    print(f"{len(rows)} compiles, {len(fail)} failures, {len(note)} notes")
    return 1 if fail or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
