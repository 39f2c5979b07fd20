"""MoEFFN vs the dense FFN it came from, on this CPU (a benchmark, not a test).

    python bench/moe_cpu.py                       # SmolLM2 FFN: d 576, d_ff 1536, SwiGLU
    python bench/moe_cpu.py --tokens 4096 64 --experts 16 --top-k 2 4 8 --repeats 7

The dense FFN is ``w2(silu(w1 x) * w3 x)``; the MoE block is the same neurons cut into
``experts`` slices of ``d_ff / experts`` (no shared experts, hard gates), so top_k / experts of
the neurons are active per token and the ideal speed-up is experts / top_k. Before timing, the
MoE block with every expert active is checked against the dense FFN (the exact-split invariant).
Thread count is torch's default. Prints one table; ratios come from one run.
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from _timing import medians_ms, time_interleaved  # noqa: E402
from rewriter.models.moe import MoEFFN  # noqa: E402
from torch import nn


class DenseSwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)  # gate
        self.w3 = nn.Linear(d_model, d_ff, bias=False)  # up
        self.w2 = nn.Linear(d_ff, d_model, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@torch.no_grad()
def split_dense(dense: DenseSwiGLU, experts: int, top_k: int) -> MoEFFN:
    """The MoE block holding the dense FFN's neurons, cut into ``experts`` equal slices."""
    d_ff, d_model = dense.w1.weight.shape
    if d_ff % experts:
        raise ValueError(f"d_ff={d_ff} is not divisible by experts={experts}")
    f = d_ff // experts
    moe = MoEFFN(d_model, f, experts, top_k, activation="silu", glu=True, gate="hard")
    moe.w_gate.copy_(dense.w1.weight.view(experts, f, d_model))  # (E, F, d)
    moe.w_up.copy_(dense.w3.weight.view(experts, f, d_model))  # (E, F, d)
    moe.w_down.copy_(dense.w2.weight.view(d_model, experts, f).permute(1, 0, 2))  # (E, d, F)
    return moe.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 64])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    dense = DenseSwiGLU(args.d_model, args.d_ff).eval()

    with torch.no_grad():  # exact split: all experts active == dense
        x = torch.randn(64, args.d_model)
        full = split_dense(dense, args.experts, args.experts)
        err = ((full(x) - dense(x)).norm() / dense(x).norm()).item()
    if err > 1e-5:
        raise SystemExit(f"MoE with all experts active differs from dense: rel err {err:.2e}")

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}, fp32, d_model {args.d_model}, d_ff {args.d_ff}, "
          f"{args.experts} experts of {args.d_ff // args.experts}, "
          f"median of {args.repeats} after {args.warmup} warm-up; all-active rel err {err:.1e}")
    header = (f"| {'tokens':>6} | {'active':>6} | {'top_k':>5} | {'dense ms':>9} | "
              f"{'MoE ms':>8} | {'speed-up':>8} | {'ideal':>5} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    blocks = {k: split_dense(dense, args.experts, k) for k in args.top_k}
    for tokens in args.tokens:
        x = torch.randn(tokens, args.d_model)
        fns = {name: (lambda f=f, x=x: f(x)) for name, f in {"dense": dense, **blocks}.items()}
        ms = medians_ms(time_interleaved(fns, repeats=args.repeats, warmup=args.warmup))
        for k in args.top_k:
            print(f"| {tokens:>6} | {f'{k}/{args.experts}':>6} | {k:>5} | {ms['dense']:>9.2f} | "
                  f"{ms[k]:>8.2f} | {ms['dense'] / ms[k]:>7.2f}x | {args.experts / k:>4.1f}x |")

if __name__ == "__main__":
    main()
