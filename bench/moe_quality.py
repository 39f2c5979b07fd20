"""MoE conversion quality on the real SmolLM2-135M, without any training (a benchmark, not a test).

    python bench/moe_quality.py                          # ~16k held-out tokens, the plan below
    python bench/moe_quality.py --eval-tokens 40960 --json out/moe_quality.json
    python bench/moe_quality.py --quick                  # smoke run: few tokens, 44% only

Text: Python's own documentation shipped with CPython (``pydoc_data.topics``, the values
concatenated in sorted-key order), tokenized with the model's tokenizer and cut into sequences
of ``--seq-len`` (256) tokens. Calibration uses the first ``--calib-seqs`` sequences (16 x 256
by default), evaluation the last ``--eval-tokens`` tokens: disjoint parts of the text.
Perplexity = exp(mean next-token NLL) over the evaluation tokens.

Every FFN of the 30 layers (d_ff 1536, SwiGLU) is converted with ``rewriter.convert`` into an
MoE block with hard gates (selected experts weigh exactly 1) at these fractions of the FFN
neurons active per token::

    25%   16 x 96 routed, top-4, no shared
    31%   192 shared + 14 x 96 routed, top-3
    44%   384 shared + 16 x 72 routed, top-4
    58%   384 shared + 16 x 72 routed, top-7
    75%   768 shared + 16 x 48 routed, top-8
    77%   384 shared + 16 x 72 routed, top-11
    (not by default: 75a = 1024 shared + 32 x 16 top-8, 75b = 512 shared + 16 x 64 top-10,
     75c = 1024 shared + 16 x 32 top-4, 75d = 1024 shared + 64 x 8 top-16,
     75e = 1024 shared + 128 x 4 top-32)

Routers: ``centroid`` (MoEfication similarity router), ``calibrated`` (the fitted linear router
of passes/router_init.py) and ``oracle``: an upper bound that exists only here, which computes
every expert's output for every token and keeps the top_k by the norm of their contribution
(hard gates). One conversion (with router_init="calibrated") serves the three routers: the
centroid router is rebuilt from the block's own weights (identical to what convert() emits
for router_init="centroid", checked with ``--check-centroid``) and the oracle patches
``_route``.

Plan (bounded time): at 44% the full grid grouping x router (shared neurons by activation),
then shared_selection activation vs contiguous with the best grouping; the other fractions use
the best grouping and shared selection of 44%, with the three routers. "best" = the lowest
perplexity of a non-oracle router. ``recall`` is the mean over layers of the router's top-k
recall of the oracle's experts, measured in situ on the first ``--recall-tokens`` evaluation
tokens. Token ids and the dense perplexity are cached under ``--cache``.

Prints one table (and the wall times) and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import platform
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rewriter.models.moe import MoEFFN  # noqa: E402
from rewriter.models.text import perplexity, split_ids, token_ids  # noqa: E402
from rewriter.passes.router_init import centroid_router  # noqa: E402

import rewriter  # noqa: E402
from rewriter import MoEConfig  # noqa: E402

GROUPINGS = ("contiguous", "random", "kmeans", "coactivation")
ROUTERS = ("centroid", "calibrated", "oracle")


@dataclass(frozen=True)
class Fraction:
    """One MoE shape for d_ff = 1536."""

    name: str
    num_experts: int
    top_k: int
    shared_width: int
    d_ff: int = 1536

    @property
    def active(self) -> float:
        expert_dim = (self.d_ff - self.shared_width) // self.num_experts
        return (self.shared_width + self.top_k * expert_dim) / self.d_ff

    def describe(self) -> str:
        expert_dim = (self.d_ff - self.shared_width) // self.num_experts
        shared = f"{self.shared_width} sh + " if self.shared_width else ""
        return f"{shared}{self.num_experts}x{expert_dim} top-{self.top_k}"


FRACTIONS = {
    "25": Fraction("25", 16, 4, 0),
    "31": Fraction("31", 14, 3, 192),
    "44": Fraction("44", 16, 4, 384),
    "58": Fraction("58", 16, 7, 384),
    "75": Fraction("75", 16, 8, 768),
    "77": Fraction("77", 16, 11, 384),
    # other shapes at 75% (shared width is a lever there), not in the default plan
    "75a": Fraction("75a", 32, 8, 1024),
    "75b": Fraction("75b", 16, 10, 512),
    "75c": Fraction("75c", 16, 4, 1024),
    "75d": Fraction("75d", 64, 16, 1024),
    "75e": Fraction("75e", 128, 32, 1024),
}


@dataclass
class Row:
    fraction: str
    active: float
    shape: str
    grouping: str
    shared_selection: str
    router: str
    ppl: float
    recall: float | None
    convert_s: float
    eval_s: float
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- evaluation


def moe_blocks(model) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def expert_norms(block: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """(T, E) norm of each routed expert's output contribution for tokens x (T, d)."""
    y = torch.einsum("tef,edf->ted", block.expert_hidden(x), block.w_down)  # (T, E, d)
    return y.norm(dim=-1).float()


