import pytest
import torch
import transformers
from rewriter.passes.lower_fp8 import FP8Config
from rewriter.passes.sensitivity import choose_high_precision, fisher_sensitivity
from rewriter.targets.fp8_linear import FP8Linear
from torch import nn

import rewriter
from rewriter import InputError


class TinyLM(nn.Module):
    """Embedding -> two linears with a GELU -> a head: logits (B, T, V)."""

    def __init__(self, vocab: int = 37, d: int = 24, f: int = 40) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, f)
        self.down = nn.Linear(f, d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return self.head(h + self.down(torch.nn.functional.gelu(self.up(h))))


class Encoder(TinyLM):
    """The same layers, returning hidden states (B, T, d): not logits."""

    def forward(self, input_ids):
        h = self.emb(input_ids)
        return h + self.down(torch.nn.functional.gelu(self.up(h)))


def _perturbed(model, names, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: model.get_submodule(n).weight.detach() +
            0.01 * torch.randn(model.get_submodule(n).weight.shape, generator=g) for n in names}


def test_fisher_sensitivity_is_the_diagonal_fisher_times_the_squared_rounding_error():
    torch.manual_seed(0)
    model = TinyLM().double()
    model.up.weight.requires_grad_(False)  # a frozen weight still gets a score, stays frozen
    ids = torch.randint(0, 37, (3, 11), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]
    rounded = _perturbed(model, ["up", "down"], seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    scores = fisher_sensitivity(model, rounded, batches, progress=False)

    ref = {}
    for name in ("up", "down"):
        w = model.get_submodule(name).weight.detach().clone().requires_grad_(True)
        fisher = torch.zeros_like(w)
        for row in ids:  # one sequence at a time, next-token NLL, float64
            logits = torch.func.functional_call(model, {f"{name}.weight": w}, (row[None],))
            loss = nn.functional.cross_entropy(logits[0, :-1], row[1:])
            (g,) = torch.autograd.grad(loss, w)
            fisher += g ** 2
        ref[name] = float((fisher * (rounded[name] - w.detach()) ** 2).sum())
    assert scores == pytest.approx(ref, rel=1e-6)
    # positional batches (a tuple, a bare tensor) are split and scored the same way
    positional = fisher_sensitivity(model, rounded, [(ids[:2],), ids[2:]], progress=False)
    assert positional == pytest.approx(ref, rel=1e-6)
    assert all(v > 0 for v in scores.values())
    # the model is as it was: weights, flags, grads, mode
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.up.weight.requires_grad is False and model.down.weight.requires_grad is True
    assert model.up.weight.grad is None and model.down.weight.grad is None
    assert model.training


def test_non_logit_outputs_are_scored_by_a_seeded_random_projection():
    torch.manual_seed(3)
    model = Encoder().eval()
    ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(4))
    rounded = _perturbed(model, ["up", "down"], seed=5)
    a = fisher_sensitivity(model, rounded, [{"input_ids": ids}], seed=7, progress=False)
    b = fisher_sensitivity(model, rounded, [{"input_ids": ids}], seed=7, progress=False)
    assert a == b and all(v > 0 for v in a.values())
    # the reference: <v, output> with the same Rademacher draws, one sequence at a time
    g = torch.Generator().manual_seed(7)
    fisher = {n: torch.zeros_like(model.get_submodule(n).weight) for n in rounded}
    for row in ids:
        y = model(row[None])
        v = torch.randint(0, 2, y.shape, generator=g).float() * 2 - 1
        grads = torch.autograd.grad((v * y).sum(), [model.get_submodule(n).weight
                                                    for n in rounded])
        for n, gr in zip(rounded, grads):
            fisher[n] += gr ** 2
    for n in rounded:
        want = float((fisher[n] * (rounded[n] - model.get_submodule(n).weight.detach()) ** 2).sum())
        assert a[n] == pytest.approx(want, rel=1e-5)


def test_a_batch_that_cannot_run_is_named():
    model = TinyLM()
    with pytest.raises(InputError, match="calibration sequence 0"):
        fisher_sensitivity(model, _perturbed(model, ["up"], 0),
                           [{"input_ids": torch.tensor([[99, 1, 2]])}], progress=False)


def test_choose_high_precision_takes_the_largest_scores_within_the_budget():
    scores = {"a": 5.0, "b": 9.0, "c": 1.0, "d": 9.0, "e": 0.0, "f": 4.0}  # mean 4.67
    sizes = {"a": 10, "b": 60, "c": 10, "d": 10, "e": 10, "f": 10}
    # total 110, budget 0.25 -> 27.5: b (60) does not fit and is skipped; d (9, after b by
    # name) and a fit; f would fit but scores below the mean, and so do c and e
    assert choose_high_precision(scores, sizes, 0.25) == ["d", "a"]
    assert choose_high_precision(scores, sizes, 0.0) == []
    assert choose_high_precision(scores, sizes, 0.95) == ["b", "d", "a"]
    assert choose_high_precision({"x": 1.0, "y": 1.0}, {"x": 1, "y": 1}, 0.9) == []  # all equal


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=256,
                                   num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(11)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_convert_keeps_the_most_sensitive_linears_in_high_precision():
    dense = _tiny_llama()
    g = torch.Generator().manual_seed(12)
    calib = [{"input_ids": torch.randint(0, 97, (3, 19), generator=g)} for _ in range(2)]
    example = {"input_ids": calib[0]["input_ids"][:1]}
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    conv = rewriter.convert(dense, fp8=FP8Config(activations="none"), example_inputs=example,
                            calibration=calib, progress=False)
    kept = [d for d in conv.rewriter_conversion.fp8_decisions
            if "rounding sensitivity" in d.reason]
    rounded = [d for d in conv.rewriter_conversion.fp8_decisions
               if d.lowered and d.kind == "linear"]
    assert kept and rounded
    total = sum(d.params for d in kept + rounded)
    assert sum(d.params for d in kept) <= 0.05 * total
    for d in kept:
        assert not d.lowered and "rank" in d.reason
        module = conv.get_submodule(d.fqn)
        assert type(module) is nn.Linear and torch.equal(module.weight, before[d.fqn + ".weight"])
    for d in rounded:
        assert isinstance(conv.get_submodule(d.fqn), FP8Linear)
        assert "sensitivity rank" in d.reason and ("below the mean" in d.reason or
                                                   "over the budget" in d.reason)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    # the kept ones are the top of the ranking the report gives
    ranks = sorted(int(d.reason.split("rank ")[1].split()[0]) for d in kept)
    assert ranks[0] == 1

    none_kept = rewriter.convert(dense, fp8=FP8Config(activations="none",
                                                      high_precision_budget=0.0),
                                 example_inputs=example, calibration=calib, progress=False)
    assert not [d for d in none_kept.rewriter_conversion.fp8_decisions
                if "rounding sensitivity" in d.reason]
    for d in rounded:  # keeping some changes no other linear's FP8 codes or scales
        a, b = conv.get_submodule(d.fqn), none_kept.get_submodule(d.fqn)
        assert torch.equal(a.weight_q.view(torch.uint8), b.weight_q.view(torch.uint8))
        assert torch.equal(a.weight_scale, b.weight_scale)
    with torch.no_grad():
        ref = dense(**example).logits
        err_kept = (conv(**example).logits - ref).abs().max()
        err_none = (none_kept(**example).logits - ref).abs().max()
    assert 0 < err_kept < err_none


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "5%", float("nan"), None])
def test_bad_budget_is_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match="high_precision_budget"):
        FP8Config(high_precision_budget=bad)


