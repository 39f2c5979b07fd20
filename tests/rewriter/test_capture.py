import importlib

import pytest
import torch
from torch import nn

from rewriter import CaptureError, FP8Config, InputError, capture, capture_info, convert, models
from rewriter.capture import (
    activation_quantization_bypassed,
    quantizes_activations,
    sequence_rows,
)
from tests._zoo import CASES, case_ids

capture_mod = importlib.import_module("rewriter.capture")  # the package re-exports capture()

SHAPES = [(1, 1), (3, 11), (5, 4)]


def _logits(out):
    return out if isinstance(out, torch.Tensor) else (
        out.logits if hasattr(out, "logits") else out.last_hidden_state)


@pytest.mark.parametrize("name", case_ids())
def test_capture_equals_eager_at_fresh_shapes(captured, name):
    case, model, gm = captured(name)
    info = capture_info(gm)
    assert info.method == "torch.export"
    assert set(next(iter(info.dynamic_dims.values()))) == {0, 1}
    for i, (b, t) in enumerate(SHAPES):
        inputs = case.inputs(model, b, t, seed=100 + i)
        args, kwargs = capture_mod.normalize_inputs(inputs)
        with torch.no_grad():
            ref = _logits(model(*args, **kwargs))
            got = _logits(gm(*args, **kwargs))
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert ref.abs().max() > 0


def test_capture_keeps_module_stack_and_shares_parameters(captured):
    _, model, gm = captured("llama-tiny")
    stacks = [n.meta.get("nn_module_stack") for n in gm.graph.nodes if n.op == "call_function"]
    assert sum(1 for s in stacks if s) > 0.9 * len(stacks)
    name, param = next(iter(model.named_parameters()))
    assert gm.get_parameter(name) is param


def test_hf_kv_cache_is_restored_and_model_untouched(captured):
    case = {c.name: c for c in CASES}["hf:llama"]
    model = case.build()
    model.config.use_cache = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = capture(model, case.inputs(model, 2, 5))
    assert model.config.use_cache is True
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert capture_info(gm).method == "torch.export"


def test_unit_batch_example_still_gives_dynamic_batch():
    from rewriter import models

    model = models.build_model("gpt-tiny")
    gm = capture(model, models.example_inputs(model, 1, 1))
    assert set(capture_info(gm).dynamic_dims["idx"]) == {0, 1}
    x = models.example_inputs(model, 4, 9, seed=3)[0]
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_static_capture_rejects_other_shapes():
    from rewriter import models

    model = models.build_model("gpt-tiny")
    gm = capture(model, models.example_inputs(model, 2, 7), dynamic=False)
    assert capture_info(gm).dynamic_dims == {}
    with pytest.raises(Exception, match="shape|size|Guard"):
        gm(models.example_inputs(model, 3, 7)[0])


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (torch.rand(2, 7), r"float32.*(integer|Long|int64)"),
        (torch.randint(0, 50, (7,)), r"Tensor\(7,\).*\(B, T\)"),
        (torch.randint(0, 50, (2, 500)), r"500"),
    ],
)
def test_wrong_input_shape_or_dtype_is_named(bad, pattern):
    from rewriter import models

    model = models.build_model("gpt-tiny")
    with pytest.raises(InputError, match=pattern):
        capture(model, (bad,))


def test_non_tensor_input_and_non_module_are_rejected():
    from rewriter import models

    with pytest.raises(InputError, match=r"args\[0\] must be a tensor, got str"):
        capture(models.build_model("gpt-tiny"), ("hello",))
    with pytest.raises(InputError, match="must be a torch.nn.Module"):
        capture(lambda x: x, (torch.ones(2),))
    with pytest.raises(InputError, match="empty"):
        capture(models.build_model("gpt-tiny"), ())


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # Python control flow on a tensor value: not capturable
            return h.relu()
        return h


def test_uncapturable_model_names_both_front_ends():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(3, 8),))
    msg = str(info.value)
    assert "DataDependent" in msg
    assert "torch.export" in msg and "symbolic_trace" in msg
    assert "control flow" in msg


class PlainBlocks(nn.Module):
    """Float-input residual MLP stack with no input checks: torch.fx can trace it."""

    def __init__(self, d=24, d_ff=70, layers=3):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d_ff), nn.GELU(), nn.Linear(d_ff, d)) for _ in range(layers)
        )

    def forward(self, x):
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return x


def test_symbolic_trace_fallback_when_export_fails(monkeypatch):
    from rewriter import find_ffns

    def broken_export(*args, **kwargs):
        raise RuntimeError("simulated export failure")

    monkeypatch.setattr(capture_mod, "_export", broken_export)
    model = PlainBlocks().eval()
    x = torch.randn(2, 5, 24)
    gm = capture(model, (x,))
    info = capture_info(gm)
    assert info.method == "torch.fx.symbolic_trace"
    assert "simulated export failure" in info.export_error
    y = torch.randn(3, 9, 24)
    torch.testing.assert_close(gm(y), model(y), rtol=1e-6, atol=1e-6)
    ffns = find_ffns(gm)
    assert [(f.module, f.kind, f.activation, f.d_ff) for f in ffns] == [
        (f"mlps.{i}", "mlp", "gelu", 70) for i in range(3)
    ]


def test_first_float_output_skips_integer_leaves():
    from rewriter.capture import first_float_output

    ids, logits = torch.arange(6).reshape(2, 3), torch.randn(2, 3, 5)
    assert first_float_output({"ids": ids, "logits": logits, "h": torch.randn(2)}) is logits
    assert first_float_output((ids, [logits])) is logits
    assert first_float_output({"ids": ids}) is None


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, a, b):
        return self.fc(a) - 2 * b


