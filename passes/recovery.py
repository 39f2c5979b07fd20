"""Recovery after an MoE conversion: every MoE block distilled from the dense model it was
cut from, block by block and then through the logits (``logit_steps``, default 80).

    report = recover(moe_model, batches, RecoveryConfig(logit_steps=40), teacher=dense)
    report.before, report.after   # mean relative error of the blocks vs the dense FFNs
    report.logit_kl               # held-out KL(dense || model) before / after the logit phase

The dense FFN a block was cut from is still inside the block at conversion time: its routed
experts partition the dense FFN's neurons, so the dense output is *every* expert at weight 1
plus the shared expert and the output bias (:func:`dense_output`). :func:`recover` freezes a
copy of each block as that teacher, then streams the batches through the converted model
(CMoE's and LLaMA-MoE's "expert tuning", done layer-locally as in BRECQ / block-wise
reconstruction): each block sees its own input x (the converted model's hidden states: the
distribution it meets at inference), and its router, routed and shared experts are trained to
minimise ``||block(x) - dense(x)||^2 / ||dense(x)||^2`` with AdamW. Padded positions
(``attention_mask`` 0) are not calibration data: every loss, held-out error and token count
is taken over the real positions only, and a block's input is zeroed at padded positions
(what they hold cannot reach a trained block). The input of every block is detached and its
output is handed on detached, so no gradient flows through attention, the embeddings or the
head: one step costs one forward of the model plus a backward through the
blocks alone (CPU-feasible: SmolLM2-135M, hundreds of sequences in minutes).

The logit phase (``logit_steps`` > 0) then trains the same parameters end to end on
KL(dense || model) of the next-token distributions (knowledge distillation from the dense
model, as CMoE's and LLaMA-MoE's recovery fine-tunes): errors the blocks leave that matter to
the output are what it fixes. A model whose output is not language-model logits over its
input ids (an encoder's hidden states) is distilled on the relative squared error of that
output over the real positions instead (``attention_mask`` 1); ``logit_kl`` then reports it.
It back-propagates through the whole model (attention and head
frozen), so a step costs several block-phase steps.

Hard gates pass the router a straight-through gradient; sigmoid/softmax gates a true one.
The expert biases (DeepSeek-V3's balancing state) are not changed here.
"""

from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from rewriter.models.moe import MoEFFN
from torch import nn
from torch.fx import GraphModule
from tqdm.auto import tqdm

from rewriter.capture import (
    first_float_output,
    is_token_logits,
    normalize_inputs,
    real_positions,
    sequence_rows,
    token_ids,
)
from rewriter.errors import InputError

__all__ = ["RECOVERY_PARTS", "RecoveryConfig", "RecoveryReport", "dense_output", "recover"]

RECOVERY_PARTS = ("router", "experts", "all")
FEW_SEQUENCES = 64  # fewer training sequences than this: a warning (the step over-fits them)


