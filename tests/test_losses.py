"""Tests for losses.py: hand-computed values, the pitfalls of each method, and the per-token log-prob functions.

Run: python -m pytest tests/test_losses.py -x -q
"""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import losses  # noqa: E402
from losses import (LOSSES, SeqLogps, dpo_loss, ipo_loss, orpo_loss, packed_sequence_logps,  # noqa: E402
                    preference_loss, simpo_loss, sppo_loss, target_logps, win_probabilities)

torch.set_num_threads(1)
T = lambda *v, dtype=torch.float64: torch.tensor(v, dtype=dtype)  # noqa: E731


def close(a, b, tol=1e-9):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------- hand-computed values
def test_dpo_hand_value():
    # chosen log-ratio -10 - (-11) = 1, rejected -12 - (-11) = -1; beta 0.1 -> rewards 0.1, -0.1, margin 0.2
    # loss = -log sigmoid(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388693
    loss, rc, rr = dpo_loss(T(-10.0), T(-12.0), T(-11.0), T(-11.0), beta=0.1)
    close(loss, [0.5981388693], 1e-9)
    close(rc, [0.1]), close(rr, [-0.1])


def test_ipo_hand_value():
    # h = (-1.0 + 1.2) - (-1.5 + 1.2) = 0.2 + 0.3 = 0.5; 1 / (2 * 0.5) = 1; loss = (0.5 - 1)^2 = 0.25
    loss, rc, rr = ipo_loss(T(-1.0), T(-1.5), T(-1.2), T(-1.2), beta=0.5)
    close(loss, [0.25])
    close(rc, [0.5 * 0.2]), close(rr, [0.5 * -0.3])


def test_sppo_hand_value():
    # log-ratios 100 and -50; targets (0.6 - 0.5) / 0.001 = 100 and (0.4 - 0.5) / 0.001 = -100
    # loss = 1/2 * [(100 - 100)^2 + (-50 + 100)^2] = 1/2 * 2500 = 1250; rewards 0.001 * 100 = 0.1, 0.001 * -50
    loss, rc, rr = sppo_loss(T(-200.0), T(-350.0), T(-300.0), T(-300.0), T(0.6), T(0.4), beta=0.001)
    close(loss, [1250.0], 1e-7)
    close(rc, [0.1], 1e-9), close(rr, [-0.05], 1e-9)


def test_simpo_hand_value():
    # 2 * -1.0 - 2 * -1.5 - 0.25 * 2 = -2 + 3 - 0.5 = 0.5; loss = log(1 + e^-0.5) = 0.4740769842
    loss, rc, rr = simpo_loss(T(-1.0), T(-1.5), beta=2.0, gamma_beta_ratio=0.25)
    close(loss, [0.4740769842])
    close(rc, [-2.0]), close(rr, [-3.0])


def test_orpo_hand_value():
    # chosen avg log-prob log 0.5 -> odds 0.5 / 0.5 = 1 -> log-odds 0; its NLL per token is log 2 = 0.6931471806
    # rejected avg log-prob log 0.2 -> odds 0.2 / 0.8 = 1/4 -> log-odds -log 4
    # loss = nll + 0.1 * -log sigmoid(log 4) = 0.6931471806 + 0.1 * -log(4/5) = 0.6931471806 + 0.0223143551
    loss, rc, rr = orpo_loss(T(math.log(0.5)), T(math.log(0.2)), lam=0.1)
    close(loss, [0.7154615357])
    close(rc, [0.0]), close(rr, [-math.log(4.0)])


def test_win_probabilities_hand_value():
    # rewards 0 and ln 3: sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4, self = 1/2
    # P_0 = (1/2 + 1/4) / 2 = 0.375, P_1 = (3/4 + 1/2) / 2 = 0.625
    close(win_probabilities(T(0.0, math.log(3.0))[None]), [[0.375, 0.625]])


# ------------------------------------------------------------------------------------------------------------- DPO/IPO
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpo_at_reference_is_ln2_and_pushes_the_right_way(dtype):
    pc = torch.tensor([-12.3, -40.0], dtype=dtype, requires_grad=True)
    pr = torch.tensor([-15.1, -3.0], dtype=dtype, requires_grad=True)
    loss, rc, rr = dpo_loss(pc, pr, pc.detach().clone(), pr.detach().clone(), beta=0.1)
    assert torch.equal(loss, torch.full_like(loss, math.log(2.0))), loss  # exact, not approximately
    assert not rc.requires_grad and not rr.requires_grad, "rewards are for logging and must be detached"
    loss.sum().backward()
    close(pc.grad, [-0.05, -0.05], 1e-7), close(pr.grad, [0.05, 0.05], 1e-7)  # d/dpc = -beta * sigmoid(0)


