"""Continued training of a converted model on a text corpus.

    data = TextData.from_corpus(tokenizer)             # pydoc_data.topics: train head, eval tail
    config = TrainConfig(steps=200, batch_size=8, seq_len=128, distill=0.5)
    result = train(converted, data, config, teacher=dense_model)
    result.history[-1]                                 # {"step", "loss", "eval_ppl", ...}

One step: next-token cross-entropy (optionally mixed with the KL divergence to a frozen
teacher's logits: distillation from the dense model the student was converted from) plus the
MoE blocks' auxiliary losses, backward, gradient clipping, AdamW, then DeepSeek-V3's
auxiliary-loss-free balancing (``expert_bias += rate * sign(mean_load - load)``) on every
routed block. FP8 needs nothing here: a model converted with ``FP8Config(mode="training")``
runs its three GEMMs in FP8 in forward and backward.

Reproducibility: the batch of step ``s`` is a pure function of (seed, s) and the learning rate
of step ``s`` of the schedule, so a run resumed from a checkpoint (safetensors: the model, the
optimizer state, the RNG state) takes exactly the steps the uninterrupted run would take.

Distributed: wrap the model yourself (``DistributedDataParallel`` or FSDP2's ``fully_shard``)
after ``torch.distributed.init_process_group``; ``batch_size`` is the global batch and every
rank takes its equal slice of each step's batch, so the loss and the update equal
single-process training on the same global batch. Expert loads are all-reduced before the
bias update so every rank keeps the same expert biases; checkpoints are written by rank 0 (DDP;
FSDP2 gathers the full state first).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import distribute_tensor
from tqdm.auto import tqdm

from rewriter import models
from rewriter.models.moe import MoEFFN
from rewriter.models.text import perplexity, token_ids

from .capture import first_float_output
from .errors import InputError

__all__ = [
    "TextData",
    "TrainConfig",
    "TrainResult",
    "train",
    "evaluate",
    "save_checkpoint",
    "load_checkpoint",
    "save_model",
    "load_model",
    "moe_blocks",
    "expert_load",
]

TRAIN_PARTS = ("all", "moe")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train` (validated; errors name the field).

    ``batch_size`` sequences of ``seq_len`` tokens per step (the global batch when distributed).
    Learning rate: linear warm-up over ``warmup_steps``, then cosine to ``lr * min_lr_ratio``.
    ``distill``: weight of the KL term to the teacher's logits (0 = plain cross-entropy, 1 =
    KL only), at ``temperature``. ``moe_first_steps``: train only the MoE blocks (router and
    experts) for this many steps, then everything (``train_part="moe"`` keeps it that way).
    ``bias_update_rate``: DeepSeek-V3's balancing speed (0 turns it off). ``eval_every`` /
    ``checkpoint_every`` in steps (0 = only at the end / never).
    """

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    distill: float = 0.0
    temperature: float = 1.0
    train_part: str = "all"
    moe_first_steps: int = 0
    bias_update_rate: float = 1e-3
    eval_every: int = 0
    eval_batch: int = 8
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        ints = {"steps": 1, "batch_size": 1, "seq_len": 2, "warmup_steps": 0,
                "moe_first_steps": 0, "eval_every": 0, "eval_batch": 1,
                "checkpoint_every": 0, "seed": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"TrainConfig.{name} must be an int >= {low}, got {value!r}")
        floats = {"lr": (0.0, False), "min_lr_ratio": (0.0, True), "weight_decay": (0.0, True),
                  "grad_clip": (0.0, True), "distill": (0.0, True), "temperature": (0.0, False),
                  "bias_update_rate": (0.0, True)}
        for name, (low, inclusive) in floats.items():
            value = getattr(self, name)
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and (value >= low if inclusive else value > low))
            if not ok:
                bound = f">= {low}" if inclusive else f"> {low}"
                raise InputError(f"TrainConfig.{name} must be a finite number {bound}, "
                                 f"got {value!r}")
        if self.distill > 1 or self.min_lr_ratio > 1:
            name = "distill" if self.distill > 1 else "min_lr_ratio"
            raise InputError(f"TrainConfig.{name} must be <= 1, got {getattr(self, name)!r}")
        if self.train_part not in TRAIN_PARTS:
            raise InputError(f"TrainConfig.train_part must be one of {', '.join(TRAIN_PARTS)}, "
                             f"got {self.train_part!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise InputError("TrainConfig.checkpoint_dir is needed when checkpoint_every > 0")

    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) ``step``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TextData:
    """Token ids to train on and held-out ids to evaluate on (disjoint)."""

    train_ids: torch.Tensor  # (n,) int64
    eval_ids: torch.Tensor  # (m, L) int64, whole sequences
    hf: bool = False  # call the model as model(input_ids=...) (Hugging Face) or model(ids)

    def __post_init__(self) -> None:
        if self.train_ids.dim() != 1 or self.train_ids.dtype != torch.long:
            raise InputError(f"TextData.train_ids must be a 1-D int64 tensor, got "
                             f"{tuple(self.train_ids.shape)} {self.train_ids.dtype}")
        if self.eval_ids.dim() != 2 or self.eval_ids.dtype != torch.long:
            raise InputError(f"TextData.eval_ids must be a 2-D int64 tensor (sequences, length),"
                             f" got {tuple(self.eval_ids.shape)} {self.eval_ids.dtype}")

    @classmethod
    def from_corpus(cls, tokenizer: Any = None, *, ids: torch.Tensor | None = None,
                    eval_tokens: int = 16384, eval_len: int = 256, hf: bool = False,
                    vocab_size: int | None = None) -> TextData:
        """Split a corpus (default: ``pydoc_data.topics`` in ``tokenizer``'s ids, or UTF-8
        bytes without one): evaluation sequences from the end, training tokens before them."""

        ids = token_ids(tokenizer) if ids is None else ids
        if vocab_size is not None and int(ids.max()) >= vocab_size:
            raise InputError(f"token id {int(ids.max())} is outside the model's vocabulary "
                             f"(vocab_size={vocab_size}): give the model's own tokenizer")
        n_eval = eval_tokens // eval_len
        if n_eval < 1 or n_eval * eval_len >= ids.numel() // 2:
            raise InputError(f"eval_tokens={eval_tokens} / eval_len={eval_len} leave no "
                             f"training text out of {ids.numel()} tokens")
        cut = ids.numel() - n_eval * eval_len
        return cls(ids[:cut].clone(), ids[cut:].reshape(n_eval, eval_len).clone(), hf=hf)

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
        """(batch_size, seq_len) windows of the training ids; a pure function of its args."""
        if self.train_ids.numel() <= seq_len:
            raise InputError(f"seq_len={seq_len} is longer than the training text "
                             f"({self.train_ids.numel()} tokens)")
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, self.train_ids.numel() - seq_len, (batch_size,), generator=g)
        return torch.stack([self.train_ids[s:s + seq_len] for s in starts.tolist()])


