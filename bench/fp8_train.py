"""FP8 training vs fp32 training of a small reference model on real text (same data, same seed).

    python bench/fp8_train.py                  # llama-tiny, 300 steps, byte-level text
    python bench/fp8_train.py --model gpt-small-test --steps 300 --json out/fp8_train.json

Both runs start from the same weights and see the same batches (byte-level pydoc_data.topics,
vocab 256). The FP8 run is ``rewriter.convert(model, fp8=FP8Config(mode="training"))``: every
linear but the head runs Fprop, Dgrad and Wgrad as FP8 GEMMs (1x128 activation / gradient
tiles, 128x128 weight blocks, FP32 accumulation) with fp32 master weights; AdamW on both.
Reports the loss curves (mean over windows of ``--every`` steps), the final loss (mean of the
last ``--every`` steps) of each run and their relative difference, and the held-out loss.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rewriter.models.text import split_ids, token_ids  # noqa: E402

import rewriter  # noqa: E402
from rewriter import models  # noqa: E402


def _batches(train: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, train.numel() - seq - 1, (batch,), generator=g)
        chunk = torch.stack([train[s:s + seq + 1] for s in starts])
        yield chunk[:, :-1], chunk[:, 1:]


def _train(model, train, args) -> list[float]:
    torch.manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    losses = []
    for x, y in _batches(train, args.steps, args.batch, args.seq, args.seed):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _eval(model, held_out: torch.Tensor) -> float:
    model.eval()
    x, y = held_out[:, :-1], held_out[:, 1:]
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    ids = token_ids(None)  # bytes
    head, held = split_ids(ids, args.seq + 1, (ids.numel() - 64 * (args.seq + 1)) //
                           (args.seq + 1), 32 * (args.seq + 1))
    train = head.flatten()
    base = models.build_model(args.model, seed=args.seed)
    runs = {}
    t0 = time.time()
    for name in ("fp32", "fp8"):
        model = copy.deepcopy(base)
        if name == "fp8":
            model = rewriter.convert(model, fp8=rewriter.FP8Config(mode="training"),
                                     example_inputs=models.example_inputs(model, 2, 16))
        start = time.time()
        losses = _train(model, train, args)
        runs[name] = {"losses": losses, "seconds": time.time() - start,
                      "held_out": _eval(model, held)}
        print(f"{name}: final {sum(losses[-args.every:]) / args.every:.4f} "
              f"({runs[name]['seconds']:.0f} s)", flush=True)
    final = {k: sum(v["losses"][-args.every:]) / args.every for k, v in runs.items()}
    rel = final["fp8"] / final["fp32"] - 1
    lines = ["| step | fp32 loss | FP8 loss |", "|---:|---:|---:|"]
    for i in range(0, args.steps, args.every):
        a = runs["fp32"]["losses"][i:i + args.every]
        b = runs["fp8"]["losses"][i:i + args.every]
        lines.append(f"| {i + len(a)} | {sum(a) / len(a):.4f} | {sum(b) / len(b):.4f} |")
    lines += [
        "",
        f"- final training loss (mean of last {args.every} steps): fp32 {final['fp32']:.4f}, "
        f"FP8 {final['fp8']:.4f}: **{100 * rel:+.2f}%** relative",
        f"- held-out loss: fp32 {runs['fp32']['held_out']:.4f}, FP8 {runs['fp8']['held_out']:.4f}",
        f"- time: fp32 {runs['fp32']['seconds']:.0f} s, FP8 (CPU emulation) "
        f"{runs['fp8']['seconds']:.0f} s; total {time.time() - t0:.0f} s",
    ]
    table = "\n".join(lines)
    print(table)
    out = {"args": vars(args), "final": final, "relative": rel, "table": table,
           "held_out": {k: v["held_out"] for k, v in runs.items()}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
