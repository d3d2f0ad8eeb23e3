"""Preference-optimisation losses for the eva solver update, written out by hand.

Everything here is a pure function of log-probabilities, so the file can be copied into any project:

    target_logps(logits [K, V], targets [K]) -> [K];  packed_sequence_logps(token_logps [K], row [K], n) -> SeqLogps
    dpo_loss / ipo_loss / sppo_loss / simpo_loss / orpo_loss -> (loss [B], chosen_reward [B], rejected_reward [B])
    win_probabilities(rewards [P, N])                 -> SPPO's estimated win probability of each response
    LOSSES[name] = Loss(fn, logps "sum" | "avg", inputs, hyper);  preference_loss(name, ...) dispatches through it
    rloo_loss / grpo_loss(logps [B, T], mask [B, T], rewards [P, k], ...) -> (loss, stats);  ONLINE_LOSSES[name]

Preference losses are unreduced (the caller averages); their rewards are the implicit rewards each method defines,
detached, for logging. The online losses return the batch's scalar and a dict of detached statistics. Tests:
`python -m pytest tests/test_losses.py tests/test_online_losses.py -q`. Benchmark of the chunked log-prob path:
`python bench/bench_logps.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
ORPO_EPS = 1e-6  # average log-probs are clamped to <= -ORPO_EPS so that log(1 - exp(a)) stays finite


# ----------------------------------------------------------------------------------------------- per-token log-probs
@dataclass
class SeqLogps:
    """Per-sequence log-probs of the response tokens: sum [B], count [B] (float), avg = sum / max(count, 1) [B]."""
    sum: Tensor
    count: Tensor
    avg: Tensor


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] per position, touching `chunk` vocabulary columns at a time.

    d logp / d logits_v = 1[v == target] - softmax_v, so backward needs only the logits and the logsumexp; it
    writes the gradient chunk by chunk straight into one tensor of the logits' own dtype. Nothing of size
    [B, T, V] is ever held in fp32, and nothing of that size is saved besides the logits themselves.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk: int) -> Tensor:  # logits [B, T, V], targets [B, T]
        dt = torch.promote_types(logits.dtype, torch.float32)
        lse = None
        for s in range(0, logits.shape[-1], chunk):
            part = logits[..., s:s + chunk].to(dt).logsumexp(-1)  # [B, T]
            lse = part if lse is None else torch.logaddexp(lse, part)
        target_logit = logits.gather(-1, targets[..., None]).squeeze(-1).to(dt)  # [B, T]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return target_logit - lse  # [B, T]

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad [B, T]
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # [B, T, V]
        for s in range(0, logits.shape[-1], ctx.chunk):
            e = min(s + ctx.chunk, logits.shape[-1])
            d = (logits[..., s:e].to(lse.dtype) - lse[..., None]).exp_().mul_(-grad[..., None])  # -g*softmax [B, T, C]
            inside = (targets >= s) & (targets < e)  # [B, T]: the target column lies in this chunk
            d.scatter_add_(-1, (targets - s).clamp(0, e - s - 1)[..., None], (grad * inside)[..., None])
            grad_logits[..., s:e] = d  # one cast to the logits' dtype, after the fp32 arithmetic
        return grad_logits, None, None


def target_logps(logits: Tensor, targets: Tensor, vocab_chunk: int | None = None) -> Tensor:
    """log softmax(logits)[..., target] in fp32: logits [..., V], targets [...] -> [...].

    vocab_chunk=None computes a plain fp32 log_softmax over the whole vocabulary: fp32 copies of the logits' size
    are built and one is kept for backward. vocab_chunk=C takes the logsumexp over C columns at a time and writes
    the gradient in the logits' dtype (_ChunkedTokenLogps): the extra memory is one fp32 slice of C columns plus the
    gradient the logits need anyway (bench/bench_logps.py compares the two). Both agree to fp32 rounding.
    """
    if vocab_chunk is not None and vocab_chunk < 1:
        raise ValueError(f"target_logps: vocab_chunk must be a positive int or None, got {vocab_chunk}")
    if vocab_chunk is None:
        logps = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # [..., V]
        return logps.gather(-1, targets[..., None]).squeeze(-1)
    return _ChunkedTokenLogps.apply(logits, targets, vocab_chunk)


def packed_sequence_logps(token_logps: Tensor, row: Tensor, n_rows: int) -> SeqLogps:
    """Sum, count and average per sequence of the scored tokens of a packed batch: token_logps [K] (one per response
    token, any order), row [K] the sequence each belongs to (0 <= row < n_rows). A sequence without tokens gives 0s."""
    total = token_logps.new_zeros(n_rows).index_add(0, row, token_logps)  # [n_rows]
    count = torch.bincount(row, minlength=n_rows).to(total.dtype)  # [n_rows]
    return SeqLogps(sum=total, count=count, avg=total / count.clamp(min=1))


# --------------------------------------------------------------------------------------------------------- losses
def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), log-probs summed over response tokens:

        loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])
        reward(y) = beta * (log pi(y) - log ref(y))

    At pi == ref the loss is ln 2.
    """
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)  # [B]
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)  # [B]
    loss = -F.logsigmoid(chosen - rejected)  # logsigmoid is stable for margins of any size
    return loss, chosen.detach(), rejected.detach()


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, arXiv 2310.12036), log-probs averaged over response tokens (the caller passes averages):

        h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l));   loss = (h - 1 / (2 beta))^2
        reward(y) = beta * (log pi(y) - log ref(y))

    The squared loss regresses the margin to 1/(2 beta) instead of pushing it to infinity.
    """
    chosen = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected = policy_rejected_logps - ref_rejected_logps  # [B]
    loss = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return loss, (beta * chosen).detach(), (beta * rejected).detach()


def _at_least_fp32(x: Tensor | list[float], device: torch.device) -> Tensor:
    x = torch.as_tensor(x, device=device)
    return x.to(torch.promote_types(x.dtype, torch.float32))  # fp64 stays fp64 (gradcheck), everything else -> fp32


def sppo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, p_chosen: Tensor, p_rejected: Tensor,
              beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """SPPO (Wu et al. 2024, arXiv 2405.00675), log-probs summed, P_w / P_l the estimated win probabilities:

        loss = 1/2 * [(log pi(y_w) - log ref(y_w) - (P_w - 1/2) / beta)^2
                      + (log pi(y_l) - log ref(y_l) - (P_l - 1/2) / beta)^2]
        reward(y) = beta * (log pi(y) - log ref(y))   (regressed towards P(y) - 1/2)

    With SPPO's small beta the targets (P - 1/2) / beta are large, and so are the loss and its gradients: it is
    computed in fp32 whatever the input dtype (bf16 would round the difference away), and the caller should clip
    gradients.
    """
    f32 = lambda x: _at_least_fp32(x, policy_chosen_logps.device)
    chosen = f32(policy_chosen_logps) - f32(ref_chosen_logps)  # [B]
    rejected = f32(policy_rejected_logps) - f32(ref_rejected_logps)  # [B]
    target_w = (f32(p_chosen) - 0.5) / beta  # [B]
    target_l = (f32(p_rejected) - 0.5) / beta  # [B]
    loss = 0.5 * ((chosen - target_w) ** 2 + (rejected - target_l) ** 2)
    return loss, (beta * chosen).detach(), (beta * rejected).detach()


def simpo_loss(policy_chosen_avg_logps: Tensor, policy_rejected_avg_logps: Tensor, beta: float,
               gamma_beta_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, arXiv 2405.14734), no reference, log-probs averaged over response tokens:

        loss = -log sigmoid(beta * avg log pi(y_w) - beta * avg log pi(y_l) - gamma),  gamma = gamma_beta_ratio * beta
        reward(y) = beta * avg log pi(y)

    The margin is given as gamma / beta, as in the SimPO authors' code (TRL's `simpo_gamma` is gamma itself).
    """
    chosen = beta * policy_chosen_avg_logps  # [B]
    rejected = beta * policy_rejected_avg_logps  # [B]
    loss = -F.logsigmoid(chosen - rejected - gamma_beta_ratio * beta)
    return loss, chosen.detach(), rejected.detach()