@dataclass
class TrainResult:
    """What :func:`train` did: one record per logged step, the final step, checkpoints."""

    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    checkpoints: list[str] = field(default_factory=list)

    @property
    def evals(self) -> list[dict[str, Any]]:
        return [h for h in self.history if "eval_ppl" in h]


# ---------------------------------------------------------------------------- helpers


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model here


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(fqn, block) of every routed MoE block (:class:`rewriter.models.moe.MoEFFN`) in ``model``."""

    return [(n, m) for n, m in _unwrap(model).named_modules() if isinstance(m, MoEFFN)]


def expert_load(model: nn.Module) -> dict[str, float]:
    """Load balance of the last forward: mean and worst max/mean tokens per expert over the
    MoE blocks (1.0 = perfectly even). Empty when the model has no MoE block."""
    ratios = [b.load_stats()["max_over_mean"] for _, b in moe_blocks(model) if b._has_load]
    if not ratios:
        return {}
    return {"load_max_over_mean": sum(ratios) / len(ratios), "load_worst": max(ratios)}


def _dist() -> tuple[int, int]:

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _logits(model: nn.Module, ids: torch.Tensor, hf: bool) -> torch.Tensor:

    return first_float_output(model(input_ids=ids) if hf else model(ids))


def _loss(logits: torch.Tensor, ids: torch.Tensor, teacher_logits: torch.Tensor | None,
          config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, next-token cross-entropy) for (B, L, V) logits of (B, L) ids."""
    pred = logits[:, :-1].flatten(0, 1).float()  # (B*(L-1), V)
    ce = F.cross_entropy(pred, ids[:, 1:].flatten())
    if teacher_logits is None or config.distill == 0:
        return ce, ce
    t = config.temperature
    target = F.log_softmax(teacher_logits[:, :-1].flatten(0, 1).float() / t, dim=-1)
    kl = F.kl_div(F.log_softmax(pred / t, dim=-1), target, log_target=True,
                  reduction="batchmean") * (t * t)
    return (1 - config.distill) * ce + config.distill * kl, ce


