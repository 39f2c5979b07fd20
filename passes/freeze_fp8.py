"""Freeze a trained FP8 model for deployment: training-mode FP8 modules -> inference mode.

    n = freeze_fp8(model)   # in place; returns the number of modules frozen

A model converted with ``FP8Config(mode="training")`` keeps fp32/bf16 master weights and
quantizes them on every call; after training, store them FP8 once (1 byte per weight plus
128x128 block scales) so that inference and the ONNX file carry FP8 initializers. The forward
is unchanged up to fp32 summation order (~1e-7 relative): training mode quantizes the same
weights with the same 128x128 blocks on the fly.
"""

from __future__ import annotations

from rewriter.targets.fp8_linear import FP8Linear, FP8MoEFFN
from torch import nn

from .lower_fp8 import check_finite_weights

__all__ = ["freeze_fp8"]


def freeze_fp8(model: nn.Module) -> int:
    """Swap every training-mode :class:`FP8Linear` / :class:`FP8MoEFFN` of ``model`` (in
    place) for its inference-mode form. Returns how many were swapped. An
    :class:`~rewriter.errors.InputError` naming a master weight with NaN or Inf values is raised
    before anything is swapped."""
    todo = [(name, m) for name, m in model.named_modules()
            if isinstance(m, (FP8Linear, FP8MoEFFN)) and m.mode == "training"]
    if any(name == "" for name, _ in todo):
        raise ValueError("freeze_fp8 swaps submodules: the model itself is an FP8 module")
    check_finite_weights(  # before any swap: a diverged master weight would freeze to NaN blocks
        ((f"{name}.{w}", getattr(m, w)) for name, m in todo
         for w in (("w_up", "w_gate", "w_down") if isinstance(m, FP8MoEFFN) else ("weight",))
         if getattr(m, w, None) is not None),
        "freeze_fp8", "e.g. resume from an earlier checkpoint")
    for name, module in todo:
        if isinstance(module, FP8MoEFFN):
            new = FP8MoEFFN(module, mode="inference", activations="fp8", pow2=module.pow2)
        else:
            new = FP8Linear(module.weight, module.bias, mode="inference", activations="fp8",
                            pow2=module.pow2)
        new.train(module.training)
        model.set_submodule(name, new)
    return len(todo)
