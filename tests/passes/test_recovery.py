"""passes/recovery.py: the dense teacher inside each block, block-wise distillation that lowers
the held-out error, leaves everything else untouched, and validates its inputs."""

import copy

import pytest
import torch
import transformers
from rewriter.models.moe import MoEFFN
from rewriter.passes.recovery import FEW_SEQUENCES, dense_output

from rewriter import (
    InputError,
    MoEConfig,
    RecoveryConfig,
    conversion_info,
    convert,
    models,
    recover,
)
from tests._zoo import FORMS, form_inputs

# these tiny models train on a few dozen sequences on purpose: the warning is tested once below
pytestmark = pytest.mark.filterwarnings("ignore:recover. training on")


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _hf_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=40, intermediate_size=120,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights of a trained scale: routing then matters
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def _text(n, seq=13, seed=5):
    """Token ids with structure (a repeating walk), not uniform noise."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(1, 6, (n, seq), generator=g)
    return (steps.cumsum(1) + torch.randint(0, 97, (n, 1), generator=g)) % 97


def _calib(n=48, seq=13, batch=6, seed=5):
    ids = _text(n, seq, seed)
    return [{"input_ids": ids[i:i + batch]} for i in range(0, n, batch)]


def test_dense_output_is_the_ffn_the_block_was_cut_from():
    """Right after conversion (top_k < E: the block itself drops experts), the teacher equals
    the source model's MLP on fresh inputs, float64, odd shapes; the block's own output does
    not."""
    model = _hf_llama().double()
    out = convert(model, moe=MoEConfig(num_experts=6, top_k=2, shared_width=24),
                  example_inputs={"input_ids": _text(2, 9)})
    x = torch.randn(3, 7, 40, dtype=torch.float64)
    for i, layer in enumerate(out.model.layers):
        block = layer.mlp
        assert isinstance(block, MoEFFN)
        reference = model.model.layers[i].mlp(x)
        assert _rel(dense_output(block, x), reference) < 1e-12
        assert _rel(block(x), reference) > 1e-3  # 2 of 6 routed experts: not the dense FFN


def test_recover_lowers_the_held_out_error_and_touches_nothing_else():
    model = _hf_llama()
    moe = convert(model, moe=MoEConfig(num_experts=6, top_k=2, shared_width=24),
                  example_inputs={"input_ids": _text(2, 9)})
    moe.train()  # the user's mode comes back
    others = {n: p.detach().clone() for n, p in moe.named_parameters() if ".mlp." not in n}
    buffers = {n: b.detach().clone() for n, b in moe.named_buffers() if "last_load" not in n}
    flags = {n: p.requires_grad for n, p in moe.named_parameters()}
    routers = {n: p.detach().clone() for n, p in moe.named_parameters() if "router" in n}
    report = recover(moe, _calib(), RecoveryConfig(lr=3e-3, epochs=4, batch_size=6, logit_steps=0),
                     progress=False)
    assert report.blocks == 2 and report.sequences == 43 and report.steps == 4 * 8
    assert report.tokens == 4 * 43 * 13
    assert report.after < 0.8 * report.before  # held out: the last 5 sequences
    assert len(report.per_block) == 2 and all(a < b for _, b, a in report.per_block)
    assert moe.training
    for n, p in moe.named_parameters():
        assert p.requires_grad == flags[n]
        if n in others:
            assert torch.equal(p, others[n]), n
    for n, b in moe.named_buffers():
        if n in buffers:  # expert_bias: balancing state, not trained here
            assert torch.equal(b, buffers[n]), n
    assert any(not torch.equal(p, routers[n]) for n, p in moe.named_parameters()
               if n in routers)
    # the whole model got closer to the dense one on text it did not train on
    fresh = _text(4, 11, seed=9)
    with torch.no_grad():
        dense_logits = model(input_ids=fresh).logits
        before = convert(model, moe=MoEConfig(num_experts=6, top_k=2, shared_width=24),
                         example_inputs={"input_ids": _text(2, 9)})
        assert _rel(moe(input_ids=fresh).logits, dense_logits) < _rel(
            before(input_ids=fresh).logits, dense_logits)


@pytest.mark.parametrize("part", ["router", "experts"])
def test_recover_trains_only_the_part_asked_for(part):
    moe = convert(_hf_llama(1), moe=MoEConfig(num_experts=4, top_k=1),
                  example_inputs={"input_ids": _text(2, 9)})
    start = {n: p.detach().clone() for n, p in moe.named_parameters()}
    recover(moe, _calib(12), RecoveryConfig(train=part, lr=1e-2, holdout=0.0, logit_steps=0),
            progress=False)
    changed = {n for n, p in moe.named_parameters() if not torch.equal(p, start[n])}
    assert changed
    assert all((".router." in n) == (part == "router") for n in changed), changed


def test_recover_errors_name_the_problem():
    dense = models.build_model("llama-tiny", seed=0)
    with pytest.raises(InputError, match="no MoE block"):
        recover(dense, [(torch.randint(0, 256, (2, 9)),)], teacher=dense)
    moe = convert(_hf_llama(), moe=MoEConfig(num_experts=4, top_k=1),
                  example_inputs={"input_ids": _text(2, 9)})
    with pytest.raises(InputError, match="no calibration batches"):
        recover(moe, [], RecoveryConfig(logit_steps=0))
    start = {n: p.detach().clone() for n, p in moe.named_parameters()}
    with pytest.raises(InputError, match="calibration batch 1: example input input_ids must "
                                         "be a tensor"):
        recover(moe, [{"input_ids": _text(4, 5)}, {"input_ids": "some text"}],
                RecoveryConfig(logit_steps=0))
    assert all(torch.equal(p, start[n]) for n, p in moe.named_parameters())
    with pytest.warns(UserWarning, match=f"training on {FEW_SEQUENCES - 1} sequences only"):
        recover(moe, [{"input_ids": _text(FEW_SEQUENCES, 5)}],
                RecoveryConfig(holdout=0.0, sequences=FEW_SEQUENCES - 1, logit_steps=0))
    for field, value in (("sequences", 0), ("lr", 0.0), ("train", "head"), ("holdout", 0.9),
                         ("epochs", 1.5)):
        with pytest.raises(InputError, match=f"RecoveryConfig.{field}"):
            RecoveryConfig(**{field: value})


def test_convert_recovery_in_both_modes_and_its_errors():
    model = _hf_llama(2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = MoEConfig(num_experts=6, top_k=2, shared_width=24)
    example = {"input_ids": _text(2, 9)}
    calib = _calib()
    plain = convert(model, moe=cfg, example_inputs=example, calibration=calib)
    fresh = {"input_ids": _text(3, 10, seed=11)}
    with torch.no_grad():
        dense = model(**fresh).logits
        plain_rel = _rel(plain(**fresh).logits, dense)
    for mode in ("module", "graph"):
        out = convert(model, moe=cfg, example_inputs=example, calibration=calib, mode=mode,
                      recovery=RecoveryConfig(lr=3e-3, epochs=3, batch_size=6, logit_steps=0))
        rec = conversion_info(out).recovery
        assert rec["blocks"] == 2 and rec["after"] < rec["before"]
        with torch.no_grad():
            got = out(**fresh)
            got = got.logits if hasattr(got, "logits") else got[0]
        assert _rel(got, dense) < plain_rel, mode
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert conversion_info(plain).recovery is None
    with pytest.raises(InputError, match="calibration=batches"):
        convert(model, moe=cfg, example_inputs=example, recovery=True)
    with pytest.raises(InputError, match="trains MoE blocks"):
        from rewriter import FP8Config
        convert(model, fp8=FP8Config(), example_inputs=example, calibration=calib,
                recovery=True)
    with pytest.raises(InputError, match="recovery must be"):
        convert(model, moe=cfg, example_inputs=example, calibration=calib, recovery="yes")


def test_a_block_training_made_worse_is_put_back():
    """A learning rate far too large: every block ends worse on the held-out sequences, so
    every block is restored bit for bit and the report says so."""
    moe = convert(_hf_llama(3), moe=MoEConfig(num_experts=4, top_k=1),
                  example_inputs={"input_ids": _text(2, 9)})
    start = {n: p.detach().clone() for n, p in moe.named_parameters()}
    report = recover(moe, _calib(24), RecoveryConfig(lr=5.0, batch_size=4, logit_steps=0),
                     progress=False)
    assert report.restored == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert report.after == pytest.approx(report.before, rel=1e-6)
    assert all(torch.equal(p, start[n]) for n, p in moe.named_parameters())


def test_logit_phase_lowers_the_held_out_kl_and_needs_the_dense_model():
    model = _hf_llama(4)
    cfg = MoEConfig(num_experts=6, top_k=1, shared_width=24)
    moe = convert(model, moe=cfg, example_inputs={"input_ids": _text(2, 9)})
    with pytest.raises(InputError, match="teacher=dense_model"):
        recover(moe, _calib(), RecoveryConfig(logit_steps=2))
    model.train()  # the teacher runs in eval mode and gets its own mode back
    report = recover(moe, _calib(), RecoveryConfig(lr=1e-3, logit_steps=24, logit_lr=3e-3,
                                                   batch_size=6), teacher=model,
                     progress=False)
    assert all(m.training for m in model.modules())
    model.eval()
    kl_before, kl_after = report.logit_kl
    assert report.logit_kept and 0 < kl_after < kl_before
    # far too large a step: the logit phase is undone, the block phase's result stays
    moe2 = convert(model, moe=cfg, example_inputs={"input_ids": _text(2, 9)})
    first = recover(moe2, _calib(), RecoveryConfig(lr=1e-3, batch_size=6, logit_steps=0),
                    progress=False)
    moe3 = convert(model, moe=cfg, example_inputs={"input_ids": _text(2, 9)})
    both = recover(moe3, _calib(), RecoveryConfig(lr=1e-3, batch_size=6, logit_steps=6,
                                                  logit_lr=10.0), teacher=model,
                   progress=False)
    assert both.logit_kept is False and both.logit_kl[1] == both.logit_kl[0]
    assert both.after == pytest.approx(first.after, rel=1e-6)
    for p2, p3 in zip(moe2.parameters(), moe3.parameters()):
        torch.testing.assert_close(p2, p3, rtol=1e-6, atol=1e-7)
    with pytest.raises(InputError, match="RecoveryConfig.logit_lr"):
        RecoveryConfig(logit_lr=0)


def test_convert_inplace_with_the_logit_phase_distils_from_the_model_as_given():
    """inplace=True swaps the blocks into the user's model: the logit phase's teacher is the
    model as given (a copy), so the result equals the same conversion made on a copy."""
    model, same = _hf_llama(5), _hf_llama(5)
    kw = dict(moe=MoEConfig(num_experts=6, top_k=1, shared_width=24),
              example_inputs={"input_ids": _text(2, 9)}, calibration=_calib(),
              recovery=RecoveryConfig(logit_steps=12, logit_lr=3e-3, batch_size=6))
    out = convert(model, inplace=True, **kw)
    copied = convert(same, **kw)
    assert out is model
    rec = conversion_info(out).recovery
    assert rec["logit_kept"] and rec["logit_kl"][1] < rec["logit_kl"][0]
    assert rec["logit_kl"] == conversion_info(copied).recovery["logit_kl"]
    fresh = {"input_ids": _text(3, 10, seed=12)}
    with torch.no_grad():
        torch.testing.assert_close(out(**fresh).logits, copied(**fresh).logits)


def test_an_ffn_called_twice_is_recovered_as_one_block():
    """A looped FFN (one block, called twice per forward): its held-out error is the mean
    over its calls, and training lowers it, in both modes."""
    form = next(f for f in FORMS if f.name == "looped")
    torch.manual_seed(6)
    model = form.build().eval()
    calib = [(form_inputs(form, 6, 9, seed=s),) for s in range(10)]
    for mode in ("module", "graph"):
        out = convert(model, moe=MoEConfig(num_experts=3, top_k=1), mode=mode,
                      example_inputs=(form_inputs(form, 2, 5),), calibration=calib,
                      recovery=RecoveryConfig(lr=3e-3, epochs=3, batch_size=6,
                                              logit_steps=0))
        rec = conversion_info(out).recovery
        assert rec["blocks"] == 2 and len(rec["per_block"]) == 2, mode
        assert rec["after"] < rec["before"], mode


def _hf_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=40, intermediate_size=120,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=32)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def test_output_phase_of_an_encoder_is_the_relative_error_of_its_real_positions():
    """An encoder's output is hidden states, not next-token logits: the output phase trains on
    their relative squared error over the real (unpadded) positions, lowers it on held-out
    sequences, and reports it in ``logit_kl``."""
    from rewriter.passes.recovery import _kl

    model = _hf_bert(2)
    ids = _text(48, 13, seed=7)
    mask = torch.ones_like(ids)
    mask[::3, 9:] = 0  # a third of the sequences padded after 9 tokens
    calib = [{"input_ids": ids[i:i + 6], "attention_mask": mask[i:i + 6]}
             for i in range(0, 48, 6)]
    moe = convert(model, moe=MoEConfig(num_experts=6, top_k=2, shared_width=24),
                  example_inputs=calib[0])
    batch = ((), calib[0])
    with torch.no_grad():
        y = moe(**calib[0]).last_hidden_state
        t = model(**calib[0]).last_hidden_state
        keep = calib[0]["attention_mask"].unsqueeze(-1).to(y)
        want = ((y - t) * keep).pow(2).sum() / (t * keep).pow(2).sum()
        assert float(_kl(moe, model, batch)) == pytest.approx(float(want), rel=1e-5)
        # a padded position's output does not count
        other = dict(calib[0], input_ids=calib[0]["input_ids"].clone())
        other["input_ids"][0, 10:] = 3  # only padded positions of row 0 change
        assert float(_kl(moe, model, ((), other))) == pytest.approx(float(want), rel=1e-4)
    report = recover(moe, calib, RecoveryConfig(lr=1e-3, logit_steps=16, logit_lr=3e-3,
                                                batch_size=6), teacher=model, progress=False)
    before, after = report.logit_kl
    assert report.logit_kept and 0 < after < before


# ---------------------------------------------------------------- padding (DESIGN.md inv. 7)
# Padded positions (attention_mask == 0) are not calibration data: no loss, held-out error or
# token count of recovery may read them.

_LENGTHS = (13, 4, 9, 0, 11, 6, 13, 2, 8, 10, 5, 12, 7, 13, 3, 9, 1, 11)  # 0: an empty row


def _padded(pad_id, left, lengths=_LENGTHS, seq=13, batch=6):
    """Batches of the walk text with lengths[i] real tokens in row i, the rest padded with
    ``pad_id`` (on the left or the right); the real tokens do not depend on the padding."""
    text = _text(len(lengths), seq, seed=8)
    ids = torch.full_like(text, pad_id)
    mask = torch.zeros_like(text)
    for i, n in enumerate(lengths):
        cols = slice(seq - n, seq) if left else slice(0, n)
        ids[i, cols], mask[i, cols] = text[i, :n], 1
    return [{"input_ids": ids[i:i + batch], "attention_mask": mask[i:i + batch]}
            for i in range(0, len(lengths), batch)]


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
def test_recovery_does_not_read_padded_positions(left):
    """Two calibration sets with the same real tokens and mask, differing only in the token id
    at padded positions: bit-identical recovered blocks (block and logit phase) and reports;
    ``tokens`` counts the real training positions; a row with none is no sequence."""
    model = _hf_llama(6)
    cfg = MoEConfig(num_experts=4, top_k=2, gate="softmax", shared_width=16)
    rc = RecoveryConfig(lr=3e-3, epochs=2, batch_size=4, holdout=0.25, logit_steps=3,
                        logit_lr=3e-3)
    converted = convert(model, moe=cfg, example_inputs={"input_ids": _text(2, 9)})
    start = {k: v.clone() for k, v in converted.state_dict().items()}
    results = []
    for pad_id in (0, 7):
        moe = copy.deepcopy(converted)
        report = recover(moe, _padded(pad_id, left), rc, teacher=model, progress=False)
        results.append((moe.state_dict(), report))
    (sa, ra), (sb, rb) = results
    real = [n for n in _LENGTHS if n]  # 17 sequences with real tokens: 4 held out, 13 trained
    assert ra.sequences == 13 and ra.steps == 2 * 4
    assert ra.tokens == rb.tokens == 2 * sum(real[:13])
    assert ra.before is not None and ra.after < ra.before  # the training did something
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert any(not torch.equal(sa[k], v) for k, v in start.items())  # ... and trained
    assert (ra.before, ra.after, ra.per_block, ra.history, ra.restored, ra.logit_kl) == \
        (rb.before, rb.after, rb.per_block, rb.history, rb.restored, rb.logit_kl)


class _OneBlock(torch.nn.Module):
    """features (B, T, d) -> block; ``flat``: the block is fed the tokens as (B*T, d)."""

    def __init__(self, block, flat):
        super().__init__()
        self.block, self.flat = block, flat

    def forward(self, x, attention_mask=None):
        if self.flat:
            return self.block(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        return self.block(x)


@pytest.mark.parametrize("flat", [False, True], ids=["BTd", "flat"])
def test_masked_block_loss_equals_a_float64_reference(flat):
    """The block phase's loss on a batch: sum over the real positions of the squared error
    over the sum there of the squared dense output, in value and gradient, against float64
    arithmetic written out here (odd shapes, rows padded left, right, fully, not at all)."""
    from rewriter.passes.recovery import _Taps

    torch.manual_seed(3)
    B, T, d = 4, 7, 11
    block = MoEFFN(d, 5, 3, 2, shared_dim=3, gate="softmax", bias=True, dtype=torch.float64)
    teacher = MoEFFN(d, 5, 3, 2, shared_dim=3, gate="softmax", bias=True, dtype=torch.float64)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        for p, q in zip(teacher.parameters(), block.parameters()):
            p.copy_(q + 0.1 * torch.randn_like(q))
    x = torch.randn(B, T, d, dtype=torch.float64) * 2 + 0.5
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0],   # right-padded
                         [0, 0, 0, 1, 1, 1, 1],   # left-padded
                         [0, 0, 0, 0, 0, 0, 0],   # no real position
                         [1, 1, 1, 1, 1, 1, 1]])
    taps = _Taps([("block", block)], [teacher])
    try:
        model = _OneBlock(block, flat)
        with torch.enable_grad():
            taps.run(model, ((), {"x": x, "attention_mask": mask}))
            (index, loss), = taps.take()
            grads = torch.autograd.grad(loss, [block.w_up, block.router.weight])
        # a padded input changed anywhere, a row of padding too: the loss does not move
        other = torch.where(mask.bool().unsqueeze(-1), x, torch.full_like(x, 1e3))
        with torch.no_grad():
            taps.run(model, ((), {"x": other, "attention_mask": mask}))
            (_, same), = taps.take()
            # a batch without a real position records no loss
            taps.run(model, ((), {"x": x, "attention_mask": torch.zeros_like(mask)}))
            assert taps.take() == []
    finally:
        taps.remove()
    assert index == 0 and torch.equal(same, loss.detach())

    num = den = torch.zeros((), dtype=torch.float64)
    with torch.enable_grad():
        for b in range(B):
            for t in range(T):
                if mask[b, t]:
                    y = block(x[b, t][None])[0]
                    target = dense_output(teacher, x[b, t][None])[0].detach()
                    num = num + ((y - target) ** 2).sum()
                    den = den + (target ** 2).sum()
        want = num / den
        want_grads = torch.autograd.grad(want, [block.w_up, block.router.weight])
    want = want.detach()
    assert float(want) > 1e-3
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-9)


def test_logit_phase_kl_is_the_mean_over_real_positions():
    """The logit phase's loss on language-model logits: KL(dense || model) summed over the
    vocabulary, averaged over the real positions only (float64 reference written out)."""
    from rewriter.passes.recovery import _kl

    model = _hf_llama(7).double()
    moe = convert(model, moe=MoEConfig(num_experts=4, top_k=1),
                  example_inputs={"input_ids": _text(2, 9)})
    batch = _padded(5, left=False, lengths=(9, 4, 0, 6), seq=9)[0]
    with torch.no_grad():
        got = float(_kl(moe, model, ((), batch)))
        logq = torch.log_softmax(moe(**batch).logits.double(), -1)
        logp = torch.log_softmax(model(**batch).logits.double(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T)
        real = batch["attention_mask"].bool()
        want = float(kl[real].sum() / real.sum())
        other = dict(batch, input_ids=batch["input_ids"].masked_fill(~real, 11))
        assert float(_kl(moe, model, ((), other))) == got
        assert float(kl.mean()) != pytest.approx(want, rel=1e-3)  # padding would show
    assert got == pytest.approx(want, rel=1e-5)