def _aux_loss(model: nn.Module) -> torch.Tensor | None:
    losses = [b.aux_loss for _, b in moe_blocks(model) if getattr(b, "aux_loss", None) is not None]
    return sum(losses) if losses else None


def _drop_grads_outside(model: nn.Module, keep: set[int]) -> None:
    """Forget the gradients of every parameter whose id is not in ``keep``: AdamW and the
    gradient clipping then skip them, as if they were frozen. ``requires_grad`` is never
    flipped: DistributedDataParallel (built before ``train`` is called) expects a gradient
    for every parameter that required one when it was wrapped, and fails with "Expected to
    have finished reduction in the prior iteration" when some stop arriving."""
    for p in model.parameters():
        if p.grad is not None and id(p) not in keep:
            p.grad = None


@torch.no_grad()
def _balance(model: nn.Module, rate: float) -> None:
    """DeepSeek-V3's bias update on every block, with loads summed over ranks."""

    _, world = _dist()
    for _, block in moe_blocks(model):
        if not block._has_load or block.config.top_k == block.config.num_experts:
            continue
        if world > 1:
            dist.all_reduce(block.last_load)
        block.update_bias(rate)


def evaluate(model: nn.Module, data: TextData, batch: int = 8) -> float:
    """Perplexity of ``model`` on ``data.eval_ids`` (every position but the first), in eval
    mode (restored afterwards)."""

    modes = [(m, m.training) for m in model.modules()]  # each module's own, not the root's
    model.eval()
    try:
        return perplexity(model, data.eval_ids, batch=batch, hf=data.hf)
    finally:
        for m, was_training in modes:
            m.training = was_training


# ---------------------------------------------------------------------------- checkpoints


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict (FSDP2 shards gathered), detached, contiguous, on CPU."""
    state = _unwrap(model).state_dict()
    out = {}
    for k, v in state.items():
        if hasattr(v, "full_tensor"):  # DTensor (FSDP2)
            v = v.full_tensor()
        out[k] = v.detach().cpu().contiguous()
    return out


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            key = f"{pid}.{name}"
            if isinstance(value, torch.Tensor):
                if hasattr(value, "full_tensor"):
                    value = value.full_tensor()
                tensors[key] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][key] = value
    return tensors, meta


def _save_state(state: dict[str, torch.Tensor], file: Path,
                metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as one safetensors file, atomically (a temporary file renamed into
    place: a run killed while writing leaves the previous file or none, never half of one).
    Tied weights are stored once; ``metadata["aliases"]`` maps the others to it."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for k, v in state.items():  # tied weights: one copy, the others point at it
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v
    tmp = file.with_name(file.name + ".partial")
    save_file(tensors, str(tmp), metadata={**(metadata or {}), "aliases": json.dumps(aliases)})
    os.replace(tmp, file)
    return file


def save_model(model: nn.Module, file: str | Path, metadata: dict[str, str] | None = None
               ) -> Path:
    """Write ``model``'s full state dict (FSDP2 shards gathered) to the safetensors ``file``
    (atomically; tied weights once). Load it into the same conversion of the same model with
    :func:`load_model`."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    return _save_state(_full_state(model), file, metadata)


