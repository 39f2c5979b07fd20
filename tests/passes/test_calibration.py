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
    with pytest.raises(InputError, match="calibration batch 1 cannot run"):
        calibrate(gm, [models.example_inputs(model, 2, 5), (torch.rand(2, 5),)], ffns=ffns)
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
