import pytest
import torch

import rewriter
from rewriter.errors import InputError
from rewriter.model_stats import model_stats
from rewriter.recipes import RECIPES, fit_experts, get_recipe
from tests._zoo import CASES

# every reference model and HF LLaMA / GPT-2 / BERT built from config
RECIPE_CASES = [c for c in CASES if not c.name.startswith("hf:")
                or c.name in ("hf:llama", "hf:gpt2", "hf:bert")]


@pytest.mark.parametrize("d_ff", [136, 172, 344, 512, 1536, 3072, 11008])
def test_fit_experts_splits_every_width(d_ff):
    experts, shared = fit_experts([d_ff], 16, 0.25)
    assert 4 <= experts <= 64 and (d_ff - shared) % experts == 0
    assert abs(shared - d_ff / 4) <= 0.15 * d_ff / 4 + 1
    if d_ff == 1536:
        assert (experts, shared) == (16, 384)  # SmolLM2: 16 x 72 routed + 384 shared


def _ffn_sizes(case, model):
    layers, d, d_ff = case.expected_sizes(model)
    mats = 3 if case.kind.startswith("glu") else 2
    return layers, d, d_ff, mats


# MoE + FP8 conversions capture the model twice (~10-40 s each on 2 cores): the default run
# keeps one per family, the slow CI step runs the rest
_DEFAULT_FP8 = {"llama-tiny", "gpt-tiny", "bert-tiny", "hf:gpt2"}
MATRIX = [
    pytest.param(case, recipe, id=f"{case.name}-{recipe}",
                 marks=[pytest.mark.slow] if recipe == "deepseek-v3-hf" or (
                     recipe == "deepseek-v3" and case.name not in _DEFAULT_FP8) else [])
    for recipe in RECIPES for case in RECIPE_CASES
]


@pytest.mark.parametrize("case,recipe", MATRIX)
def test_every_recipe_converts_every_model(case, recipe):
    model = case.build()
    inputs = case.inputs(model, 2, 7, seed=3)
    dense = model_stats(model)
    conv = rewriter.convert(model, recipe=recipe, example_inputs=inputs)
    with torch.no_grad():
        out = conv(**inputs) if isinstance(inputs, dict) else conv(*inputs)
    logits = out if isinstance(out, torch.Tensor) else out[0]
    assert torch.isfinite(logits).all()

    info = rewriter.conversion_info(conv)
    assert info.recipe == recipe
    stats = model_stats(conv)
    layers, d, d_ff, mats = _ffn_sizes(case, model)
    moe, fp8 = get_recipe(recipe).configs([d_ff])
    if moe is None:
        assert stats.params == dense.params and stats.active_params == dense.active_params
        assert stats.weight_bytes < 0.6 * dense.weight_bytes  # FP8 inference: 1 byte/weight
        return
    # independently of model_stats: the split keeps every dense weight and bias, adds the
    # router (d x E); a token skips E - k routed experts of mats * d * F weights (+ biases)
    E, k, S = moe.num_experts, moe.top_k, moe.shared_width
    F = (d_ff - S) // E
    assert info.blocks[0]["experts"] == E and info.blocks[0]["expert_dim"] == F
    expert = mats * d * F + (F * (mats - 1) if case.bias else 0)
    assert stats.params == dense.params + layers * d * E
    assert stats.active_params == stats.params - layers * (E - k) * expert
    assert stats.matmul_flops_per_token < dense.matmul_flops_per_token
    assert info.split_error < 1e-12  # experts + shared partition the dense FFN exactly
    if fp8 is None:
        assert stats.weight_bytes == dense.weight_bytes + 4 * layers * (d * E + E)  # + bias buf
    else:  # deepseek-v3: FP8 training keeps fp32 master weights
        assert info.fp8.mode == "training" and info.moe.gate == "sigmoid"


def test_report_summarises_the_conversion():
    case = next(c for c in CASES if c.name == "gpt-tiny")
    model = case.build()
    conv = rewriter.convert(model, recipe="moe-only")
    report = rewriter.inspect(conv)
    text = str(report)
    assert "recipe: moe-only" in text and "params active per token" in text
    assert "float64 rel. error" in text and "Converted blocks" in text
    assert report.stats == model_stats(conv)
    assert report.to_dict()["conversion"]["source_stats"]["params"] == model_stats(model).params