def test_symbolic_trace_takes_keyword_inputs_by_name_not_dict_order(monkeypatch):
    monkeypatch.setattr(capture_mod, "_export", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("simulated export failure")))
    model = TwoInputs().eval()
    a, b = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    gm = capture(model, {"b": b, "a": a})  # not the signature's order
    assert capture_info(gm).method == "torch.fx.symbolic_trace"
    a2, b2 = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    torch.testing.assert_close(gm(b=b2, a=a2), model(a2, b2), rtol=0, atol=0)


@pytest.mark.parametrize("make", [
    lambda data: data[:2, :16],  # a slice
    lambda data: data[0, :32].reshape(2, 16),  # a reshape of a slice
    lambda data: data[:16, :2].t(),  # a transposed (non-contiguous) view
    lambda data: data.as_strided((2, 16), (1, 2)),  # any strides
])
def test_example_input_that_is_a_view_gives_a_graph_for_any_fresh_tensor(make):
    case = {c.name: c for c in CASES}["hf:llama"]
    model = case.build()
    data = torch.randint(0, model.config.vocab_size, (8, 32))
    example = make(data)
    gm = capture(model, {"input_ids": example})
    assert example._base is data  # the user's tensor is untouched
    fresh = torch.randint(0, model.config.vocab_size, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(_logits(gm(input_ids=fresh)), model(input_ids=fresh).logits,
                                   rtol=1e-5, atol=1e-5)


def test_w8a8_model_is_checked_with_activation_quantization_bypassed():
    """A W8A8 model is a step function: the capture check compares eager and graph with
    activation quantization bypassed on both sides (fp32 tolerance then holds)."""
    model = models.build_model("llama-tiny", seed=2)
    x = models.example_inputs(model, 2, 9, seed=1)
    w8a8 = convert(model, fp8=FP8Config(activations="fp8"), example_inputs=x)
    assert quantizes_activations(w8a8) and not quantizes_activations(model)
    gm = capture(w8a8, x)
    info = capture_info(gm)
    assert info.check == "activations bypassed"
    assert info.max_abs_error <= 1e-5 and info.quantized_max_abs_error is not None
    with torch.no_grad():
        on = w8a8(*x)
        with activation_quantization_bypassed():
            off_eager, off_graph = w8a8(*x), gm(*x)
    torch.testing.assert_close(off_graph, off_eager, rtol=1e-6, atol=1e-6)
    assert (on - off_eager).abs().max() > 1e-4  # the bypass really bypasses
    w8a16 = convert(model, fp8=FP8Config(activations="none"), example_inputs=x)
    assert capture_info(capture(w8a16, x)).check == "exact"


def test_dynamic_dims_leave_out_a_size_the_model_fixes():
    """A size the model's code specialises (a Python list built from the length, CPM-Ant) is
    not reported dynamic, though the trace still holds it as a SymInt."""

    class ListFromLength(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):  # (B, T, 8)
            pos = torch.tensor(list(range(x.shape[1])), dtype=x.dtype)
            return self.proj(x) + pos[None, :, None]

    gm = capture(ListFromLength().eval(), (torch.randn(2, 7, 8),))
    assert list(capture_info(gm).dynamic_dims.values()) == [(0,)]


def test_sequence_rows_slices_every_batch_tensor_and_shares_the_rest():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    bias = torch.randn(5, generator=g)  # not per sequence: shared
    rows = sequence_rows((), {"input_ids": ids, "attention_mask": mask, "bias": bias,
                              "use_cache": False})
    assert len(rows) == 3
    for i, (args, kwargs) in enumerate(rows):
        assert args == () and torch.equal(kwargs["input_ids"], ids[i:i + 1])
        assert torch.equal(kwargs["attention_mask"], mask[i:i + 1])
        assert kwargs["bias"] is bias and kwargs["use_cache"] is False
    x = torch.randn(4, 3, generator=g)
    rows = sequence_rows((torch.tensor(2.0), x), {})  # a 0-d tensor first: B from x
    assert len(rows) == 4 and all(torch.equal(a[1], x[i:i + 1]) for i, (a, _) in enumerate(rows))
    assert sequence_rows((torch.tensor(1.0),), {})[0][0][0].item() == 1.0  # no batch dim


def test_token_ids_logits_and_real_positions():
    """The helpers the sensitivity pass and recovery share to read a batch's output."""
    from rewriter.capture import is_token_logits, real_positions, token_ids

    ids = torch.tensor([[3, 1, 4], [1, 5, 9]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert token_ids((), {"input_ids": ids, "x": torch.zeros(2)}) is ids
    assert token_ids((torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), ids), {}) is ids
    assert token_ids((torch.zeros(2, 3),), {}) is None
    logits = torch.randn(2, 3, 10)
    assert is_token_logits(logits, ids)
    assert not is_token_logits(torch.randn(2, 3, 9), ids)  # id 9 out of range
    assert not is_token_logits(torch.randn(2, 4, 10), ids) and not is_token_logits(logits, None)
    real = real_positions(mask, logits)
    assert real.shape == (2, 3, 1) and real.dtype == torch.bool
    assert real.squeeze(-1).tolist() == [[True, True, False], [True, True, True]]
    assert real_positions(mask, torch.randn(2, 4, 5)) is None and real_positions(None, logits) \
        is None


def test_capturing_a_train_mode_model_leaves_its_buffers_alone():
    """Capture runs the model (and the captured graph) once: in train mode that updated batch
    norm's running statistics in place, in the user's model and in the graph sharing them."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = capture(model.train(), torch.randn(7, 6))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items() if k in before)
    assert int(model[1].num_batches_tracked) == 0 and model.training
