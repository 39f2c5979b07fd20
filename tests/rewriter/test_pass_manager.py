import math

import pytest
import torch
from rewriter.passes import eliminate_dead_code, remove_identity_ops
from torch.fx import GraphModule

from rewriter import PassError, PassManager, PassResult, capture, inspect
from rewriter.graph_ops import op_name


def _gelu_written_out(gm: GraphModule) -> PassResult:
    """A real rewrite for the tests: aten.gelu -> 0.5*x*(1+erf(x/sqrt2)) (same numerics)."""
    aten = torch.ops.aten
    count = 0
    for node in list(gm.graph.nodes):
        if op_name(node) == "gelu" and node.kwargs.get("approximate", "none") == "none":
            x = node.args[0]
            with gm.graph.inserting_before(node):
                scaled = gm.graph.call_function(aten.mul.Tensor, (x, 1 / math.sqrt(2.0)))
                erf = gm.graph.call_function(aten.erf.default, (scaled,))
                one_plus = gm.graph.call_function(aten.add.Tensor, (erf, 1.0))
                half_x = gm.graph.call_function(aten.mul.Tensor, (x, 0.5))
                out = gm.graph.call_function(aten.mul.Tensor, (half_x, one_plus))
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            count += 1
    gm.recompile()
    return PassResult(gm, count > 0, {"rewritten": count})


def _double_output(gm: GraphModule) -> PassResult:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    val = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    with gm.graph.inserting_before(out):
        doubled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (val, 2.0))
    out.replace_input_with(val, doubled)
    gm.recompile()
    return PassResult(gm, True, {})


def _dangling_use(gm: GraphModule) -> PassResult:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    late, early = nodes[-1], nodes[0]
    early.args = (late,) + tuple(early.args[1:])  # uses a value before it is defined
    return PassResult(gm, True, {})


def _raises(gm):
    raise RuntimeError("boom")


def _returns_nothing(gm):
    return gm


@pytest.fixture
def gpt():
    from rewriter import models

    model = models.build_model("gpt-tiny", seed=3)
    return model, capture(model, models.example_inputs(model, 2, 9))


def test_pipeline_runs_checks_and_records_history(gpt):
    model, gm = gpt
    n_gelu = sum(op_name(n) == "gelu" for n in gm.graph.nodes)
    assert n_gelu == model.config.n_layer
    result = PassManager(
        [_gelu_written_out, remove_identity_ops, eliminate_dead_code],
        check_numerics=True, rtol=1e-5, num_checks=1,
    ).run(gm)
    names = [r.name for r in result.history]
    assert names == ["_gelu_written_out", "remove_identity_ops", "eliminate_dead_code"]
    first = result.history[0]
    assert first.modified and first.report["rewritten"] == n_gelu
    assert first.max_rel_error is not None and first.max_rel_error < 1e-5
    report = inspect(result)
    diff = report.diff("_gelu_written_out")
    assert len(diff.removed) == n_gelu and len(diff.added) == 5 * n_gelu
    assert "erf" in str(diff)
    # the rewritten graph still has its FFNs (written-out gelu is still gelu) and matches eager
    assert [f.activation for f in report.ffns] == ["gelu"] * n_gelu
    x = __import__("models").example_inputs(model, 3, 4, seed=9)[0]
    torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "bad_pass, stage, pattern",
    [
        (_raises, "run", "boom"),
        (_returns_nothing, "contract", "must return PassResult"),
        (_dangling_use, "lint", "used before it has been defined"),
        (_double_output, "numerics", "max relative error 1 > rtol"),
    ],
)
def test_failing_pass_is_named(gpt, bad_pass, stage, pattern):
    _, gm = gpt
    with pytest.raises(PassError, match=pattern) as info:
        PassManager([remove_identity_ops, bad_pass], check_numerics=True).run(gm)
    assert info.value.pass_name == bad_pass.__name__
    assert info.value.stage == stage
    assert f"pass {bad_pass.__name__!r} failed ({stage})" in str(info.value)


def test_numeric_check_needs_inputs_for_uncaptured_graphs():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="input_factory"):
        PassManager([eliminate_dead_code], check_numerics=True).run(gm)
    result = PassManager(
        [eliminate_dead_code], check_numerics=True,
        input_factory=lambda seed: ((torch.randn(2, 3, generator=torch.Generator().manual_seed(
            seed)),), {}),
    ).run(gm)
    assert result.history[0].max_rel_error == 0.0


def test_per_pass_tolerance(gpt):
    _, gm = gpt
    result = PassManager([_double_output], check_numerics=True,
                         rtol={"_double_output": 1.5}).run(gm)
    assert 0.99 < result.history[0].max_rel_error < 1.01


def test_non_callable_pass_is_rejected():
    with pytest.raises(TypeError, match="not callable"):
        PassManager([42])
