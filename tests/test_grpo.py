"""GRPO objective and training loop."""
import math

import pytest
import torch

import train_grpo as G


def reference_loss(logp, old, ref, adv, mask, beta, eps, token_mean):
    """The objective written element by element, as plainly as possible."""
    R, L = len(logp), len(logp[0])
    seq_means, tok_sum, tok_n = [], 0.0, 0
    for i in range(R):
        terms = []
        for t in range(L):
            if mask[i][t] == 0:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            a = adv[i]
            clipped = min(max(rho, 1 - eps), 1 + eps)
            term = -min(rho * a, clipped * a)
            if beta:
                d = ref[i][t] - logp[i][t]
                term += beta * (math.exp(d) - d - 1)
            terms.append(term)
        seq_means.append(sum(terms) / max(len(terms), 1))
        tok_sum += sum(terms)
        tok_n += len(terms)
    return tok_sum / tok_n if token_mean else sum(seq_means) / R


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("token_mean", [False, True])
@pytest.mark.parametrize("spread", [0.05, 0.6])  # ratios near 1 (no clipping) and far from it (clipping)
def test_loss_equals_elementwise_computation(beta, token_mean, spread):
    g = torch.Generator().manual_seed(int(spread * 100) + int(beta * 1000) + token_mean)
    R, L = 6, 9
    logp = -torch.rand(R, L, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(R, L, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(R, L, generator=g, dtype=torch.float64)
    adv = torch.randn(R, generator=g, dtype=torch.float64)
    lengths = [9, 1, 4, 7, 2, 9]  # ragged completions
    mask = torch.tensor([[1.0] * n + [0.0] * (L - n) for n in lengths], dtype=torch.float64)
    loss, stats = G.grpo_loss(logp, old, ref, adv, mask, beta, 0.2, token_mean)
    want = reference_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), beta, 0.2,
                          token_mean)
    assert abs(loss.item() - want) < 1e-12
    if spread > 0.5:
        assert stats["clip_frac"] > 0.1
    else:
        assert stats["clip_frac"] == 0.0


def test_first_iteration_gradient_is_advantage_weighted_log_likelihood():
    """mu = 1, beta = 0: rho = 1, and the gradient is that of -mean_i A_i mean_t log pi."""
    torch.manual_seed(0)
    R, L, V = 5, 7, 11
    logits = torch.randn(R, L, V, requires_grad=True)
    tokens = torch.randint(0, V, (R, L))
    mask = torch.ones(R, L)
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    adv = torch.randn(R)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    loss, _ = G.grpo_loss(logp, logp.detach(), None, adv, mask, 0.0, 0.2)
    (g1,) = torch.autograd.grad(loss, logits)
    logp2 = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    plain = -(adv * (logp2 * mask).sum(-1) / mask.sum(-1)).mean()
    (g2,) = torch.autograd.grad(plain, logits)
    assert torch.allclose(g1, g2, atol=1e-7) and g1.abs().sum() > 0


def test_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = -torch.rand(3, 4)
    mask = torch.ones(3, 4)
    _, s = G.grpo_loss(logp, logp, logp.clone(), torch.zeros(3), mask, 0.1, 0.2)
    assert s["kl"] == 0.0
    _, s = G.grpo_loss(logp, logp, logp + 0.3, torch.zeros(3), mask, 0.1, 0.2)
    assert s["kl"] > 0


def test_equal_rewards_give_no_policy_gradient():
    adv = G.group_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0]), 4)
    assert torch.equal(adv[:4], torch.zeros(4)) and adv[4:].abs().sum() > 0
    logits = torch.randn(8, 3, 5, requires_grad=True)
    logp = torch.log_softmax(logits, -1)[..., 0]
    loss, _ = G.grpo_loss(logp, logp.detach(), None, adv, torch.ones(8, 3), 0.0, 0.2)
    (g,) = torch.autograd.grad(loss, logits)
    assert g[:4].abs().max() == 0 and g[4:].abs().max() > 0


def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 10.0, 20.0, 20.0])
    a = G.group_advantages(r, 4)
    for grp in (a[:4], a[4:]):
        assert abs(float(grp.mean())) < 1e-6
        assert abs(float(grp.std()) - 1.0) < 1e-3
    raw = G.group_advantages(r, 4, scale_std=False)
    assert torch.allclose(raw, torch.tensor([-1.5, -0.5, 0.5, 1.5, -5, -5, 5, 5]))


def test_completion_mask_ends_at_the_first_eos():
    toks = torch.tensor([[5, 6, 9, 7, 9], [5, 5, 5, 5, 5], [9, 0, 0, 0, 0]])
    mask, trunc = G.completion_mask(toks, [9])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert trunc.tolist() == [False, True, False]
