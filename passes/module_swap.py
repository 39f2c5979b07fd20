"""Module mode: put rewritten blocks into (a copy of) the user's model.

For each FFN match, find modules whose forward computes exactly the block, using the captured
graph's ``nn_module_stack``:

* **whole**: one module computes exactly the FFN (HF ``LlamaMLP``, GPT-2 ``GPT2MLP``):
  replace it by the new block.
* **split**: the up part (projections + activation) is one module whose output is the hidden
  activation and the down projection is a leaf module reading only it (HF BERT's
  ``intermediate`` / ``output.dense``): the up module becomes the new block and the down
  projection an ``nn.Identity``.

Anything else cannot be swapped without changing the model's code: :class:`InputError` names
the FFN and suggests graph mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from rewriter.errors import InputError
from rewriter.graph_ops import common_module, module_stack, owning_module
from rewriter.patterns import FFNMatch

from .cleanup import is_identity_op

__all__ = ["ModuleSwap", "plan_module_swap", "apply_module_swaps"]


@dataclass(frozen=True)
class ModuleSwap:
    block: str  # module FQN that becomes the new block
    identity: str | None  # module FQN that becomes nn.Identity (split form), else None


def _compute_nodes(nodes) -> set[Node]:
    """Tensor-computing nodes, without parameter reads, size queries and identity ops."""
    out = set()
    for n in nodes:
        if n.op in ("get_attr", "placeholder", "output") or is_identity_op(n):
            continue
        val = n.meta.get("val")
        if val is not None and not isinstance(val, torch.Tensor):
            continue
        out.add(n)
    return out


def _nodes_in(gm: GraphModule, module: str) -> set[Node]:
    return _compute_nodes(n for n in gm.graph.nodes if module in module_stack(n))


def plan_module_swap(gm: GraphModule, match: FFNMatch) -> ModuleSwap:
    block_nodes = _compute_nodes(match.nodes)
    owner = match.module
    if owner and _nodes_in(gm, owner) == block_nodes:
        return ModuleSwap(owner, None)
    down = match.projections["down"]
    down_nodes = _compute_nodes(down.nodes)
    up_nodes = block_nodes - down_nodes
    up_owner = common_module(sorted({owning_module(n) for n in up_nodes}))
    down_module = down.module
    if (
        up_owner
        and _nodes_in(gm, up_owner) == up_nodes
        and _nodes_in(gm, down_module) == down_nodes
        and not down_module.startswith(up_owner + ".")
    ):
        return ModuleSwap(up_owner, down_module)
    raise InputError(
        f"FFN {match.module or '<root>'}: no module computes exactly this block (its ops are "
        "mixed with others in the module's forward), so it cannot be swapped into the model; "
        "use mode='graph'"
    )


def _set(model: nn.Module, fqn: str, module: nn.Module) -> None:
    try:
        model.set_submodule(fqn, module, strict=True)
    except AttributeError as e:
        raise InputError(f"module {fqn!r} does not exist in the model") from e


def apply_module_swaps(
    model: nn.Module, swaps: Sequence[ModuleSwap], blocks: Sequence[nn.Module]
) -> nn.Module:
    for swap, block in zip(swaps, blocks):
        _set(model, swap.block, block)
        if swap.identity is not None:
            _set(model, swap.identity, nn.Identity())
    return model
