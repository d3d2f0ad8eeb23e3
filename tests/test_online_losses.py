"""RLOO and GRPO (losses.py, online section) checked against hand arithmetic, and their ONLINE_LOSSES entries.

    python -m pytest tests/test_online_losses.py -q
"""
import pytest
import torch

import losses


def test_rloo_advantages_by_hand_and_sum_to_zero():
    rewards = torch.tensor([[1.0, 0.0, 0.5], [2.0, 2.0, 5.0]])
    # prompt 0: 1 - (0 + .5)/2 = .75;  0 - (1 + .5)/2 = -.75;  .5 - (1 + 0)/2 = 0
    # prompt 1: 2 - (2 + 5)/2 = -1.5 (twice);  5 - (2 + 2)/2 = 3
    want = torch.tensor([[0.75, -0.75, 0.0], [-1.5, -1.5, 3.0]])
    a = losses.rloo_advantages(rewards)
    assert torch.allclose(a, want)
    assert torch.allclose(a.sum(-1), torch.zeros(2))


def one_token_each(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] sequence log-probs as [B, 2] per-token ones (the first position is prompt, masked) and their mask."""
    return torch.stack([torch.full_like(logps, 9.0), logps], -1), torch.tensor([[0, 1]] * len(logps))


def test_rloo_equal_rewards_give_zero_gradient():
    logps = torch.randn(6, requires_grad=True)
    loss, stats = losses.rloo_loss(*one_token_each(logps), torch.full((2, 3), 0.7), beta=0.05)
    loss.backward()
    assert torch.all(stats["advantages"] == 0) and torch.all(logps.grad == 0)


def test_rloo_loss_and_kl_penalty_by_hand():
    logps = torch.tensor([-1.0, -2.0], requires_grad=True)
    rewards = torch.tensor([[1.0, 0.0]])
    tokens, mask = one_token_each(logps)
    ref = torch.tensor([[5.0, -1.0], [5.0, -6.0]])  # KL per response: 0 and 4 (the masked column never counts)
    # beta 0.5: shaped rewards 1 and -2 -> advantages 3 and -3; loss = -(3 * -1 + -3 * -2) / 2 = -1.5
    loss, stats = losses.rloo_loss(tokens, mask, rewards, beta=0.5, ref_logps=ref)
    assert torch.allclose(stats["advantages"], torch.tensor([[3.0, -3.0]]))
    assert loss.item() == pytest.approx(-1.5)
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([-1.5, 1.5]))  # -A / 2: the better response is pushed up
    # counts of (4 responses, 8 tokens): the whole batch, of which this is half, halves it
    half, _ = losses.rloo_loss(tokens, mask, rewards, beta=0.5, ref_logps=ref, counts=(4, 8))
    assert half.item() == pytest.approx(-0.75)
    assert losses.rloo_loss(tokens, mask, rewards, beta=0.0, ref_logps=ref)[0].item() == pytest.approx(-0.5)


def test_grpo_advantages_by_hand_and_dr_grpo():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # mean 0.5, unbiased std sqrt(1/3) -> +-0.5 / (0.57735 + 1e-4)
    a = losses.grpo_advantages(rewards)
    assert torch.allclose(a, torch.tensor([[1, -1, -1, 1]]) * 0.5 / (3 ** -0.5 + 1e-4))
    assert torch.allclose(losses.grpo_advantages(rewards, scale=False), torch.tensor([[0.5, -0.5, -0.5, 0.5]]))
    assert torch.all(losses.grpo_advantages(torch.full((1, 3), 2.0)) == 0)


GRPO = dict(beta=0.0, epsilon=0.2, scale_rewards=True, aggregation="token")


def test_grpo_at_ratio_one_is_the_policy_gradient():
    torch.manual_seed(0)
    logps = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    rewards = torch.tensor([[1.0, -2.0, 0.5]])
    adv = losses.grpo_advantages(rewards)[0]  # [3]
    loss, stats = losses.grpo_loss(logps, mask, rewards, **GRPO)
    loss.backward()
    pg = logps.detach().clone().requires_grad_(True)
    (-(adv[:, None] * pg * mask).sum() / mask.sum()).backward()
    assert loss.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / mask.sum().item())  # ratio 1
    assert torch.allclose(logps.grad, pg.grad) and stats["clipped"] == 0
    # old_logps equal to logps is the same thing as none: the ratio is 1
    again, _ = losses.grpo_loss(logps, mask, rewards, old_logps=logps.detach(), **GRPO)
    assert again.item() == loss.item()


@pytest.mark.parametrize("advantage,log_ratio,grad_zero", [
    (1.0, 0.5, True),     # A > 0, ratio e^.5 > 1.2: clipped, no push further up
    (1.0, -0.5, False),   # A > 0, ratio below 1 - eps: the clip does not apply in this direction
    (-1.0, -0.5, True),   # A < 0, ratio e^-.5 < 0.8: clipped, no push further down
    (-1.0, 0.5, False),   # A < 0, ratio above 1 + eps: still pushed down
    (1.0, 0.1, False),    # inside the clip range
])
def test_grpo_clip_cuts_on_both_sides(advantage, log_ratio, grad_zero):
    # two responses of one prompt with rewards +-1 and unscaled advantages: response 0's advantage is `advantage`
    old = torch.tensor([[0.0, -1.0], [0.0, -1.0]])
    logps = (old + log_ratio).requires_grad_(True)
    mask = torch.tensor([[0, 1], [0, 0]])  # only response 0's token counts
    rewards = torch.tensor([[advantage, -advantage]])
    loss, _ = losses.grpo_loss(logps, mask, rewards, old_logps=old, **{**GRPO, "scale_rewards": False})
    loss.backward()
    g = logps.grad[0, 1].item()
    if grad_zero:
        assert g == 0.0
        ratio = min(max(torch.tensor(log_ratio).exp().item(), 0.8), 1.2)
        assert loss.item() == pytest.approx(-advantage * ratio)
    else:
        assert g == pytest.approx(-advantage * torch.tensor(log_ratio).exp().item(), rel=1e-6)


def test_k3_is_nonnegative_and_zero_at_equality():
    a, b = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert torch.all(losses.k3_kl(a, b) >= 0)
    assert torch.all(losses.k3_kl(a, a) == 0)
    # by hand: d = log ref - log pi = 1 -> e - 2
    assert losses.k3_kl(torch.tensor(0.0), torch.tensor(1.0)).item() == pytest.approx(torch.e - 2)


def test_grpo_kl_term_is_added_with_its_weight():
    logps = torch.tensor([[0.0, -1.0, -1.0], [0.0, -1.0, -1.0]])
    ref = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    loss, stats = losses.grpo_loss(logps, mask, torch.tensor([[0.3, 0.3]]), ref_logps=ref, **{**GRPO, "beta": 0.1})
    # equal rewards, advantage 0: only the KL; tokens: k3 = e - 2 and 0 -> mean (e - 2) / 2
    assert loss.item() == pytest.approx(0.1 * (torch.e - 2) / 2, rel=1e-6)
    assert stats["kl"] == pytest.approx((torch.e - 2) / 2, rel=1e-6)


def test_token_mean_and_sequence_mean_differ_on_unequal_lengths():
    logps = torch.zeros(2, 5)
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 0, 0, 0]])  # 4 and 1 response tokens
    rewards = torch.tensor([[1.0, -1.0]])  # unscaled advantages +-1
    settings = {**GRPO, "scale_rewards": False}
    # at ratio 1 every token's loss is -A: token mean = (-4 + 1) / 5 = -0.6; sequence mean = (-1 + 1) / 2 = 0
    token, _ = losses.grpo_loss(logps, mask, rewards, **settings)
    seq, _ = losses.grpo_loss(logps, mask, rewards, **{**settings, "aggregation": "sequence"})
    assert token.item() == pytest.approx(-0.6) and seq.item() == pytest.approx(0.0)
    # counts = (responses, tokens) of a whole batch twice this size: each aggregation divides by its own count
    assert losses.grpo_loss(logps, mask, rewards, counts=(4, 10), **settings)[0].item() == pytest.approx(-0.3)
    equal = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 0, 0]])  # equal lengths: the same
    assert losses.grpo_loss(logps, equal, rewards, **settings)[0].item() == pytest.approx(
        losses.grpo_loss(logps, equal, rewards, **{**settings, "aggregation": "sequence"})[0].item())


def test_online_table_entries_take_the_same_arguments():
    assert set(losses.ONLINE_LOSSES) == {"rloo", "grpo"}
    assert losses.ONLINE_LOSSES["rloo"].hyper["beta"] == 0.05 and losses.ONLINE_LOSSES["grpo"].hyper["beta"] == 0.0
    torch.manual_seed(0)
    logps, ref = torch.randn(4, 3), torch.randn(4, 3)
    mask, rewards = torch.tensor([[0, 1, 1]] * 4), torch.tensor([[1.0, 0.0], [0.2, 0.6]])
    for name, algo in losses.ONLINE_LOSSES.items():
        loss, stats = algo.fn(logps, mask, rewards, ref_logps=ref, old_logps=None, counts=(8, 16),
                              **{**algo.hyper, "beta": 0.1})
        assert loss.dim() == 0 and torch.isfinite(loss) and isinstance(stats, dict), name