@dataclass(frozen=True)
class RecoveryConfig:
    """How :func:`recover` trains the MoE blocks (validated; errors name the field).

    ``sequences``: at most this many calibration sequences are used (the first ones with a
    real position; the issue-16 budget is 2,000). ``epochs`` passes over them, ``batch_size``
    sequences per step.
    ``lr``: AdamW's peak learning rate (linear warm-up over the first 5% of the steps, cosine
    to 10% of it). ``train``: "router" (routers only), "experts" (routed + shared experts, the
    routers kept), "all" (both). ``holdout``: fraction of the sequences kept out of training to
    report the before/after error on (at least one sequence when > 0). ``logit_steps``:
    steps of the logit phase (0: off; it needs the dense model as ``teacher``), each on
    ``batch_size`` training sequences at learning rate ``logit_lr`` (same schedule, gradients
    clipped to norm 1).

    Defaults measured on SmolLM2-135M at 50% active (perplexity x dense on licence texts /
    release notes, never on the calibration text; BENCHMARKS.md, "Recovery after
    conversion"): block-phase lr
    on 144 training sequences 1e-4 3.22x -> 2.72x / 2.31x -> 2.12x; 3e-4 2.64x / 1.99x; 1e-3
    2.28x / 1.89x; 3e-3 2.25x / 1.88x. On 720 sequences (lr 1e-3) 2.07x / 1.78x; then 40
    logit steps at 1e-4 1.83x / 1.65x (2,048 tokens per domain). ``logit_steps=80`` with 720
    sequences: 22.75 min on two cores.
    """

    sequences: int = 2000
    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    train: str = "all"
    holdout: float = 0.1
    logit_steps: int = 80
    logit_lr: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("sequences", 1), ("epochs", 1), ("batch_size", 1), ("seed", 0),
                          ("logit_steps", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"RecoveryConfig.{name} must be an int >= {low}, got {value!r}")
        for name, low, high in (("lr", 0.0, math.inf), ("logit_lr", 0.0, math.inf),
                                ("weight_decay", 0.0, math.inf), ("holdout", 0.0, 0.5)):
            value = getattr(self, name)
            positive = name in ("lr", "logit_lr")
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and low <= value <= high
                  and not (positive and value == 0))
            if not ok:
                raise InputError(f"RecoveryConfig.{name} must be a number in "
                                 f"{'(0' if positive else f'[{low}'}, {high}], got {value!r}")
        if self.train not in RECOVERY_PARTS:
            raise InputError(f"RecoveryConfig.train must be one of {', '.join(RECOVERY_PARTS)}, "
                             f"got {self.train!r}")


@dataclass
class RecoveryReport:
    """What :func:`recover` did.

    ``before`` / ``after``: mean over blocks of the relative squared error
    ``||block(x) - dense(x)||^2 / ||dense(x)||^2`` on the held-out sequences (``None`` without
    a holdout); ``per_block``: (name, before, after) per block; ``steps``, ``sequences``
    (trained on), ``tokens`` (of the block phase: its real positions, ``attention_mask`` != 0,
    over all epochs), ``seconds`` (``block_seconds`` of them in
    the block phase); ``history``: (step, mean train loss) every few steps; ``restored``:
    blocks whose held-out error training did not lower, put back as they were (then ``after``
    is measured again); ``logit_kl``: held-out KL(dense || model) per token before / after
    the logit phase, ``logit_kept``: whether it was kept (None: no logit phase)."""

    config: RecoveryConfig
    blocks: int
    sequences: int
    tokens: int
    steps: int
    seconds: float
    before: float | None
    after: float | None
    per_block: list[tuple[str, float, float]] = field(default_factory=list)
    history: list[tuple[int, float]] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    logit_kl: tuple[float | None, float | None] | None = None
    logit_kept: bool | None = None
    block_seconds: float = 0.0  # of ``seconds``: the block phase (the rest: the logit phase)

    def to_dict(self) -> dict[str, Any]:
        return {"config": dict(vars(self.config)), "blocks": self.blocks,
                "sequences": self.sequences, "tokens": self.tokens, "steps": self.steps,
                "seconds": round(self.seconds, 1), "block_seconds": round(self.block_seconds, 1),
                "before": self.before, "after": self.after,
                "per_block": [list(r) for r in self.per_block],
                "history": [list(h) for h in self.history], "restored": self.restored,
                "logit_kl": list(self.logit_kl) if self.logit_kl else None,
                "logit_kept": self.logit_kept}