def _log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a < 0, accurate everywhere (Maechler 2012): expm1 near 0, log1p far from it."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def orpo_loss(policy_chosen_avg_logps: Tensor, policy_rejected_avg_logps: Tensor,
              lam: float) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024, arXiv 2403.07691), no reference, a = average log-prob per response token:

        log_odds(y) = a - log(1 - exp(a));   loss = -a(y_w) - lam * log sigmoid(log_odds(y_w) - log_odds(y_l))
        reward(y) = log_odds(y)  (what the odds-ratio term compares)

    log(1 - exp(a)) is -inf at a = 0 (a response the model is certain of), the known source of NaN: a is clamped
    to <= -ORPO_EPS (no odds gradient beyond the clamp) and log1mexp is computed stably, in fp32.
    """
    dt = torch.promote_types(policy_chosen_avg_logps.dtype, torch.float32)
    chosen_nll = -policy_chosen_avg_logps.to(dt)  # [B]: the SFT term, the chosen response's mean NLL per token
    a_w = policy_chosen_avg_logps.to(dt).clamp(max=-ORPO_EPS)  # [B]
    a_l = policy_rejected_avg_logps.to(dt).clamp(max=-ORPO_EPS)  # [B]
    odds_w = a_w - _log1mexp(a_w)  # [B]
    odds_l = a_l - _log1mexp(a_l)  # [B]
    loss = chosen_nll - lam * F.logsigmoid(odds_w - odds_l)
    return loss, odds_w.detach(), odds_l.detach()


def win_probabilities(rewards: Tensor) -> Tensor:
    """P_i = mean_j sigmoid(r_i - r_j) over the N responses of each prompt, self included ([P, N] -> [P, N]).

    SPPO's estimate of the probability that response i beats the policy (Wu et al. 2024, with a Bradley-Terry
    preference from reward differences as in eva). Equal rewards give 0.5; each row averages exactly 0.5.
    """
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 2 or not torch.isfinite(rewards).all():
        raise ValueError(f"win_probabilities: want a finite [P, N] tensor of rewards, got shape {tuple(rewards.shape)}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))  # [P, N]
    return torch.sigmoid(r[:, :, None] - r[:, None, :]).mean(-1)  # [P, N, N] -> [P, N]


# ------------------------------------------------------------------------------------------------ table and dispatch
@dataclass(frozen=True)
class Loss:
    fn: Callable  # (*inputs, **hyper) -> (loss [B], chosen_reward [B], rejected_reward [B])
    logps: str  # "sum" or "avg": the per-sequence log-prob of a response the method is defined on
    inputs: tuple[str, ...]  # what fn takes before its hyperparameters, in order (preference_loss's argument names)
    hyper: dict  # fn's hyperparameters and their defaults

    @property
    def needs_reference(self) -> bool:  # False: the training step skips the reference forward pass
        return "ref_chosen" in self.inputs


_PAIR, _REF, _WIN = ("chosen", "rejected"), ("ref_chosen", "ref_rejected"), ("p_chosen", "p_rejected")
LOSSES: dict[str, Loss] = {
    "dpo": Loss(dpo_loss, "sum", _PAIR + _REF, dict(beta=0.1)),
    "ipo": Loss(ipo_loss, "avg", _PAIR + _REF, dict(beta=0.1)),
    "sppo": Loss(sppo_loss, "sum", _PAIR + _REF + _WIN, dict(beta=0.001)),
    "simpo": Loss(simpo_loss, "avg", _PAIR, dict(beta=2.0, gamma_beta_ratio=0.25)),
    "orpo": Loss(orpo_loss, "avg", _PAIR, dict(lam=0.1)),  # lam weighs the odds-ratio term; ORPO has no beta
}


def preference_loss(name: str, chosen: SeqLogps, rejected: SeqLogps, ref_chosen: SeqLogps | None = None,
                    ref_rejected: SeqLogps | None = None, p_chosen: Tensor | None = None,
                    p_rejected: Tensor | None = None, **hyper) -> tuple[Tensor, Tensor, Tensor]:
    """Loss `name` through its LOSSES entry: each SeqLogps passed as the sum or the average that loss is defined on,
    p_chosen / p_rejected (SPPO's win probabilities) where it takes them, `hyper` over its own defaults (None
    keeps the default; a hyperparameter the loss does not have is an error)."""
    if name not in LOSSES:
        raise ValueError(f"unknown --loss {name!r}; choose one of {', '.join(LOSSES)}")
    loss = LOSSES[name]
    given = dict(chosen=chosen, rejected=rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                 p_chosen=p_chosen, p_rejected=p_rejected)
    missing = [k for k in loss.inputs if given[k] is None]
    if missing:
        raise ValueError(f"--loss {name} needs {', '.join(missing)}, got None")
    hyper = {k: v for k, v in hyper.items() if v is not None}
    if set(hyper) - set(loss.hyper):
        raise ValueError(f"--loss {name} has no {', '.join(sorted(set(hyper) - set(loss.hyper)))}; its settings: "
                         f"{', '.join(loss.hyper)}")
    args = [getattr(given[k], loss.logps) if isinstance(given[k], SeqLogps) else given[k] for k in loss.inputs]
    return loss.fn(*args, **{**loss.hyper, **hyper})


# ---------------------------------------------------------------------------------------------- online RL losses
# RLOO and GRPO for the online loop (online.py): k sampled responses per prompt, scalar rewards, and the policy's
# per-token log-probs of those responses. Rewards and advantages are [P, k]; everything per response is flattened
# prompt-major to [P * k] (rows p * k .. p * k + k - 1 are prompt p's samples).

def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv 2402.14740): [P, k] rewards -> [P, k] advantages

        A_i = r_i - 1/(k-1) sum_{j != i} r_j  =  k/(k-1) * (r_i - mean_j r_j)

    Each prompt's advantages sum to zero; equal rewards give zero advantages. Needs k >= 2.
    """
    k = rewards.shape[-1]
    if rewards.dim() != 2 or k < 2:
        raise ValueError(f"rloo_advantages: want [P, k] rewards with k >= 2, got shape {tuple(rewards.shape)}")
    return (rewards * k - rewards.sum(-1, keepdim=True)) / (k - 1)


