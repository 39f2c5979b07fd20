"""convert(): the checks it reports are valid for discontinuous (W8A8) models; inline FFNs in
the default mode; fresh calibration batches after a sliced example input."""

import pytest
import torch
import transformers

from rewriter import FP8Config, InputError, MoEConfig, NoFFNError, conversion_info, convert, models
from rewriter.capture import activation_quantization_bypassed
from rewriter.training import TrainConfig


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _tiny_llama(vocab: int, intermediate: int) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32,
                                   intermediate_size=intermediate, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_w8a8_output_error_is_reported_with_and_without_activation_quantization():
    model = models.build_model("llama-tiny", seed=3)
    x = models.example_inputs(model, 2, 9, seed=2)
    w8a8 = convert(model, moe=MoEConfig(num_experts=4, top_k=4), fp8=FP8Config(),
                   example_inputs=x)
    info = conversion_info(w8a8)
    with torch.no_grad():
        ref = model(*x)
        with activation_quantization_bypassed():
            bypassed = w8a8(*x)
    # the continuous figure: MoE split (exact) + FP8 weights only
    assert info.output_error_bypassed == pytest.approx(
        float((bypassed - ref).abs().max() / ref.abs().max()), rel=1e-6)
    assert 0 < info.output_error_bypassed < info.output_error < 0.2
    w8a16 = convert(model, fp8=FP8Config(activations="none"), example_inputs=x)
    assert conversion_info(w8a16).output_error_bypassed is None  # nothing to bypass
    moe = convert(model, moe=MoEConfig(num_experts=4, top_k=4), example_inputs=x)
    assert conversion_info(moe).output_error < 1e-6
    assert conversion_info(moe).output_error_bypassed is None


def test_sliced_example_and_fresh_calibration_batches():
    torch.manual_seed(0)
    model = _tiny_llama(128, 96)
    data = torch.randint(0, 128, (8, 32))
    calib = [{"input_ids": torch.randint(0, 128, (3, 17))} for _ in range(2)]
    out = convert(model, moe=MoEConfig(num_experts=4, top_k=4), calibration=calib,
                  example_inputs={"input_ids": data[:2, :16]})
    fresh = torch.randint(0, 128, (3, 11))
    with torch.no_grad():
        assert _rel(out(input_ids=fresh).logits, model(input_ids=fresh).logits) < 1e-6
    assert conversion_info(out).calibration_tokens == 2 * 3 * 17


def test_an_already_moe_model_is_refused_with_what_to_do():
    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=97)
    model = transformers.MixtralForCausalLM(config).eval()
    x = {"input_ids": torch.randint(0, 97, (2, 7))}
    with pytest.raises(NoFFNError, match=r"already a mixture of experts: .*experts\.gate_up_proj"
                       r".* convert it with fp8= only"):
        convert(model, moe=MoEConfig(num_experts=4, top_k=2), example_inputs=x)
    lowered = convert(model, fp8=FP8Config(), example_inputs=x)  # what the message offers
    assert any(d.lowered for d in conversion_info(lowered).fp8_decisions)
    with torch.no_grad():
        ref, got = model(**x).logits, lowered(**x).logits
    assert 0 < float((got - ref).norm() / ref.norm()) < 0.25


