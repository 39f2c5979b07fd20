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