def test_any_real_number_is_a_budget():
    import numpy as np

    assert FP8Config(high_precision_budget=np.float32(0.25)).high_precision_budget == 0.25
    assert FP8Config(high_precision_budget=0).high_precision_budget == 0


@pytest.mark.parametrize("name", ["hf:gpt2", "hf:bert", "hf:phi3", "gpt-tiny", "bert-tiny"])
def test_other_architectures_and_layouts_keep_their_most_sensitive_linears(name):
    """GPT-2's Conv1D (weights stored (in, out)), a fused gate_up, encoders whose output is
    hidden states or MLM logits: the kept modules are the originals, the rest FP8."""
    from tests._zoo import CASES

    case = {c.name: c for c in CASES}[name]
    dense = case.build().eval()
    calib = [case.inputs(dense, 2, 13, seed=s) for s in (1, 2)]
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    out = {}
    for budget in (0.0, 0.3):
        out[budget] = rewriter.convert(
            dense, fp8=FP8Config(activations="none", high_precision_budget=budget),
            example_inputs=calib[0], calibration=calib, progress=False)
    decisions = out[0.3].rewriter_conversion.fp8_decisions
    kept = [d for d in decisions if "rounding sensitivity" in d.reason]
    fp8 = [d for d in decisions if d.lowered and d.kind in ("linear", "conv1d")]
    assert kept and fp8
    assert sum(d.params for d in kept) <= 0.3 * sum(d.params for d in kept + fp8)
    originals = dict(dense.named_modules())
    for d in kept:
        module = out[0.3].get_submodule(d.fqn)
        assert type(module) is type(originals[d.fqn])
        assert torch.equal(module.weight, before[d.fqn + ".weight"])
    assert all(isinstance(out[0.3].get_submodule(d.fqn), FP8Linear) for d in fp8)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    x = case.inputs(dense, 3, 11, seed=5)  # held-out inputs

    def first(o):
        return o if isinstance(o, torch.Tensor) else o[0]

    def run(m):
        return first(m(**x) if isinstance(x, dict) else m(*x) if isinstance(x, tuple) else m(x))

    with torch.no_grad():
        ref = run(dense)
        errs = {b: (run(m) - ref).abs().max() for b, m in out.items()}
    assert 0 < errs[0.3] < errs[0.0]