def _oracle_route(self: MoEFFN, x: torch.Tensor):
    """Bench-only router: the top_k experts by true contribution norm, hard gates."""
    norms = expert_norms(self, x)  # (T, E)
    topk_idx = norms.topk(self.top_k, dim=-1).indices  # (T, K)
    weights = torch.ones(topk_idx.shape, dtype=norms.dtype)  # (T, K)
    scores = norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)  # (T, E)
    return topk_idx, weights, scores


@contextlib.contextmanager
def oracle_routing(model):
    """Within the block, every MoEFFN of ``model`` routes by the oracle."""
    blocks = moe_blocks(model)
    for b in blocks:
        b._route = types.MethodType(_oracle_route, b)
    try:
        yield
    finally:
        for b in blocks:
            del b._route


@torch.no_grad()
def set_router(model, kind: str, saved: list) -> None:
    """Put the calibrated (saved) or the centroid router into every block."""
    for b, (w, bias) in zip(moe_blocks(model), saved):
        if kind == "calibrated":
            b.router.weight.copy_(w)
            b.router.bias.copy_(bias)
        elif kind == "centroid":
            rows = (b.w_gate if b.w_gate is not None else b.w_up).detach()  # (E, F, d)
            E, Fd, d = rows.shape
            groups = [torch.arange(e * Fd, (e + 1) * Fd) for e in range(E)]
            b.router.weight.copy_(centroid_router(rows.reshape(E * Fd, d), groups))
            b.router.bias.zero_()
        else:
            raise ValueError(kind)


class RecallMeter:
    """Mean over blocks of the router's top-k recall of the oracle's experts, in situ, on the
    first ``max_tokens`` evaluation tokens (each costs one dense FFN per block)."""

    def __init__(self, model, max_tokens: int):
        self.hits = 0.0
        self.total = 0
        self.max_tokens = max_tokens
        self.blocks = moe_blocks(model)
        self.seen = 0
        self.handles = [b.register_forward_pre_hook(self._hook) for b in self.blocks]

    @torch.no_grad()
    def _hook(self, block: MoEFFN, args) -> None:
        if self.seen >= self.max_tokens:
            return
        x = args[0].reshape(-1, block.d_model)
        chosen = block._route(x)[0]  # (T, K)
        oracle = expert_norms(block, x).topk(block.top_k, dim=-1).indices  # (T, K)
        self.hits += float((chosen[:, :, None] == oracle[:, None, :]).any(-1).sum())
        self.total += oracle.numel()
        if block is self.blocks[-1]:
            self.seen += x.shape[0]

    def close(self) -> float:
        for h in self.handles:
            h.remove()
        return self.hits / max(self.total, 1)


def evaluate(model, eval_ids, batch, router: str, recall_tokens: int):
    """(perplexity, in-situ recall or None); the oracle's recall is 1 by definition."""
    meter = RecallMeter(model, recall_tokens) if recall_tokens and router != "oracle" else None
    ctx = oracle_routing(model) if router == "oracle" else contextlib.nullcontext()
    try:
        with ctx:
            ppl = perplexity(model, eval_ids, batch)
    finally:
        r = meter.close() if meter is not None else (1.0 if router == "oracle" else None)
    return ppl, r


# ----------------------------------------------------------------------------- conversion