def test_ipo_at_reference_pushes_the_right_way():
    pc = T(-1.2, -0.3).requires_grad_()
    pr = T(-2.0, -0.9).requires_grad_()
    loss, _, _ = ipo_loss(pc, pr, pc.detach(), pr.detach(), beta=0.1)
    close(loss, [25.0, 25.0])  # (0 - 1 / 0.2)^2
    loss.sum().backward()
    close(pc.grad, [-10.0, -10.0]), close(pr.grad, [10.0, 10.0])  # 2 * (0 - 5) * (+-1)


# ---------------------------------------------------------------------------------------------------------------- SPPO
def test_sppo_at_its_scale_fp32_and_bf16():
    p = win_probabilities(torch.tensor([[0.9, 0.1, 0.5, 0.3], [1.0, 0.0, 0.0, 0.0]]))  # [2, 4]
    p_w, p_l = p.max(-1).values, p.min(-1).values  # [2]
    for dtype in (torch.float32, torch.bfloat16):
        pc = torch.tensor([-310.0, -95.5], dtype=dtype, requires_grad=True)
        pr = torch.tensor([-287.0, -120.25], dtype=dtype, requires_grad=True)
        loss, _, _ = sppo_loss(pc, pr, pc.detach(), pr.detach(), p_w.to(dtype), p_l.to(dtype), beta=0.001)
        assert loss.dtype == torch.float32, f"SPPO must be computed in fp32, got {loss.dtype}"
        assert torch.isfinite(loss).all() and (loss > 1e3).all() and (loss < 1e5).all(), loss
        # must equal the fp32 computation on the same (bf16-rounded) inputs: bf16 arithmetic would be off by ~1%
        want = 0.5 * ((p_w.to(dtype).float() - 0.5) ** 2 + (p_l.to(dtype).float() - 0.5) ** 2) / 1e-6
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)
        loss.sum().backward()
        assert torch.isfinite(pc.grad.float()).all() and (pc.grad < 0).all() and (pr.grad > 0).all()


def test_win_probabilities_equal_rewards_and_row_mean():
    assert torch.equal(win_probabilities(torch.full((3, 6), 0.37)), torch.full((3, 6), 0.5))
    g = torch.Generator().manual_seed(0)
    p = win_probabilities(torch.randn(5, 6, generator=g) * 3)
    close(p.mean(-1), torch.full((5,), 0.5), 1e-6)  # sigmoid(d) + sigmoid(-d) = 1 pairs off
    assert ((p > 0) & (p < 1)).all()
    with pytest.raises(ValueError):
        win_probabilities(torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError):
        win_probabilities(torch.tensor([[0.1, float("nan")]]))


# --------------------------------------------------------------------------------------------------------------- SimPO
def test_simpo_duplicating_tokens_leaves_loss_unchanged():
    g = torch.Generator().manual_seed(1)
    V = 11
    logits = torch.randn(6, V, generator=g, dtype=torch.float64)  # [6, V]: the logits predicting each response token
    targets = torch.randint(0, V, (6,), generator=g)
    row = torch.tensor([0, 0, 0, 1, 1, 1])  # three tokens of the chosen response (row 0), three of the rejected
    twice = torch.arange(6).repeat_interleave(2)  # every response token twice
    a = packed_sequence_logps(target_logps(logits, targets), row, 2)
    b = packed_sequence_logps(target_logps(logits[twice], targets[twice]), row[twice], 2)
    close(b.sum, 2 * a.sum), close(b.count, 2 * a.count)  # the construction really doubled every token
    split = lambda s: (SeqLogps(s.sum[:1], s.count[:1], s.avg[:1]), SeqLogps(s.sum[1:], s.count[1:], s.avg[1:]))
    close(preference_loss("simpo", *split(a))[0], preference_loss("simpo", *split(b))[0])
    ref = SeqLogps(*(torch.zeros(1, dtype=torch.float64),) * 3)  # a sum-based loss does change: the test has teeth
    dpo_a, dpo_b = preference_loss("dpo", *split(a), ref, ref)[0], preference_loss("dpo", *split(b), ref, ref)[0]
    assert not torch.allclose(dpo_a, dpo_b)