def load_model(file: str | Path, model: nn.Module) -> dict[str, str]:
    """Load a :func:`save_model` file into ``model`` (strictly: every key, every shape);
    returns the file's metadata."""
    file = Path(file)
    if not file.exists():
        raise InputError(f"no model file {file}")
    tensors = load_file(str(file))
    with safe_open(str(file), framework="pt") as f:
        meta = dict(f.metadata() or {})
    for k, src in json.loads(meta.get("aliases", "{}")).items():
        tensors[k] = tensors[src]
    _unwrap(model).load_state_dict(tensors, strict=True)
    return meta


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, config: TrainConfig) -> Path:
    """Write ``path/`` = model.safetensors, optimizer.safetensors, trainer.json. ``step`` is
    the number of steps done. Tied weights are stored once (safetensors' shared-tensor rule)."""

    path = Path(path)
    rank, _ = _dist()
    model_state = _full_state(model)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    if rank != 0:
        return path
    path.mkdir(parents=True, exist_ok=True)
    _save_state(model_state, path / "model.safetensors")
    save_file(opt_tensors, str(path / "optimizer.safetensors"))
    (path / "trainer.json").write_text(json.dumps({
        "step": step, "config": asdict(config), "optimizer": opt_meta,
        "rng": torch.get_rng_state().tolist(),
    }, indent=1, default=str))
    return path


def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> int:
    """Load a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``); returns
    the number of steps it had done. Raises InputError naming the missing file or key."""

    path = Path(path)
    for name in ("model.safetensors", "trainer.json"):
        if not (path / name).exists():
            raise InputError(f"checkpoint {path} has no {name}")
    tensors = load_file(str(path / "model.safetensors"))
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for k, src in aliases.items():
        tensors[k] = tensors[src]
    target = _unwrap(model)
    own = target.state_dict()
    missing = [k for k in own if k not in tensors]
    if missing:
        raise InputError(f"checkpoint {path} lacks {len(missing)} tensors of the model, e.g. "
                         f"{missing[0]!r}: was it written for another model or conversion?")
    with torch.no_grad():
        for k, v in own.items():
            src = tensors[k]
            if hasattr(v, "distribute_tensor") or hasattr(v, "full_tensor"):

                src = distribute_tensor(src.to(v.dtype), v.device_mesh, v.placements)
                v.copy_(src)
            else:
                if tuple(src.shape) != tuple(v.shape):
                    raise InputError(f"checkpoint {path}: {k} has shape {tuple(src.shape)}, the"
                                     f" model has {tuple(v.shape)}")
                v.copy_(src)
    meta = json.loads((path / "trainer.json").read_text())
    if optimizer is not None:
        opt = load_file(str(path / "optimizer.safetensors"))
        state: dict[int, dict[str, Any]] = {}
        for key, value in opt.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        for key, value in meta["optimizer"]["scalars"].items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        _load_optimizer(optimizer, state, meta["optimizer"]["param_groups"])
    torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    return int(meta["step"])


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict, groups: list) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, entry in state.items():
        p = params[pid]
        for name, value in list(entry.items()):
            if isinstance(value, torch.Tensor) and hasattr(p, "device_mesh") and \
                    value.shape == p.shape:

                entry[name] = distribute_tensor(value, p.device_mesh, p.placements)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------- the loop