def test_padded_positions_count_in_no_score():
    """Right padding (attention_mask 0) scores like the real tokens alone; a garbage pad id
    and a different pad length change nothing."""
    dense = _tiny_llama()
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]
    rounded = _perturbed(dense, names, seed=6)
    g = torch.Generator().manual_seed(7)
    real = torch.randint(0, 97, (2, 11), generator=g)
    plain = fisher_sensitivity(dense, rounded, [{"input_ids": real}], progress=False)
    for pad in (3, 9):
        ids = torch.cat([real, torch.randint(0, 97, (2, pad), generator=g)], 1)
        mask = torch.cat([torch.ones(2, 11, dtype=torch.long),
                          torch.zeros(2, pad, dtype=torch.long)], 1)
        padded = fisher_sensitivity(dense, rounded, [{"input_ids": ids, "attention_mask": mask}],
                                    progress=False)
        assert padded == pytest.approx(plain, rel=1e-4)
        unmasked = fisher_sensitivity(dense, rounded, [{"input_ids": ids}], progress=False)
        assert unmasked != pytest.approx(plain, rel=1e-2)  # the pads would have counted


def test_sequence_loss_leaves_padding_out_of_both_forms():
    from rewriter.passes.sensitivity import sequence_loss

    g = torch.Generator().manual_seed(8)
    logits = torch.randn(1, 6, 11, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (1, 6), generator=g)
    none = sequence_loss(logits, ids, g, torch.zeros(1, 6, dtype=torch.long))
    assert none.item() == 0.0 and torch.isfinite(none)
    hidden = torch.randn(1, 6, 5, generator=g, requires_grad=True)  # not logits over ids
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    (grad,) = torch.autograd.grad(sequence_loss(hidden, None, g, mask), hidden)
    assert (grad[0, 4:] == 0).all() and (grad[0, :4].abs() == 1).all()
    with pytest.raises(InputError, match="no float tensor"):
        sequence_loss({"ids": ids}, ids, g)