def _legacy_fit(x, contributions, *, ridge=1e-2, top_k=None):
    """The first fit_router: ridge 1e-2 to the log contributions centred over experts."""
    n, d = x.shape
    target = contributions.double().clamp_min(1e-12).log()
    target = target - target.mean(1, keepdim=True)
    xd = x.double()
    mean = xd.mean(0)
    xc = xd - mean
    gram = xc.T @ xc
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype), xc.T @ target)
    return w.T.float().contiguous(), (target.mean(0) - mean @ w).float()


@contextlib.contextmanager
def router_fit(kind: str, top_k: int, ridge: float | None = None):
    """Patch the fit convert() uses: "library" (as is), "topk" (fit_router(..., top_k=k)),
    "legacy" (the first version: ridge 1e-2, centred log target); ``ridge`` overrides the
    library's ridge."""
    if kind == "library" and ridge is None:
        yield
        return
    import rewriter.passes.ffn_to_moe as ftm

    original = ftm.fit_router
    extra = {} if ridge is None else {"ridge": ridge}
    ftm.fit_router = (functools.partial(original, top_k=top_k, **extra) if kind == "topk"
                      else functools.partial(original, **extra) if kind == "library"
                      else _legacy_fit)
    try:
        yield
    finally:
        ftm.fit_router = original


def convert(model, frac: Fraction, grouping: str, shared: str, calib_ids, example, args):
    cfg = MoEConfig(num_experts=frac.num_experts, top_k=frac.top_k,
                    shared_width=frac.shared_width, grouping=grouping,
                    shared_selection=shared, router_init="calibrated", gate="hard",
                    allocation=args.allocation,
                    **({"calibration_samples": args.calib_max_tokens}
                       if args.calib_max_tokens else {}))
    batches = [{"input_ids": calib_ids[i:i + args.calib_batch]}
               for i in range(0, calib_ids.shape[0], args.calib_batch)]
    with router_fit(args.fit, frac.top_k, args.ridge):
        conv = rewriter.convert(model, moe=cfg, example_inputs={"input_ids": example},
                                calibration=batches, progress=False)
    return conv.eval()


def check_centroid_equivalence(model, calib_ids, example, args) -> float:
    """Max |difference| between convert(router_init="centroid")'s router and set_router's."""
    frac = FRACTIONS["44"]
    cfg = MoEConfig(num_experts=frac.num_experts, top_k=frac.top_k,
                    shared_width=frac.shared_width, grouping="kmeans",
                    shared_selection="contiguous", router_init="centroid")
    ref = rewriter.convert(model, moe=cfg, example_inputs={"input_ids": example})
    conv = convert(model, frac, "kmeans", "contiguous", calib_ids, example, args)
    saved = [(b.router.weight.clone(), b.router.bias.clone()) for b in moe_blocks(conv)]
    set_router(conv, "centroid", saved)
    return max(float((a.router.weight - b.router.weight).abs().max().detach())
               for a, b in zip(moe_blocks(ref), moe_blocks(conv)))


# ----------------------------------------------------------------------------- driver


