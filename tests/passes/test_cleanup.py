import torch
from rewriter.passes import eliminate_dead_code, remove_identity_ops
from torch import nn

from rewriter import capture
from rewriter.graph_ops import op_name


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        h = self.drop(self.fc(x)).clone().contiguous().to(torch.float32)
        unused = h * 3  # noqa: F841  dead code
        return h.to(torch.float64).sum(-1)  # a real cast stays


def test_identity_ops_and_dead_code_are_removed_without_changing_output():
    model = Noisy().eval()
    x = torch.randn(3, 5, 10)
    gm = torch.fx.symbolic_trace(model)
    before = [op_name(n) for n in gm.graph.nodes]
    assert "dropout" in before and "clone" in before
    ref = gm(x)
    result = remove_identity_ops(gm)
    assert result.modified
    after = [op_name(n) for n in result.graph_module.graph.nodes]
    assert "clone" not in after and "contiguous" not in after
    result2 = eliminate_dead_code(result.graph_module)
    assert result2.modified and result2.report["erased"] >= 1
    torch.testing.assert_close(result2.graph_module(x), ref)
    assert "to" in after  # the float64 cast is not an identity


def test_exported_graph_cleanup_is_exact():
    model = Noisy().eval()
    x = torch.randn(2, 4, 10)
    gm = capture(model, (x,))
    ref = gm(x)
    out = eliminate_dead_code(remove_identity_ops(gm).graph_module).graph_module
    torch.testing.assert_close(out(x), ref, rtol=0, atol=0)