def test_simpo_gamma_convention():
    # equal averages: loss = -log sigmoid(-gamma), gamma = ratio * beta = 0.25 * 4 = 1 -> log(1 + e) = 1.3132616875
    # (gamma = 0.25 as TRL's simpo_gamma would give log(1 + e^0.25) = 0.826; beta * (d - 1) would give log(1 + e^4))
    loss, _, _ = simpo_loss(T(-0.7), T(-0.7), beta=4.0, gamma_beta_ratio=0.25)
    close(loss, [1.3132616875])


# ---------------------------------------------------------------------------------------------------------------- ORPO
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("a", [-1e-8, 0.0, -1e-30])
def test_orpo_finite_near_zero(a, dtype):
    aw = torch.tensor([a, -0.3, a], dtype=dtype, requires_grad=True)
    al = torch.tensor([-0.9, a, a], dtype=dtype, requires_grad=True)
    loss, rw, rl = orpo_loss(aw, al, lam=0.1)
    loss.sum().backward()
    for x in (loss, rw, rl, aw.grad, al.grad):
        assert torch.isfinite(x.float()).all(), (a, dtype, x)


def test_log1mexp_matches_float64_everywhere():
    a = T(-1e-7, -1e-3, -0.1, -0.69, -0.7, -2.0, -20.0, -80.0)
    want = torch.log(-torch.expm1(a))  # exact enough in float64 for these values
    got = losses._log1mexp(a.float()).double()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30)  # -80: 0 vs -1.8e-35


def test_orpo_gradient_matches_naive_formula_away_from_zero():
    aw, al = T(-0.4, -2.0).requires_grad_(), T(-1.1, -0.05).requires_grad_()
    orpo_loss(aw, al, lam=0.3)[0].sum().backward()
    aw2, al2 = aw.detach().clone().requires_grad_(), al.detach().clone().requires_grad_()
    odds = lambda a: a - torch.log(1 - torch.exp(a))
    (-aw2 - 0.3 * F.logsigmoid(odds(aw2) - odds(al2))).sum().backward()
    close(aw.grad, aw2.grad), close(al.grad, al2.grad)


# ------------------------------------------------------------------------------------------- per-token log-probs
def test_token_logps_and_packed_sums_by_hand():
    logits = torch.zeros(3, 3, dtype=torch.float64)
    logits[0] = T(0.0, math.log(3.0), 0.0)  # softmax (1/5, 3/5, 1/5)
    logits[1] = T(math.log(2.0), 0.0, 0.0)  # softmax (2/4, 1/4, 1/4)
    targets = torch.tensor([1, 0, 2])  # the third row is uniform: log 1/3
    got = target_logps(logits, targets)
    close(got, [math.log(3 / 5), math.log(1 / 2), math.log(1 / 3)])
    out = packed_sequence_logps(got, torch.tensor([1, 0, 1]), 3)  # sequence 2 has no tokens
    close(out.sum, [math.log(1 / 2), math.log(3 / 5) + math.log(1 / 3), 0.0])
    close(out.count, [1.0, 2.0, 0.0]), close(out.avg, [math.log(1 / 2), (math.log(3 / 5) + math.log(1 / 3)) / 2, 0.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_chunked_and_plain_agree(chunk, dtype):
    g = torch.Generator().manual_seed(2)
    B, L, V = 3, 9, 37  # V not a multiple of the chunk
    logits = (torch.randn(B, L, V, generator=g) * 4).to(dtype)
    ids = torch.randint(0, V, (B, L), generator=g)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    plain, chunked = target_logps(x1, ids), target_logps(x2, ids, vocab_chunk=chunk)
    assert plain.dtype == chunked.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(plain, chunked, rtol=1e-6, atol=1e-6)
    w = torch.randn(B, L, generator=g).to(plain.dtype)  # arbitrary upstream gradient per token
    (plain * w).sum().backward()
    (chunked * w).sum().backward()
    assert x2.grad.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # both gradients end in bf16; one bf16 ulp of slack
    torch.testing.assert_close(x1.grad.float(), x2.grad.float(), rtol=tol, atol=tol)


def test_chunked_gradcheck():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 10, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 10, (2, 4), generator=g)
    assert torch.autograd.gradcheck(lambda x: losses._ChunkedTokenLogps.apply(x, targets, 3), (logits,))


# ---------------------------------------------------------------------------------------- empty responses and errors
@pytest.mark.parametrize("chunk", [None, 4])
def test_empty_response_is_zero_not_nan(chunk):
    logits = torch.randn(2, 9, requires_grad=True)  # two tokens, both of sequence 0; sequence 1 (empty) has none
    out = packed_sequence_logps(target_logps(logits, torch.tensor([3, 5]), chunk), torch.tensor([0, 0]), 2)
    assert out.sum[1] == 0 and out.count[1] == 0 and out.avg[1] == 0
    assert torch.isfinite(out.avg).all() and out.avg[0] < 0
    (out.sum + out.avg).sum().backward()
    assert torch.isfinite(logits.grad).all()
    for name in LOSSES:  # every loss stays finite when a response is empty
        loss, rc, rr = preference_loss(name, out, out, out, out, p_chosen=torch.tensor([0.6, 0.5]),
                                       p_rejected=torch.tensor([0.4, 0.5]))
        assert torch.isfinite(loss).all() and torch.isfinite(rc).all() and torch.isfinite(rr).all(), name


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="vocab_chunk"):
        target_logps(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), vocab_chunk=0)
    s = SeqLogps(T(-3.0), T(2.0), T(-1.5))
    with pytest.raises(ValueError, match="unknown --loss"):
        preference_loss("kto", s, s, s, s)
    with pytest.raises(ValueError, match="needs ref_chosen, ref_rejected"):
        preference_loss("dpo", s, s, None, None)
    with pytest.raises(ValueError, match="p_chosen"):
        preference_loss("sppo", s, s, s, s)
    with pytest.raises(ValueError, match="orpo has no beta; its settings: lam"):
        preference_loss("orpo", s, s, None, None, beta=0.2)
    with pytest.raises(ValueError, match="dpo has no gamma_beta_ratio"):
        preference_loss("dpo", s, s, s, s, gamma_beta_ratio=0.5)