def _progress(enabled: bool | None, total: int, initial: int):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled or _dist()[0] != 0:
        return None

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def train(model: nn.Module, data: TextData, config: TrainConfig | None = None, *,
          teacher: nn.Module | None = None, resume: str | Path | None = None,
          optimizer: torch.optim.Optimizer | None = None, progress: bool | None = None,
          log: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``config.steps`` steps (see the module doc).

    ``teacher``: a frozen model whose logits the student is distilled towards
    (``config.distill > 0``). ``resume``: a checkpoint directory to continue from (the
    remaining steps run; the result equals the uninterrupted run). ``log(record)`` is called
    with every step's record (step, loss, ce, lr, tokens_per_s, expert load; eval_ppl on
    evaluation steps). ``progress``: a bar with loss and tokens/s (default: when stderr is a
    terminal).
    """
    config = config or TrainConfig()
    if not isinstance(config, TrainConfig):
        raise InputError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(data, TextData):
        raise InputError(f"data must be a TextData, got {type(data).__name__}")
    if config.distill > 0 and teacher is None:
        raise InputError("TrainConfig.distill > 0 needs teacher= (e.g. the dense model the "
                         "student was converted from)")
    rank, world = _dist()
    if config.batch_size % world:
        raise InputError(f"TrainConfig.batch_size={config.batch_size} must be divisible by the "
                         f"{world} processes")
    if (config.train_part == "moe" or config.moe_first_steps) and not moe_blocks(model):
        raise InputError("TrainConfig.train_part='moe' / moe_first_steps need a model with MoE "
                         "blocks (convert it with moe=... first)")

    longest = models.max_seq_len(_unwrap(model))
    if longest is not None and config.seq_len > longest:
        raise InputError(f"TrainConfig.seq_len={config.seq_len} is longer than the model's "
                         f"maximum sequence length {longest}")
    vocab = getattr(getattr(_unwrap(model), "config", None), "vocab_size", None)
    if vocab is not None and int(data.train_ids.max()) >= int(vocab):
        raise InputError(f"TextData.train_ids has id {int(data.train_ids.max())} >= the model's "
                         f"vocab_size {vocab}: tokenize with the model's tokenizer")

    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=config.lr, weight_decay=config.weight_decay)
    start = load_checkpoint(resume, model, optimizer) if resume is not None else 0
    result = TrainResult(step=start)
    per_rank = config.batch_size // world
    moe_params = {id(p) for _, b in moe_blocks(model) for p in b.parameters()}
    # the teacher is the user's model: put it in eval mode for the run, module by module
    # as it was afterwards (a student given in eval mode trains in train mode, likewise)
    modes = [(m, m.training) for net in (model, teacher) if net is not None
             for m in net.modules()]
    if teacher is not None:
        teacher.eval()
    model.train()
    bar = _progress(progress, config.steps, start)
    try:
        for step in range(start, config.steps):
            moe_only = config.train_part == "moe" or step < config.moe_first_steps
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            ids = data.batch(step, config.batch_size, config.seq_len, config.seed)
            ids = ids[rank * per_rank:(rank + 1) * per_rank]  # this rank's slice
            teacher_logits = None
            if teacher is not None and config.distill > 0:
                with torch.no_grad():
                    teacher_logits = _logits(teacher, ids, data.hf)
            logits = _logits(model, ids, data.hf)
            loss, ce = _loss(logits, ids, teacher_logits, config)
            aux = _aux_loss(model)
            if aux is not None:
                loss = loss + aux
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if moe_only:  # only the MoE blocks learn (router and experts)
                _drop_grads_outside(model, moe_params)
            grad_norm = None
            if config.grad_clip > 0:
                params = [p for p in model.parameters() if p.grad is not None]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
            optimizer.step()
            load = expert_load(model)
            if config.bias_update_rate > 0:
                _balance(model, config.bias_update_rate)
            record = {"step": step + 1, "loss": _mean_over_ranks(loss),
                      "ce": _mean_over_ranks(ce), "lr": lr,
                      "tokens_per_s": config.batch_size * config.seq_len
                      / (time.perf_counter() - t0), **load}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            done = step + 1
            if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
                record["eval_ppl"] = evaluate(model, data, config.eval_batch)
            if config.checkpoint_every and (done % config.checkpoint_every == 0
                                            or done == config.steps):
                where = save_checkpoint(Path(config.checkpoint_dir) / f"step_{done:06d}",
                                        model, optimizer, done, config)
                result.checkpoints.append(str(where))
            result.history.append(record)
            result.step = done
            if log is not None:
                log(record)
            if bar is not None:
                bar.update(1)
                post = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
                if "eval_ppl" in record:
                    post["ppl"] = f"{record['eval_ppl']:.2f}"
                bar.set_postfix(post)
    finally:
        if bar is not None:
            bar.close()
        for m, was_training in modes:
            m.training = was_training
    return result


def _mean_over_ranks(value: torch.Tensor) -> float:

    value = value.detach().float().clone()
    _, world = _dist()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return float(value)