def _fmt_table(rows: list[Row], dense: float) -> str:
    head = (f"| {'active':>6} | {'shape':<24} | {'grouping':<12} | {'shared':<10} | "
            f"{'router':<10} | {'ppl':>8} | {'x dense':>7} | {'x oracle':>8} | {'recall':>6} |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    oracle = {(r.fraction, r.grouping, r.shared_selection): r.ppl
              for r in rows if r.router == "oracle"}
    for r in rows:
        o = oracle.get((r.fraction, r.grouping, r.shared_selection))
        xo = f"{r.ppl / o:.3f}" if o else "-"
        rec = f"{r.recall:.3f}" if r.recall is not None else "-"
        lines.append(
            f"| {100 * r.active:>5.1f}% | {r.shape:<24} | {r.grouping:<12} | "
            f"{r.shared_selection:<10} | {r.router:<10} | {r.ppl:>8.2f} | {r.ppl / dense:>7.3f} "
            f"| {xo:>8} | {rec:>6} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--calib-batch", type=int, default=4, help="sequences per calibration batch")
    ap.add_argument("--calib-max-tokens", type=int, default=None,
                    help="MoEConfig.calibration_samples: calibration tokens kept per FFN "
                         "(default: the library's, 4096)")
    ap.add_argument("--fit", default="library", choices=("library", "topk", "legacy"),
                    help="calibrated router fit: as convert() does it (library), with the "
                         "top-k indicator in the target (topk), or the first version (legacy)")
    ap.add_argument("--ridge", type=float, default=None,
                    help="ridge of the calibrated router fit (default: the library's, 0.3)")
    ap.add_argument("--allocation", default="auto", choices=("auto", "uniform", "calibrated"),
                    help="MoEConfig.allocation: per-block top_k under the same budget "
                         "(auto = calibrated, as convert() does with calibration)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="sequences per evaluation batch")
    ap.add_argument("--fractions", nargs="+", default=["25", "31", "44", "58", "75", "77"],
                    choices=list(FRACTIONS))
    ap.add_argument("--groupings", nargs="+", default=list(GROUPINGS), choices=GROUPINGS,
                    help="groupings of the 44%% grid")
    ap.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=ROUTERS)
    ap.add_argument("--grouping", default=None, choices=GROUPINGS,
                    help="skip the 44%% grid: use this grouping everywhere")
    ap.add_argument("--shared", default=None, choices=("activation", "contiguous"),
                    help="skip the shared-selection comparison: use this one everywhere")
    ap.add_argument("--recall-tokens", type=int, default=4096,
                    help="measure the in-situ recall on the first N eval tokens (0: skip)")
    ap.add_argument("--check-centroid", action="store_true",
                    help="first check that the rebuilt centroid router equals convert()'s "
                         "(two extra conversions)")
    ap.add_argument("--cache", type=Path, default=Path("out/moe_quality_cache"),
                    help="where token ids and dense perplexities are cached ('' to disable)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2048 eval tokens, 4 calibration sequences, 44%% only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.eval_tokens, args.calib_seqs, args.fractions = 2048, 4, ["44"]
    if args.threads:
        torch.set_num_threads(args.threads)

    from rewriter.models.hf import load_smollm2

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok = load_smollm2()
    times["load model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cache = args.cache if str(args.cache) not in ("", ".") else None
    ids_file = cache / "pydoc_topics_ids.pt" if cache else None
    if ids_file is not None and ids_file.is_file():
        ids = torch.load(ids_file)
    else:
        ids = token_ids(tok)
        if ids_file is not None:
            ids_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ids, ids_file)
    try:
        calib_ids, eval_ids = split_ids(ids, args.seq_len, args.calib_seqs, args.eval_tokens)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    times["tokenize"] = time.perf_counter() - t0
    example = calib_ids[:1, :32]
    print(f"torch {torch.__version__}, {platform.machine()}, threads "
          f"{torch.get_num_threads()}; text {ids.numel()} tokens; eval {eval_ids.numel()} "
          f"tokens ({eval_ids.shape[0]} x {args.seq_len}), calibration {calib_ids.numel()} "
          f"tokens ({calib_ids.shape[0]} x {args.seq_len}), reservoir "
          f"{args.calib_max_tokens or 'default'}, router fit {args.fit}, allocation "
          f"{args.allocation}", flush=True)

    t0 = time.perf_counter()
    dense_file = cache / "dense_ppl.json" if cache else None
    key = f"{ids.numel()}:{eval_ids.shape[0]}x{args.seq_len}"
    known = json.loads(dense_file.read_text()) if dense_file and dense_file.is_file() else {}
    if key in known:
        dense = known[key]
        print(f"dense perplexity {dense:.3f} (cached in {dense_file})", flush=True)
    else:
        dense = perplexity(model, eval_ids, args.batch)
        times["dense eval"] = time.perf_counter() - t0
        print(f"dense perplexity {dense:.3f} ({times['dense eval']:.0f} s)", flush=True)
        if dense_file is not None:
            dense_file.write_text(json.dumps({**known, key: dense}, indent=1))

    rows: list[Row] = []
    convert_times: list[float] = []
    eval_times: list[float] = []

    def run(frac_name: str, grouping: str, shared: str) -> list[Row]:
        frac = FRACTIONS[frac_name]
        t = time.perf_counter()
        conv = convert(model, frac, grouping, shared, calib_ids, example, args)
        ct = time.perf_counter() - t
        convert_times.append(ct)
        saved = [(b.router.weight.clone(), b.router.bias.clone()) for b in moe_blocks(conv)]
        fit_recall = [r.get("router_recall") for r in rewriter.conversion_info(conv).blocks]
        out = []
        for router in args.routers:
            if router != "oracle":
                set_router(conv, router, saved)
            t = time.perf_counter()
            ppl, rec = evaluate(conv, eval_ids, args.batch, router, args.recall_tokens)
            et = time.perf_counter() - t
            eval_times.append(et)
            extra = {"top_k_per_block": [b.top_k for b in moe_blocks(conv)]}
            if router == "calibrated" and None not in fit_recall:
                extra["fit_recall_calibration"] = sum(fit_recall) / len(fit_recall)
            row = Row(frac_name, frac.active, frac.describe(), grouping,
                      shared if frac.shared_width else "-", router, ppl, rec, ct, et, extra)
            rows.append(row)
            out.append(row)
            rec_s = f"{rec:.3f}" if rec is not None else "-"
            print(f"  {frac_name}% {frac.describe():<22} {grouping:<12} {row.shared_selection:<10} "
                  f"{router:<10} ppl {ppl:8.2f}  x{ppl / dense:.3f}  recall {rec_s}  "
                  f"(convert {ct:.0f} s, eval {et:.0f} s)", flush=True)
        del conv
        return out

    def best_non_oracle(rs: list[Row]) -> float:
        return min((r.ppl for r in rs if r.router != "oracle"), default=math.inf)

    t_all = time.perf_counter()
    if args.check_centroid:
        t0 = time.perf_counter()
        err = check_centroid_equivalence(model, calib_ids, example, args)
        times["centroid check"] = time.perf_counter() - t0
        print(f"centroid router rebuilt from the block == convert(router_init='centroid'): "
              f"max |diff| {err:.1e}", flush=True)
        if err > 1e-6:
            raise SystemExit("the rebuilt centroid router differs from convert()'s")

    grouping, shared = args.grouping, args.shared
    if grouping is None:
        by_grouping = {g: run("44", g, "activation") for g in args.groupings}
        grouping = min(by_grouping, key=lambda g: best_non_oracle(by_grouping[g]))
    if shared is None:
        act = [r for r in rows if r.fraction == "44" and r.grouping == grouping
               and r.shared_selection == "activation"]
        if not act:
            act = run("44", grouping, "activation")
        contig = run("44", grouping, "contiguous")
        shared = "activation" if best_non_oracle(act) <= best_non_oracle(contig) else "contiguous"
    print(f"best at 44%: grouping {grouping}, shared selection {shared}", flush=True)
    for name in args.fractions:
        done = any(r.fraction == name and r.grouping == grouping
                   and r.shared_selection in (shared, "-") for r in rows)
        if not done:
            run(name, grouping, shared)
    times["all conversions"] = sum(convert_times)
    times["all MoE evals"] = sum(eval_times)
    times["total (after dense)"] = time.perf_counter() - t_all

    rows.sort(key=lambda r: (r.active, r.shape, GROUPINGS.index(r.grouping),
                             r.shared_selection, ROUTERS.index(r.router)))
    print(f"\ndense perplexity {dense:.3f}; {eval_ids.numel()} eval tokens\n")
    print(_fmt_table(rows, dense))
    print("\nwall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f"; per conversion {sum(convert_times) / max(len(convert_times), 1):.0f}, "
          f"per MoE eval {sum(eval_times) / max(len(eval_times), 1):.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "dense_ppl": dense, "eval_tokens": eval_ids.numel(),
            "calibration_tokens": calib_ids.numel(), "calib_max_tokens": args.calib_max_tokens,
            "fit": args.fit, "ridge": args.ridge, "allocation": args.allocation,
            "best": {"grouping": grouping, "shared_selection": shared},
            "rows": [r.__dict__ for r in rows], "times_s": times,
            "argv": sys.argv[1:] if argv is None else argv,
        }, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