# ---------------------------------------------------------------------------------------------- table and dispatcher
def test_table_and_dispatch_pick_sums_or_averages():
    assert set(LOSSES) == {"dpo", "ipo", "sppo", "simpo", "orpo"}
    assert {k for k, v in LOSSES.items() if not v.needs_reference} == {"simpo", "orpo"}
    assert {k: v.logps for k, v in LOSSES.items()} == dict(dpo="sum", ipo="avg", sppo="sum", simpo="avg", orpo="avg")
    assert LOSSES["sppo"].hyper == dict(beta=0.001) and LOSSES["simpo"].hyper == dict(beta=2.0, gamma_beta_ratio=0.25)
    c, r = SeqLogps(T(-30.0), T(10.0), T(-3.0)), SeqLogps(T(-40.0), T(20.0), T(-2.0))
    rc, rr = SeqLogps(T(-31.0), T(10.0), T(-3.1)), SeqLogps(T(-39.0), T(20.0), T(-1.95))
    p_w, p_l = T(0.7), T(0.3)
    close(preference_loss("dpo", c, r, rc, rr)[0], dpo_loss(c.sum, r.sum, rc.sum, rr.sum, 0.1)[0])
    close(preference_loss("ipo", c, r, rc, rr, beta=0.2)[0], ipo_loss(c.avg, r.avg, rc.avg, rr.avg, 0.2)[0])
    close(preference_loss("sppo", c, r, rc, rr, p_w, p_l)[0],
          sppo_loss(c.sum, r.sum, rc.sum, rr.sum, p_w, p_l, 0.001)[0])
    close(preference_loss("simpo", c, r, gamma_beta_ratio=0.5)[0], simpo_loss(c.avg, r.avg, 2.0, 0.5)[0])
    close(preference_loss("orpo", c, r, lam=0.2)[0], orpo_loss(c.avg, r.avg, 0.2)[0])
    close(preference_loss("dpo", c, r, rc, rr, beta=None)[0], preference_loss("dpo", c, r, rc, rr)[0])  # None: default
    # the dispatcher really uses sums for DPO and averages for IPO: swapping them changes the value
    assert not torch.allclose(preference_loss("dpo", c, r, rc, rr)[0], dpo_loss(c.avg, r.avg, rc.avg, rr.avg, 0.1)[0])
