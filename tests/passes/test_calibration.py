import pytest
import torch
from rewriter.passes.calibration import COACTIVE_FRACTION, calibrate, stats_for

from rewriter import InputError, capture, find_ffns, models


@pytest.fixture(scope="module")
def llama():
    model = models.build_model("llama-tiny", seed=2)
    gm = capture(model, models.example_inputs(model, 2, 7))
    return model, gm, find_ffns(gm)


def _reference(model, batches):
    """h = input of each down projection (w2), x = input of w1, via plain module hooks."""
    hs, xs = {i: [] for i in range(2)}, {i: [] for i in range(2)}
    handles = []
    for i, layer in enumerate(model.layers):
        ff = layer.feed_forward
        handles.append(ff.w2.register_forward_pre_hook(
            lambda mod, args, i=i: hs[i].append(args[0].reshape(-1, args[0].shape[-1]))))
        handles.append(ff.w1.register_forward_pre_hook(
            lambda mod, args, i=i: xs[i].append(args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        for (b,) in batches:
            model(b)
    for h in handles:
        h.remove()
    return {i: torch.cat(hs[i]) for i in hs}, {i: torch.cat(xs[i]) for i in xs}


def test_statistics_equal_module_hook_reference(llama):
    model, gm, ffns = llama
    batches = [models.example_inputs(model, 3, 9, seed=s) for s in range(3)]
    stats = calibrate(gm, batches, ffns=ffns, max_tokens=50)
    h_ref, x_ref = _reference(model, batches)
    assert stats.tokens == 81 and stats.batches == 3
    for i, m in enumerate(ffns):
        s = stats_for(stats, m)
        torch.testing.assert_close(s.mean_abs, h_ref[i].abs().mean(0).double(), rtol=1e-6,
                                   atol=1e-9)
        a = h_ref[i].abs()
        k = round(COACTIVE_FRACTION * m.d_ff)
        active = (a >= a.topk(k, dim=1).values[:, -1:]).float()
        torch.testing.assert_close(s.coactivation, active.T @ active / 81)
        assert s.sample_x.shape == (50, m.d_model) and s.sample_h.shape == (50, m.d_ff)
        # reservoir rows are real (x, h) pairs of the same tokens
        idx = [(x_ref[i] == row).all(1).nonzero()[0, 0].item() for row in s.sample_x[:5]]
        torch.testing.assert_close(s.sample_h[:5], h_ref[i][idx])


def test_memory_is_bounded_by_max_tokens(llama):
    model, gm, ffns = llama
    batches = [models.example_inputs(model, 4, 16, seed=s) for s in range(6)]
    stats = calibrate(gm, batches, ffns=ffns, max_tokens=32)
    assert stats.tokens == 384
    assert all(s.sample_x.shape[0] == 32 for s in stats.per_ffn.values())


def test_bad_batches_are_named(llama):
    model, gm, ffns = llama
    with pytest.raises(InputError, match="calibration is empty"):
        calibrate(gm, [], ffns=ffns)
    with pytest.raises(InputError, match="calibration batch 1: input args.0. is torch.float32, "
                                         "but the model was captured with torch.int64"):
        calibrate(gm, [models.example_inputs(model, 2, 5), (torch.rand(2, 5),)], ffns=ffns)
    with pytest.raises(InputError, match="calibration batch 1 cannot run"):
        calibrate(gm, [models.example_inputs(model, 2, 5), (torch.ones(2, 5, 3).long(),)],
                  ffns=ffns)
    with pytest.raises(InputError, match="calibration batch 0"):
        calibrate(gm, ["text"], ffns=ffns)
    with pytest.raises(ValueError, match="max_tokens"):
        calibrate(gm, [models.example_inputs(model, 2, 5)], max_tokens=0)


def test_sensitivity_gradients_equal_module_hook_reference(llama):
    """sample_g = dL/d(FFN output) for the Fisher loss, checked against autograd on the user's
    model with a zero leaf added to each FeedForward's output; no parameter gets a .grad."""
    from rewriter.passes.calibration import fisher_loss

    model, gm, ffns = llama
    batches = [models.example_inputs(model, 3, 11, seed=s) for s in range(2)]
    stats = calibrate(gm, batches, ffns=ffns, max_tokens=1000, sensitivity=True, seed=5)
    assert all(p.grad is None for p in model.parameters())

    labels = torch.Generator().manual_seed(5 + 1)  # calibrate's label generator: seed + 1
    xs, gs = {i: [] for i in range(2)}, {i: [] for i in range(2)}
    for (b,) in batches:
        leaves, handles = {}, []
        for i, layer in enumerate(model.layers):
            def add_leaf(mod, args, out, i=i, leaves=leaves):
                xs[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))
                leaves[i] = torch.zeros_like(out, requires_grad=True)
                return out + leaves[i]
            handles.append(layer.feed_forward.register_forward_hook(add_leaf))
        loss = fisher_loss(model(b), labels)
        grads = torch.autograd.grad(loss, [leaves[0], leaves[1]])
        for h in handles:
            h.remove()
        for i, g in enumerate(grads):
            gs[i].append(g.reshape(-1, g.shape[-1]))
    for i, m in enumerate(ffns):
        s = stats_for(stats, m)
        x_ref, g_ref = torch.cat(xs[i]), torch.cat(gs[i])
        assert s.sample_g.shape == (66, m.d_model) and g_ref.abs().max() > 0
        idx = [(x_ref == row).all(1).nonzero()[0, 0].item() for row in s.sample_x]
        assert sorted(idx) == list(range(66))
        torch.testing.assert_close(s.sample_g, g_ref[idx], rtol=1e-4, atol=1e-6)


def test_sensitivity_needs_logits(llama):
    from rewriter.passes.calibration import fisher_loss

    with pytest.raises(InputError, match="logits"):
        fisher_loss({"ids": torch.ones(3, dtype=torch.long)}, torch.Generator())


# ------------------------------------------------------------------ padding (attention_mask)


@pytest.fixture(scope="module")
def padded_hf():
    """A tiny HF llama; 4 real sequences of 12 tokens, and the same left-padded to 20 with an
    attention_mask (40% padding). RoPE is relative, so real tokens see the same attention."""
    from rewriter.models.hf import build_hf

    model = build_hf("llama", seed=0)
    real = torch.randint(3, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    padded = torch.zeros(4, 20, dtype=torch.long)
    padded[:, 8:] = real
    mask = torch.zeros_like(padded)
    mask[:, 8:] = 1
    clean = [{"input_ids": real[i:i + 2], "attention_mask": torch.ones(2, 12, dtype=torch.long)}
             for i in (0, 2)]
    pad = [{"input_ids": padded[i:i + 2], "attention_mask": mask[i:i + 2]} for i in (0, 2)]
    gm_clean, gm_pad = capture(model, clean[0]), capture(model, pad[0])
    return model, gm_clean, gm_pad, clean, pad


@pytest.mark.parametrize("sensitivity", [False, True])
def test_padded_positions_are_not_calibration_data(padded_hf, sensitivity):
    """Left-padded batches with attention_mask give the statistics of the real tokens alone:
    token count, per-neuron means, co-activation and the sampled x, h (and Fisher g)."""
    model, gm_clean, gm_pad, clean, pad = padded_hf
    ref = calibrate(gm_clean, clean, sensitivity=sensitivity, seed=3)
    got = calibrate(gm_pad, pad, sensitivity=sensitivity, seed=3)
    assert got.tokens == ref.tokens == 48  # 4 x 12 real tokens, not 4 x 20
    for m in find_ffns(gm_pad):
        a, b = stats_for(got, m), stats_for(ref, m)
        assert a.tokens == 48
        torch.testing.assert_close(a.mean_abs, b.mean_abs, rtol=1e-4, atol=1e-6)
        assert (a.coact - b.coact).abs().sum() <= 0.01 * b.coact.sum()  # threshold ties only
        torch.testing.assert_close(a.sample_x, b.sample_x, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.sample_h, b.sample_h, rtol=1e-4, atol=1e-5)
        if sensitivity:
            assert b.sample_g.abs().max() > 0
            torch.testing.assert_close(a.sample_g, b.sample_g, rtol=1e-3, atol=1e-6)
    # without the mask, the padding would have counted: 80 tokens per FFN
    unmasked = calibrate(gm_pad, [{"input_ids": b["input_ids"],
                                   "attention_mask": torch.ones_like(b["attention_mask"])}
                                  for b in pad], seed=3)
    assert unmasked.tokens == 80


def test_fisher_loss_ignores_padded_positions():
    from rewriter.passes.calibration import fisher_loss

    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    got = fisher_loss(logits, torch.Generator().manual_seed(4), mask)
    real = logits.reshape(-1, 7)[mask.reshape(-1) == 1]  # (8, 7)
    labels = torch.multinomial(real.softmax(-1), 1,
                               generator=torch.Generator().manual_seed(4)).squeeze(1)
    want = torch.nn.functional.cross_entropy(real, labels, reduction="sum")
    assert torch.equal(got, want)
    with pytest.raises(InputError, match="attention_mask has 6 positions"):
        fisher_loss(logits, torch.Generator(), torch.ones(2, 3))


def test_attention_mask_needs_a_graph_captured_with_one(padded_hf):
    model, gm_clean, gm_pad, clean, pad = padded_hf
    gm_ids = capture(model, {"input_ids": pad[0]["input_ids"]})
    with pytest.raises(InputError, match="batch 0 has an attention_mask but the model was "
                                         "captured without one"):
        calibrate(gm_ids, pad)
    with pytest.raises(InputError, match="attention_mask must be a"):
        calibrate(gm_pad, [{"input_ids": pad[0]["input_ids"], "attention_mask": [1, 0]}])