def rloo_loss(logps: Tensor, mask: Tensor, rewards: Tensor, *, beta: float, ref_logps: Tensor | None = None,
              old_logps: Tensor | None = None, counts: tuple[float, float] | None = None) -> tuple[Tensor, dict]:
    """RLOO's policy-gradient loss. logps, ref_logps, mask [B, T]: per-token log-probs of the B = P*k responses (logps
    with grad) and which tokens are response tokens; rewards [P, k]:

        log pi(y_i | x) = sum_t log pi(y_i,t | x, y_<t);   kl_i = sum_t (log pi - log pi_ref)   (0 without ref_logps)
        r~_i = r_i - beta * kl_i   (detached: the KL is a penalty on the reward, as in the RLOO paper and TRL)
        A = rloo_advantages(r~);   loss = -sum_i A_i * log pi(y_i | x) / n   (n = B, or counts[0])

    counts: (responses, response tokens) of the whole batch this one is part of, so that micro batches and ranks
    divide by the whole batch's count and their gradients add up to its gradient. old_logps is not used: RLOO is
    on-policy. Returns (loss scalar, stats: the advantages [P, k], detached).
    """
    mask = mask.to(logps.dtype)  # [B, T]
    seq = (logps * mask).sum(-1)  # [B]
    shaped = rewards.to(torch.promote_types(logps.dtype, torch.float32))  # [P, k]
    if ref_logps is not None and beta:
        shaped = shaped - beta * ((logps.detach() - ref_logps) * mask).sum(-1).view_as(shaped)
    advantages = rloo_advantages(shaped).detach()  # [P, k]
    total = -(advantages.flatten() * seq).sum()
    return total / (seq.numel() if counts is None else counts[0]), dict(advantages=advantages)