def dense_output(block: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN ``block`` partitions, on x (..., d) -> (..., d): every routed expert at
    weight 1, plus the shared expert and the output bias (exactly the FFN the block was cut
    from, while its weights are the conversion's)."""
    shape = x.shape
    xt = x.reshape(-1, block.d_model).to(block.compute_dtype)  # (T, d)
    h = block.expert_hidden(xt)  # (T, E, F)
    out = torch.einsum("tef,edf->td", h, block.w_down)  # (T, d)
    if block.shared is not None:
        out = out + block.shared(xt)
    if block.b_out is not None:
        out = out + block.b_out
    return out.to(x.dtype).reshape(shape)


def _blocks(model: nn.Module) -> list[tuple[str, MoEFFN]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEFFN)]


def _trained(block: MoEFFN, part: str) -> list[nn.Parameter]:
    router = list(block.router.parameters())
    experts = [p for n, p in block.named_parameters() if not n.startswith("router.")]
    return {"router": router, "experts": experts, "all": router + experts}[part]


# A batch as normalize_inputs gives it: (positional inputs, keyword inputs), tensors or
# scalars; the sequences are the rows of its tensors.
_Batch = tuple[tuple[Any, ...], dict[str, Any]]


def _call(model: nn.Module, batch: _Batch) -> Any:
    args, kwargs = batch
    return model(*args, **kwargs)


def _stack(items: list[_Batch]) -> _Batch:
    """Batches of the same structure -> one (tensors concatenated, other inputs the first's)."""
    args, kwargs = items[0]

    def cat(values: list[Any]) -> Any:
        return torch.cat(values) if isinstance(values[0], torch.Tensor) else values[0]

    return (tuple(cat([it[0][j] for it in items]) for j in range(len(args))),
            {k: cat([it[1][k] for it in items]) for k in kwargs})


def _real(batch: _Batch, y: torch.Tensor) -> torch.Tensor | None:
    """The batch's real positions (``attention_mask`` != 0) as a bool mask broadcastable to
    ``y`` (B, T, ...); None without a mask of y's first two dims (every position counts).
    Padded positions are not calibration data: every loss, held-out error and token count
    here reads the mask through this."""
    return real_positions(batch[1].get("attention_mask"), y)


def _tokens(batch: _Batch) -> int:
    """Tokens of calibration data in ``batch``: the real positions of its first tensor
    (all of its elements without a mask)."""
    args, kwargs = batch
    first = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
    real = _real(batch, first)
    return first.numel() if real is None else int(real.sum())


def _rel(y: torch.Tensor, t: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """``||y - t||^2 / ||t||^2`` summed over the positions ``real`` marks (a bool mask
    broadcastable to y; None: all). What padded positions hold never enters the value or its
    gradient (selected out, not multiplied by 0: a non-finite padded value stays out too)."""
    if real is None:
        return (y - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)
    zero = y.new_zeros(())
    return (torch.where(real, y - t, zero).pow(2).sum()
            / torch.where(real, t, zero).pow(2).sum().clamp_min(1e-30))


class _Taps:
    """Hooks on every block, for the batch :meth:`run` is running. A block's input has its
    padded positions (``attention_mask`` == 0) set to 0: what a padded position holds never
    reaches a trained block, not even through the order of its sums. With ``teachers`` (the
    block phase) the input is also detached, and the hooks record the teacher's output, the
    relative error over the real positions (with the graph when training) and hand the
    output on detached; without (the logit phase) they only zero the padding."""

    def __init__(self, blocks: list[tuple[str, MoEFFN]], teachers: list[MoEFFN] | None = None):
        self.losses: list[tuple[int, torch.Tensor]] = []  # (block index, loss) per call
        self.handles = []
        self.batch: _Batch | None = None  # the batch being run (its attention_mask)
        self.warned: set[str] = set()
        self.detach = teachers is not None
        for index, (name, block) in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(name)))
            if teachers is not None:
                self.handles.append(block.register_forward_hook(
                    self._make(index, name, teachers[index])))

    def run(self, model: nn.Module, batch: _Batch) -> Any:
        """``model``'s output on ``batch``; the blocks see and count its real positions only."""
        self.batch = batch
        try:
            return _call(model, batch)
        finally:
            self.batch = None

    def real(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """The running batch's real positions as a bool mask broadcastable to a block's input
        or output ``x``: (B, T, ..., d), or (B*T, d) for a block fed the tokens flattened;
        None without a mask (every position counts)."""
        mask = None if self.batch is None else self.batch[1].get("attention_mask")
        if not isinstance(mask, torch.Tensor):
            return None
        real = _real(self.batch, x)
        if real is None and mask.dim() == 2 and x.dim() >= 2 and x.shape[0] == mask.numel():
            real = _real(self.batch, x.reshape(*mask.shape, *x.shape[1:]))  # (B, T, 1...)
            real = real.reshape(x.shape[0], *real.shape[2:])  # (B*T, 1...)
        if real is None and name not in self.warned:
            self.warned.add(name)
            warnings.warn(f"recover: block {name} sees inputs of shape {tuple(x.shape)}, which "
                          f"attention_mask of shape {tuple(mask.shape)} does not index: its "
                          f"error counts every position, padded ones too", stacklevel=2)
        return real

    def _pre(self, name: str):
        def hook(_module, args):
            if self.detach:
                args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            x = args[0] if args else None
            real = self.real(x, name) if isinstance(x, torch.Tensor) else None
            if real is None:
                return args
            return (torch.where(real, x, x.new_zeros(())), *args[1:])
        return hook

    def _make(self, index: int, name: str, teacher: MoEFFN):
        def hook(_module, args, out):
            real = self.real(out, name)
            if real is not None and not bool(real.any()):
                return out.detach()  # no real position: nothing to learn or measure here
            with torch.no_grad():
                target = dense_output(teacher, args[0])
            self.losses.append((index, _rel(out.float(), target.float(), real)))
            return out.detach()
        return hook

    def take(self) -> list[tuple[int, torch.Tensor]]:
        """(block index, loss) of every block call since the last take (a block the forward
        calls several times, a looped FFN, has one per call)."""
        losses, self.losses = self.losses, []
        return losses

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _measure(model: nn.Module, taps: _Taps, batches: Sequence[Any], n: int) -> list[float]:
    """Mean relative error per block over ``batches`` and calls (no gradient; each over the
    batch's real positions, a call with none not counted)."""
    sums, counts = [0.0] * n, [0] * n
    with torch.no_grad():
        for batch in batches:
            taps.run(model, batch)
            for i, loss in taps.take():
                sums[i] += float(loss)
                counts[i] += 1
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def recover(
    model: nn.Module,
    batches: Iterable[Any],
    config: RecoveryConfig | None = None,
    *,
    teacher: nn.Module | None = None,
    progress: bool | None = None,
) -> RecoveryReport:
    """Train ``model``'s MoE blocks, in place, to reproduce the dense model they were cut from
    (module doc). ``batches``: model inputs (tensors of token ids, dicts, tuples) of the
    calibration text, re-cut into ``config.batch_size`` sequences; the first
    ``config.sequences`` are used, ``config.holdout`` of them only to measure. ``teacher``:
    the dense model (needed when ``config.logit_steps > 0``; called on the same inputs, never
    changed). ``progress``: a progress bar with the running loss (default: on a terminal).
    Returns a :class:`RecoveryReport`.

    A block whose held-out error the block phase did not lower is restored to its state
    before (``RecoveryReport.restored``); the logit phase is undone when it did not lower the
    held-out KL divergence. Recovery never leaves the model worse on the held-out sequences
    by the measure each phase trains.

    Raises InputError, before anything changes, when ``model`` has no MoE block, there are no
    batches, a batch is not a tensor / tuple / dict of tensors (naming it), or the logit phase
    has no teacher. The model's other parameters, its buffers and its train/eval mode
    are left as they were."""
    config = config or RecoveryConfig()
    blocks = _blocks(model)
    if not blocks:
        raise InputError("recover: the model has no MoE block (convert it with moe= first)")
    if config.logit_steps and teacher is None:
        raise InputError("recover: RecoveryConfig.logit_steps > 0 distils the model's logits "
                         "from the dense model: give teacher=dense_model (or logit_steps=0 "
                         "for the block phase alone)")
    seqs = []
    for i, batch in enumerate(batches):
        try:
            seqs += sequence_rows(*normalize_inputs(batch))
        except InputError as exc:
            raise InputError(f"recover: calibration batch {i}: {exc}") from exc
    # a row whose attention_mask has no real position is no calibration sequence
    seqs = [s for s in seqs if _tokens(s) or not isinstance(s[1].get("attention_mask"),
                                                            torch.Tensor)][: config.sequences]
    if not seqs:
        raise InputError("recover: no calibration batches")
    held = max(1, round(len(seqs) * config.holdout)) if config.holdout > 0 and len(seqs) > 1 \
        else 0
    train_seqs, held_seqs = seqs[: len(seqs) - held], seqs[len(seqs) - held:]
    if len(train_seqs) < FEW_SEQUENCES:
        warnings.warn(f"recover: training on {len(train_seqs)} sequences only (BENCHMARKS.md's "
                      f"figures used 720); give it more calibration sequences, up to "
                      f"RecoveryConfig.sequences (now {config.sequences})", stacklevel=2)
    train_batches = [_stack(train_seqs[i:i + config.batch_size])
                     for i in range(0, len(train_seqs), config.batch_size)]
    held_batches = [_stack(held_seqs[i:i + config.batch_size])
                    for i in range(0, len(held_seqs), config.batch_size)]

    teachers = [copy.deepcopy(b).requires_grad_(False).eval() for _, b in blocks]
    params = [p for _, b in blocks for p in _trained(b, config.train)]
    ids = {id(p) for p in params}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    modes = [(m, m.training) for m in model.modules()]  # restored module by module
    t0 = time.perf_counter()
    steps = len(train_batches) * config.epochs
    report = RecoveryReport(config=config, blocks=len(blocks), sequences=len(train_seqs),
                            tokens=sum(_tokens(b) for b in train_batches) * config.epochs,
                            steps=steps, seconds=0.0, before=None, after=None)
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        if not isinstance(model, GraphModule):  # an exported graph has no train/eval switch
            model.eval()  # dropout off; the blocks' forward is the same in both modes
        bar = _bar(steps + config.logit_steps, progress)
        _block_phase(model, blocks, teachers, params, train_batches, held_batches, config,
                     report, bar)
        report.block_seconds = time.perf_counter() - t0
        if config.logit_steps:
            _logit_phase(model, teacher, blocks, params, train_batches, held_batches, config,
                         report, bar)
        if bar is not None:
            bar.close()
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        for m, was_training in modes:
            m.training = was_training
    report.seconds = time.perf_counter() - t0
    return report


def _schedule(opt: torch.optim.Optimizer, lr: float, step: int, steps: int) -> None:
    """Linear warm-up over the first 5% of the steps, then cosine to 10% of ``lr``."""
    warm = max(1, steps // 20)
    t = (step - warm) / max(1, steps - warm)
    now = lr * (step + 1) / warm if step < warm else \
        lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    for group in opt.param_groups:
        group["lr"] = now


def _tick(bar, loss: float) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")


def _block_phase(model, blocks, teachers, params, train_batches, held_batches, config,
                 report, bar) -> None:
    """Every block towards its dense FFN on its own (detached) inputs; blocks the held-out
    error says got worse are put back."""
    taps = _Taps(blocks, teachers)
    try:
        before = _measure(model, taps, held_batches, len(blocks)) if held_batches else None
        generator = torch.Generator().manual_seed(config.seed)
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        step, running = 0, 0.0
        for _ in range(config.epochs):
            for i in torch.randperm(len(train_batches), generator=generator).tolist():
                _schedule(opt, config.lr, step, report.steps)
                with torch.enable_grad():
                    taps.run(model, train_batches[i])
                    losses = [v for _, v in taps.take()]
                    loss = torch.stack(losses).sum() if losses else torch.zeros(())
                if losses:  # none: no block saw a real position, no data to step on
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                step += 1
                running += loss.item() / len(blocks)
                if step % 10 == 0 or step == report.steps:
                    report.history.append((step, running / (10 if step % 10 == 0
                                                            else step % 10)))
                    running = 0.0
                _tick(bar, loss.item() / len(blocks))
        if before is None:
            return
        after = _measure(model, taps, held_batches, len(blocks))
        restored = [i for i, (b, a) in enumerate(zip(before, after)) if a >= b]
        for i in restored:  # training made this block worse on held-out text: undo it
            blocks[i][1].load_state_dict(teachers[i].state_dict())
        if restored:
            after = _measure(model, taps, held_batches, len(blocks))
        report.before, report.after = sum(before) / len(before), sum(after) / len(after)
        report.per_block = [(n, b, a) for (n, _), b, a in zip(blocks, before, after)]
        report.restored = [blocks[i][0] for i in restored]
    finally:
        taps.remove()


def _kl(model: nn.Module, teacher: nn.Module, batch: _Batch,
        taps: _Taps | None = None) -> torch.Tensor:
    """The output phase's loss on one batch: mean over the real positions (``attention_mask``
    != 0; all without a mask) of KL(teacher || model) of the next-token distributions when
    the output is language-model logits (B, T, V) over the batch's token ids; otherwise (an
    encoder's hidden states, any other float output) the relative squared error
    ||y - y_teacher||^2 / ||y_teacher||^2 over the real positions. ``taps``: the model runs
    through them (its blocks then never see what padded positions hold)."""
    args, kwargs = batch
    with torch.no_grad():
        target = first_float_output(_call(teacher, batch)).float()
    y = first_float_output(taps.run(model, batch) if taps else _call(model, batch)).float()
    real = _real(batch, y)  # (B, T, 1...) or None
    if is_token_logits(y, token_ids(args, kwargs)):
        vocab = y.shape[-1]
        if real is None:
            y, target = y.reshape(-1, vocab), target.reshape(-1, vocab)
        else:  # the real positions' rows (N, V); an empty batch: 0
            keep = real.reshape(real.shape[:2])  # (B, T)
            y, target = y[keep], target[keep]
            if not y.shape[0]:
                return y.sum()
        return F.kl_div(F.log_softmax(y, -1), F.log_softmax(target, -1),
                        log_target=True, reduction="batchmean")
    return _rel(y, target, real)


def _logit_phase(model, teacher, blocks, params, train_batches, held_batches, config,
                 report, bar) -> None:
    """The MoE blocks trained end to end on KL(dense || model) of the logits; undone when the
    held-out KL did not go down."""
    saved = [copy.deepcopy(b.state_dict()) for _, b in blocks]
    teacher_modes = [(m, m.training) for m in teacher.modules()]
    if not isinstance(teacher, GraphModule):
        teacher.eval()  # dropout off: the dense model's own distribution
    taps = _Taps(blocks)  # padded positions zeroed at every block's input
    try:
        _logit_steps(model, teacher, blocks, params, train_batches, held_batches, config,
                     report, bar, saved, taps)
    finally:
        taps.remove()
        for m, was_training in teacher_modes:
            m.training = was_training


def _logit_steps(model, teacher, blocks, params, train_batches, held_batches, config, report,
                 bar, saved, taps) -> None:
    """The logit phase's loop, the held-out KL before and after, and the undo (``saved``: the
    blocks' states before the phase)."""
    def held_kl() -> float | None:
        if not held_batches:
            return None
        with torch.no_grad():
            return sum(float(_kl(model, teacher, b, taps)) for b in held_batches) \
                / len(held_batches)

    before = held_kl()
    opt = torch.optim.AdamW(params, lr=config.logit_lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed + 1)
    order: list[int] = []
    for step in range(config.logit_steps):
        if not order:
            order = torch.randperm(len(train_batches), generator=generator).tolist()
        _schedule(opt, config.logit_lr, step, config.logit_steps)
        with torch.enable_grad():
            loss = _kl(model, teacher, train_batches[order.pop()], taps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _tick(bar, loss.item())
    after = held_kl()
    kept = before is None or after < before
    if not kept:  # the logit phase made the held-out KL worse: undo it
        for (_, block), state in zip(blocks, saved):
            block.load_state_dict(state)
    report.logit_kl = (before, after if kept else before)
    report.logit_kept = kept


def _bar(steps: int, show: bool | None):
    if show is None:
        show = sys.stderr.isatty()
    return tqdm(total=steps, desc="recovering", unit="step") if show else None
