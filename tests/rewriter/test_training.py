import copy

import pytest
import torch
from rewriter.passes.ffn_to_moe import MoEConfig

import rewriter
from rewriter import models
from rewriter.errors import InputError
from rewriter.training import (
    TextData,
    TrainConfig,
    evaluate,
    load_checkpoint,
    moe_blocks,
    save_checkpoint,
    train,
)


@pytest.fixture(scope="module")
def data():
    return TextData.from_corpus(None, eval_tokens=512, eval_len=64)  # UTF-8 bytes


@pytest.fixture(scope="module")
def student():
    """llama-tiny converted the deepseek-v3 way (sigmoid gates, shared expert, FP8 training),
    with 4 routed experts to keep the emulated FP8 steps cheap."""
    moe = MoEConfig(num_experts=4, top_k=2, shared_width=44, gate="sigmoid", route_scale=2.0)
    return rewriter.convert(models.build_model("llama-tiny", seed=0), recipe="deepseek-v3",
                            moe=moe)


def _small(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "batch_size": 3, "seq_len": 33, "lr": 3e-3,
                          "warmup_steps": 2, **kw})


def test_text_data_splits_are_disjoint_and_batches_reproducible(data):
    n = data.train_ids.numel() + data.eval_ids.numel()
    from rewriter.models.text import token_ids

    ids = token_ids(None)
    assert n == ids.numel()
    assert torch.equal(data.eval_ids.flatten(), ids[data.train_ids.numel():])
    a, b = data.batch(7, 5, 33, seed=1), data.batch(7, 5, 33, seed=1)
    assert a.shape == (5, 33) and torch.equal(a, b)
    assert not torch.equal(a, data.batch(8, 5, 33, seed=1))


def test_training_lowers_held_out_perplexity_and_balances(student, data):
    model = copy.deepcopy(student)
    before = evaluate(model, data)
    bias0 = [b.expert_bias.clone() for _, b in moe_blocks(model)]
    result = train(model, data, _small(steps=12, eval_every=6), progress=False)
    assert [h["step"] for h in result.evals] == [6, 12]
    assert result.evals[-1]["eval_ppl"] < 0.8 * before
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert all(h["load_max_over_mean"] >= 1.0 for h in result.history)
    assert all(not torch.equal(b0, b.expert_bias) for b0, (_, b) in
               zip(bias0, moe_blocks(model)))  # DeepSeek-V3 bias balancing moved the biases
    assert student.layers[0].feed_forward.expert_bias.abs().sum() == 0  # source untouched


def test_resume_from_checkpoint_equals_uninterrupted_run(student, data, tmp_path):
    full = copy.deepcopy(student)
    config = _small(checkpoint_every=3, checkpoint_dir=str(tmp_path / "ck"))
    ref = train(full, data, config, progress=False)
    assert [p.split("/")[-1] for p in ref.checkpoints] == ["step_000003", "step_000006"]
    resumed = copy.deepcopy(student)
    torch.manual_seed(123)  # the RNG state comes from the checkpoint
    rest = train(resumed, data, config, resume=ref.checkpoints[0], progress=False)
    assert [h["step"] for h in rest.history] == [4, 5, 6]
    assert [h["loss"] for h in rest.history] == [h["loss"] for h in ref.history[3:]]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_keeps_tied_weights_tied(data, tmp_path):
    model = models.build_model("llama-tiny-tied", seed=1)
    assert model.output.weight is model.tok_embeddings.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train(model, data, _small(steps=2), optimizer=opt, progress=False)
    path = save_checkpoint(tmp_path / "ck", model, opt, 2, _small(steps=2))
    other = models.build_model("llama-tiny-tied", seed=2)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    assert load_checkpoint(path, other, opt2) == 2
    assert other.output.weight is other.tok_embeddings.weight
    assert torch.equal(other.output.weight, model.output.weight)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)


def test_distillation_from_an_identical_teacher_starts_at_zero(student, data):
    model = copy.deepcopy(student)
    teacher = copy.deepcopy(student).eval()
    result = train(model, data, _small(steps=1, distill=1.0), teacher=teacher, progress=False)
    assert result.history[0]["loss"] == pytest.approx(0.0, abs=1e-5)  # KL(p || p)
    assert result.history[0]["ce"] > 1.0