def grpo_advantages(rewards: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300): [P, k] -> [P, k]

        A_i = (r_i - mean_j r_j) / (std_j r_j + eps)     scale=False (Dr. GRPO, arXiv 2503.20783): r_i - mean_j r_j

    std is the unbiased sample standard deviation over the group, and eps = 1e-4, as TRL's GRPOTrainer computes them.
    """
    if rewards.dim() != 2 or rewards.shape[-1] < 2:
        raise ValueError(f"grpo_advantages: want [P, k] rewards with k >= 2, got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(-1, keepdim=True)
    return centred / (rewards.std(-1, keepdim=True) + eps) if scale else centred


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 (Schulman 2020), elementwise:  exp(d) - d - 1,  d = log pi_ref - log pi.

    Unbiased for samples from pi, >= 0 everywhere (e^d >= 1 + d), and 0 exactly where the two log-probs agree."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps: Tensor, mask: Tensor, rewards: Tensor, *, beta: float, epsilon: float, scale_rewards: bool,
              aggregation: str, ref_logps: Tensor | None = None, old_logps: Tensor | None = None,
              counts: tuple[float, float] | None = None) -> tuple[Tensor, dict]:
    """GRPO's clipped surrogate, per token. logps, old_logps, ref_logps, mask: [B, T] (B = P*k responses; old_logps
    from the policy that sampled them, None: logps itself, detached); rewards [P, k], whose advantages A =
    grpo_advantages(rewards, scale_rewards) are the same at every token of a response:

        rho_t = exp(log pi_t - log pi_old_t)
        l_t   = -min(rho_t * A, clip(rho_t, 1 - epsilon, 1 + epsilon) * A) + beta * k3_kl(log pi_t, log pi_ref_t)
        token:    loss = sum_{i,t} l_t / (number of response tokens)          (DAPO; TRL's default "dapo")
        sequence: loss = sum_i (sum_t l_t / |y_i|) / B                        (the DeepSeekMath paper's)

    The min keeps the clip one-sided in the direction it applies: with A > 0 nothing is gained beyond 1 + epsilon,
    with A < 0 nothing beyond 1 - epsilon (zero gradient there). At rho = 1 (one update per batch of samples) this
    is the plain policy gradient -A * log pi. counts: (responses, response tokens) of the whole batch this one is
    part of, the denominators instead of this batch's own, so that micro batches and ranks add up to the whole
    batch's gradient. Returns (loss scalar, stats: clipped share and mean KL, detached).
    """
    if aggregation not in ("token", "sequence"):
        raise ValueError(f"grpo_loss: aggregation must be 'token' or 'sequence', got {aggregation!r}")
    advantages = grpo_advantages(rewards, scale=scale_rewards).flatten()  # [B]
    old_logps = logps if old_logps is None else old_logps
    normalizer = None if counts is None else counts[1] if aggregation == "token" else counts[0]
    mask = mask.to(logps.dtype)  # [B, T]
    ratio = torch.exp(logps - old_logps.detach())  # [B, T]
    a = advantages.detach()[:, None].to(logps.dtype)  # [B, 1]
    unclipped, clipped = ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a
    per_token = -torch.min(unclipped, clipped)  # [B, T]
    kl = None
    if beta:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta > 0 needs ref_logps")
        kl = k3_kl(logps, ref_logps.detach())
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if aggregation == "token":
        loss = per_token.sum() / (mask.sum().clamp(min=1) if normalizer is None else normalizer)
    else:
        per_seq = per_token.sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
        loss = per_seq.sum() / (per_seq.numel() if normalizer is None else normalizer)
    n = mask.sum().clamp(min=1)
    stats = dict(clipped=float(((clipped < unclipped).to(mask.dtype) * mask).sum() / n),
                 kl=None if kl is None else float((kl.detach() * mask).sum() / n))
    return loss, stats


@dataclass(frozen=True)
class OnlineLoss:
    fn: Callable  # (logps [B, T], mask [B, T], rewards [P, k], *, ref_logps, old_logps, counts, **hyper)
    hyper: dict  # fn's hyperparameters and their defaults; beta weighs the KL to the reference policy


ONLINE_LOSSES: dict[str, OnlineLoss] = {  # beta: TRL's RLOOConfig and GRPOConfig defaults
    "rloo": OnlineLoss(rloo_loss, dict(beta=0.05)),
    "grpo": OnlineLoss(grpo_loss, dict(beta=0.0, epsilon=0.2, scale_rewards=True, aggregation="token")),
}
