import pytest
import torch
import torch.nn.functional as F
from rewriter.passes.module_swap import plan_module_swap
from torch import nn

from rewriter import InputError, capture, find_ffns
from tests._zoo import CASES

BY_NAME = {c.name: c for c in CASES}


@pytest.mark.parametrize("name, block, identity", [
    ("hf:llama", "model.layers.0.mlp", None),
    ("hf:gpt2", "transformer.h.0.mlp", None),  # the mlp's eval dropout is an identity
    ("hf:bert", "encoder.layer.0.intermediate", "encoder.layer.0.output.dense"),
    ("llama-tiny", "layers.0.feed_forward", None),
])
def test_swap_plans(captured, name, block, identity):
    _, _, gm = captured(name)
    swap = plan_module_swap(gm, find_ffns(gm)[0])
    assert (swap.block, swap.identity) == (block, identity)


class InlineBlock(nn.Module):
    """The FFN's activation runs inline in a module that also does the residual and norm."""

    def __init__(self, d=8):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 20), nn.Linear(20, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


def test_unswappable_ffn_suggests_graph_mode():
    gm = capture(InlineBlock(), (torch.randn(2, 3, 8),))
    with pytest.raises(InputError, match="use mode='graph'"):
        plan_module_swap(gm, find_ffns(gm)[0])