def test_explicit_configs_override_the_recipe_and_bad_names_fail():
    from rewriter.passes.ffn_to_moe import MoEConfig

    model = CASES[4].build()  # llama-tiny
    conv = rewriter.convert(model, recipe="deepseek-v3",
                            moe=MoEConfig(num_experts=4, top_k=1))
    info = rewriter.conversion_info(conv)
    assert info.moe.num_experts == 4 and info.fp8.mode == "training"
    with pytest.raises(InputError, match="unknown recipe 'deepseek'"):
        rewriter.convert(model, recipe="deepseek")
    with pytest.raises(InputError, match="no expert count"):
        fit_experts([3], 16, 0.25)  # 3 neurons cannot make 4 experts


def test_hf_generate_keeps_working_after_conversion():
    """Module mode swaps blocks into a copy of the HF model: generate() still runs, and with
    every expert active (hard gates) it generates exactly what the dense model generates."""
    from rewriter.passes.ffn_to_moe import MoEConfig

    case = next(c for c in CASES if c.name == "hf:llama")
    model = case.build().eval()
    ids = case.inputs(model, 2, 5, seed=4)["input_ids"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    dense = model.generate(ids, **kw)
    exact = rewriter.convert(model, moe=MoEConfig(num_experts=4, top_k=4))
    assert torch.equal(exact.generate(ids, **kw), dense)
    fp8 = rewriter.convert(model, recipe="deepseek-v3").eval()
    out = fp8.generate(ids, **kw)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], ids)


def _active_fraction(moe, d_ff: int) -> float:
    routed = (d_ff - moe.shared_width) // moe.num_experts
    return (moe.shared_width + moe.top_k * routed) / d_ff


@pytest.mark.parametrize("active, shared, top_k", [(0.75, 1024, 4), (0.5, 512, 4),
                                                   (0.4375, 384, 4)])
def test_active_picks_the_layout_for_smollm2_widths(active, shared, top_k):
    moe, fp8 = get_recipe("deepseek-v3").with_active(active).configs([1536])
    assert (moe.num_experts, moe.shared_width, moe.top_k) == (16, shared, top_k)
    assert _active_fraction(moe, 1536) == pytest.approx(active)
    assert moe.route_scale == top_k and fp8.mode == "training"  # the rest of the recipe kept
    if active == 0.4375:  # the recipe's own default is the 44% layout
        assert get_recipe("deepseek-v3").configs([1536])[0] == moe


@pytest.mark.parametrize("d_ff", [136, 344, 1000, 11008])
@pytest.mark.parametrize("active", [0.3, 0.5, 0.75, 0.9])
def test_active_is_met_within_a_few_points_on_other_widths(d_ff, active):
    moe, _ = get_recipe("moe-only").with_active(active).configs([d_ff])
    assert abs(_active_fraction(moe, d_ff) - active) <= 0.06


def test_active_refuses_what_it_cannot_do():
    for bad in (0.1, 1.0, 1.5, True, "0.5"):
        with pytest.raises(InputError, match="active must be a fraction"):
            get_recipe("deepseek-v3").with_active(bad)
    with pytest.raises(InputError, match="converts no FFN"):
        get_recipe("fp8-only").with_active(0.5)
    case = {c.name: c for c in CASES}["llama-tiny"]
    with pytest.raises(InputError, match="give recipe="):
        rewriter.convert(case.build(), moe=rewriter.MoEConfig(num_experts=4, top_k=2),
                         active=0.5)


def test_convert_with_active_reports_that_fraction():
    case = {c.name: c for c in CASES}["hf:llama"]
    model = case.build()
    conv = rewriter.convert(model, recipe="moe-only", active=0.75,
                            example_inputs=case.inputs(model, 1, 8))
    info = rewriter.conversion_info(conv)
    d_ff = case.expected_sizes(model)[2]
    assert _active_fraction(info.moe, d_ff) == pytest.approx(0.75, abs=0.06)