def test_moe_first_steps_train_only_the_moe_blocks(student, data):
    model = copy.deepcopy(student)
    moe_names = {n for n, _ in moe_blocks(model)}
    before = {k: v.clone() for k, v in model.named_parameters()}
    flags = []  # requires_grad is never flipped: DDP, built before train(), relies on it
    train(model, data, _small(steps=2, moe_first_steps=2), progress=False,
          log=lambda r: flags.append(all(p.requires_grad for p in model.parameters())))
    assert flags == [True, True]
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    in_moe = {k for k in before if any(k.startswith(m + ".") for m in moe_names)}
    assert changed and changed <= in_moe
    assert any(".router." in k for k in changed) and any(".w_up" in k for k in changed)
    outside = [p for k, p in model.named_parameters() if k not in in_moe]
    assert outside and all(p.grad is None for p in outside)  # AdamW skipped them


def test_train_changes_nothing_the_user_passes_but_the_students_weights(data):
    """Shared case 14: the teacher (the user's dense model, here in train mode with a part in
    eval mode and a frozen part) keeps its weights, modes, requires_grad, hooks, use_cache
    and grads through convert() and train(); the student's modes and requires_grad come back
    as they were. (Restoring only the root's flag used to put every submodule in its mode.)"""
    from rewriter.models.hf import build_hf

    teacher = build_hf("llama", seed=0)
    teacher.config.use_cache = True
    teacher.train()
    teacher.model.layers[0].eval()
    teacher.model.layers[1].mlp.requires_grad_(False)
    handle = teacher.model.norm.register_forward_hook(lambda *a: None)

    def state(m):
        return ({n: x.training for n, x in m.named_modules()},
                {n: (p.requires_grad, p.grad is None) for n, p in m.named_parameters()},
                sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules()))

    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    t0 = state(teacher)  # convert() and train() both leave it so
    student = rewriter.convert(teacher, moe=MoEConfig(num_experts=4, top_k=2))
    student.eval()
    student.model.layers[0].mlp.train()
    student.lm_head.requires_grad_(False)
    assert state(teacher) == t0
    s0 = state(student)
    s_weights = {k: v.clone() for k, v in student.state_dict().items()}
    ids = torch.randint(1, 256, (2000,), generator=torch.Generator().manual_seed(0))
    hf_data = TextData(ids[:1600], ids[1600:].reshape(-1, 50)[:4], hf=True)
    train(student, hf_data, _small(steps=2, batch_size=2, seq_len=32, distill=0.5),
          teacher=teacher, progress=False)
    assert state(teacher) == t0 and teacher.config.use_cache is True
    assert t0[0][""] and not t0[0]["model.layers.0"]  # the mixed modes asserted above
    assert all(torch.equal(v, weights[k]) for k, v in teacher.state_dict().items())
    modes, grads, hooks = state(student)
    assert modes == s0[0] and hooks == s0[2]
    assert {n: g[0] for n, g in grads.items()} == {n: g[0] for n, g in s0[1].items()}
    assert not torch.equal(student.state_dict()["model.layers.0.mlp.w_up"],
                           s_weights["model.layers.0.mlp.w_up"])  # the student did train
    handle.remove()


def test_bad_training_input_raises_before_anything_changes(student, data, tmp_path):
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="TrainConfig.distill"):
        TrainConfig(distill=1.5)
    with pytest.raises(ValueError, match="TrainConfig.checkpoint_dir"):
        TrainConfig(checkpoint_every=2)
    with pytest.raises(ValueError, match="TrainConfig.train_part"):
        TrainConfig(train_part="head")
    model = copy.deepcopy(student)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match="teacher"):
        train(model, data, _small(distill=0.5))
    with pytest.raises(InputError, match="vocab_size"):
        wide = TextData(data.train_ids + 300, data.eval_ids)
        train(model, wide, _small())
    with pytest.raises(InputError, match="no model.safetensors"):
        train(model, data, _small(), resume=tmp_path / "missing")
    with pytest.raises(InputError, match="MoE blocks"):
        train(models.build_model("gpt-tiny"), data, _small(train_part="moe"))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