def test_tokenizer_output_is_accepted_like_a_dict():
    """A tokenizer's BatchEncoding (a Mapping, not a dict) as example input and calibration
    batches gives the model the same dict would (it used to be passed positionally: TypeError
    in the embedding)."""
    torch.manual_seed(1)
    model = _tiny_llama(101, 80)
    ids = torch.randint(0, 101, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    plain = {"input_ids": ids, "attention_mask": mask}
    moe = MoEConfig(num_experts=4, top_k=2)
    want = convert(model, moe=moe, example_inputs=plain, calibration=[plain])
    got = convert(model, moe=moe, example_inputs=transformers.BatchEncoding(plain),
                  calibration=[transformers.BatchEncoding(plain)])
    fresh = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        assert torch.equal(got(input_ids=fresh).logits, want(input_ids=fresh).logits)
        assert _rel(want(input_ids=fresh).logits, model(input_ids=fresh).logits) < 0.5


@pytest.mark.parametrize("make, field", [
    (lambda: MoEConfig(num_experts=4, top_k=9), "MoEConfig.top_k"),
    (lambda: FP8Config(mode="fast"), "FP8Config.mode"),
    (lambda: TrainConfig(steps=0), "TrainConfig.steps"),
])
def test_a_bad_config_field_is_an_input_error_naming_it(make, field):
    """Config validation raises the project's InputError (a ValueError too), so callers and
    the CLI ("rewriter: error: ...") treat it as bad input, not as a crash."""
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        make()


# ------------------------------------------------------------- the user's model, as it is given


class _Block(torch.nn.Module):
    """An FFN inline in a residual block (norm, gate/up/down linears): D and FF odd."""

    def __init__(self, d: int = 20, ff: int = 44):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.g = torch.nn.Linear(d, ff, bias=False)
        self.u = torch.nn.Linear(d, ff, bias=False)
        self.d = torch.nn.Linear(ff, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.d(torch.nn.functional.silu(self.g(h)) * self.u(h))


class _FFN(torch.nn.Module):
    def __init__(self, d: int = 20, ff: int = 44):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _Net(torch.nn.Module):
    def __init__(self, d: int = 20):
        super().__init__()
        self.inp = torch.nn.Linear(d, d)
        self.ffn = torch.nn.ModuleList([_FFN(), _FFN()])

    def forward(self, x):
        x = self.inp(x)
        for f in self.ffn:
            x = x + f(x)
        return x


def _seeded(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(11)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module.eval()


@pytest.mark.parametrize("where", ["0.d", "0.g", "1.ffn"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_a_hook_on_a_module_the_rewrite_replaces_is_refused_naming_it(where, kind):
    model = _seeded(torch.nn.Sequential(_Block(), torch.nn.Sequential(
        torch.nn.Linear(20, 20), torch.nn.Sequential())))
    model[1][1] = _FFN()  # "1.1": a whole-module swap
    where = where.replace("1.ffn", "1.1")
    hooked = model.get_submodule(where)
    if kind == "forward":
        hooked.register_forward_hook(lambda mod, i, o: o * 2.0)
    else:
        hooked.register_forward_pre_hook(lambda mod, i: (i[0] * 2.0,))
    x = torch.randn(2, 7, 20, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = MoEConfig(num_experts=4, top_k=4, gate="hard")
    if (where, kind) == ("0.g", "forward_pre"):  # gate and up now read different inputs: not
        out = convert(model, moe=cfg, example_inputs=(x,))  # an FFN, left as it is, hook kept
        assert conversion_info(out).modules == ("1.1",)
        assert len(out.get_submodule(where)._forward_pre_hooks) == 1
        with torch.no_grad():
            assert _rel(out(x), model(x)) <= 1e-6
        return
    with pytest.raises(InputError, match=rf"module {where} \(\w+\) has forward"):
        convert(model, moe=cfg, example_inputs=(x,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(getattr(hooked, f"_{kind}_hooks")) == 1  # the user's hook is still there


def test_hooks_outside_what_is_replaced_are_kept_and_the_rewrite_stays_exact():
    model = _seeded(torch.nn.Sequential(_Block(), _Block(), _Net()))
    model[1].norm.register_forward_hook(lambda mod, i, o: o + 1.0)  # inside an inline owner
    model[2].inp.register_forward_hook(lambda mod, i, o: o * 0.5)  # beside swapped FFNs
    x = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(2))
    out = convert(model, moe=MoEConfig(num_experts=4, top_k=4, gate="hard"), example_inputs=(x,))
    assert len(out[1].norm._forward_hooks) == len(out[2].inp._forward_hooks) == 1
    with torch.no_grad():
        assert _rel(out(x), model(x)) <= 1e-6


def test_a_hook_on_the_owner_of_an_inline_ffn_is_refused_naming_it():
    model = _seeded(torch.nn.Sequential(_Block(), _Block()))
    model[0].register_forward_hook(lambda mod, i, o: o * 2.0)  # its forward is re-traced
    x = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(2))
    with pytest.raises(InputError, match=r"module 0 \(_Block\) has forward hooks"):
        convert(model, moe=MoEConfig(num_experts=4, top_k=4, gate="hard"), example_inputs=(x,))


def test_a_hook_on_a_linear_fp8_lowers_is_refused_naming_it():
    model = _seeded(_Net())
    model.inp.register_forward_hook(lambda mod, i, o: o * 2.0)
    x = torch.randn(2, 7, 20, generator=torch.Generator().manual_seed(3))
    with pytest.raises(InputError, match=r"module inp \(Linear\) has forward hooks; FP8"):
        convert(model, fp8=FP8Config(weight_rounding="nearest"), example_inputs=(x,))
    with pytest.raises(InputError, match=r"module inp \(Linear\) has forward hooks; FP8"):
        convert(model, moe=MoEConfig(num_experts=4, top_k=2), fp8=FP8Config(),
                example_inputs=(x,))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("how", ["moe", "moe+fp8", "fp8"])
def test_new_modules_take_the_mode_of_the_modules_they_replace(training, how):
    model = _seeded(_Net()).train(training)
    x = torch.randn(2, 7, 20, generator=torch.Generator().manual_seed(4))
    kw = {"moe": MoEConfig(num_experts=4, top_k=2, aux_loss_coef=0.01)} if "moe" in how else {}
    if "fp8" in how:
        kw["fp8"] = FP8Config(weight_rounding="nearest")
    out = convert(model, example_inputs=(x,), **kw)
    assert {m.training for m in out.modules()} == {training}
    assert model.training is training and all(m.training is training for m in model.modules())
    if "moe" in how and not training:
        with torch.no_grad():
            out(x)
        assert all(getattr(b, "aux_loss", None) is None for b in out.modules())


def test_an_ffn_the_user_froze_converts_into_frozen_experts():
    model = _seeded(_Net())
    model.ffn[1].requires_grad_(False)
    x = torch.randn(2, 7, 20, generator=torch.Generator().manual_seed(5))
    out = convert(model, moe=MoEConfig(num_experts=4, top_k=2), example_inputs=(x,))
    params = dict(out.named_parameters())
    assert not any(p.requires_grad for n, p in params.items() if n.startswith("ffn.1."))
    assert all(p.requires_grad for n, p in params.items() if n.startswith(("ffn.0.", "inp.")))
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("ffn.1"))


def test_a_model_on_the_meta_device_is_an_input_error():
    with torch.device("meta"):
        model = _Net()
    for kw in ({"moe": MoEConfig(num_experts=4, top_k=4)}, {"fp8": FP8Config()}):
        with pytest.raises(InputError, match=r"_Net\.inp\.weight is on the meta device"):
            convert(model, example_inputs=(torch.randn(2, 5, 20),), **kw)


def test_calibration_without_two_real_tokens_is_an_input_error():
    model = _tiny_llama(97, 44)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cfg = MoEConfig(num_experts=3, top_k=2, shared_experts=1, gate="softmax")
    one = {"input_ids": ids[:1, :1], "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    for batch, real in ((one, 1),
                        ({"input_ids": ids, "attention_mask": torch.zeros_like(ids)}, 0)):
        with pytest.raises(InputError, match=rf"calibration holds {real} real token"):
            convert(model, moe=cfg, calibration=[batch], example_inputs=example)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.int32])
def test_a_calibration_mask_of_another_dtype_is_cast_when_exact(dtype):
    model = _tiny_llama(97, 44)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(7))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    mask = torch.ones(2, 9, dtype=dtype)
    mask[0, :4] = 0
    cfg = MoEConfig(num_experts=3, top_k=2, shared_experts=1, gate="softmax")
    out = convert(model, moe=cfg, calibration=[{"input_ids": ids, "attention_mask": mask}],
                  example_inputs=example)
    assert conversion_info(out).calibration_tokens == 14  # 18 positions, 4 padded
    half = mask.float() * 0.5  # not a cast that keeps the values: named, with both dtypes
    with pytest.raises(InputError, match=r"calibration batch 0: input attention_mask is "
                                         r"torch.float32, .* torch.int64"):
        convert(model, moe=cfg, calibration=[{"input_ids": ids, "attention_mask": half}],
                example_inputs=example)


class _Wrapper(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.module = inner

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("wrap", [_Wrapper, torch.nn.DataParallel, torch.compile])
def test_a_model_behind_a_star_args_wrapper_converts_exactly(wrap):
    model = wrap(_seeded(_Net())).eval()
    x = torch.randn(2, 7, 20, generator=torch.Generator().manual_seed(8))
    out = convert(model, moe=MoEConfig(num_experts=4, top_k=4, gate="hard"), example_inputs=(x,))
    y = torch.randn(3, 5, 20, generator=torch.Generator().manual_seed(9))  # other batch, length
    with torch.no_grad():
        assert _rel(out(y), model(y)) <= 1e-6
    assert len(conversion_info(out).modules) == 2


def test_no_ffn_in_training_mode_with_active_dropout_says_to_call_eval():
    model = _seeded(torch.nn.Sequential(torch.nn.Linear(20, 20), torch.nn.Linear(20, 44),
                                        torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                        torch.nn.Linear(44, 20))).train()
    x = torch.randn(2, 7, 20, generator=torch.Generator().manual_seed(10))
    with pytest.raises(NoFFNError, match=r"training mode and has active dropout.*model\.eval"):
        convert(model, moe=MoEConfig(num_experts=4, top_k=4), example_inputs=(x,))
    out = convert(model.eval(), moe=MoEConfig(num_experts=4, top_k=4, gate="hard"),
                  example_inputs=(x,))
    with torch.no_grad():
        assert _rel(out(x), model(x)) <= 1e-6
