"""The learning creator (--creator_learns): the creator is a second LoRA adapter ("creator") on the solver's base,
trained with RLOO on the solver's learning signal, so that it learns to write prompts this solver can still learn
from. One copy of the base in memory; the creator starts as the base model itself (its adapter's B = 0). With
--creator <model> the adapter sits on that model's own base instead.

    python train_eva.py --preset smoke --creator_learns --run_dir runs/learns    # the offline loop, a few minutes

A creator round (offline: each iteration t > 0 between select and evolve, train_eva.py's "creator" phase; online:
before each creator round's evolve) takes creator_steps steps of:
  rollouts  per selected parent, one creator message (a method drawn per parent, as evolve draws them) and
            creator_group (k) fresh rewrites sampled from the creator adapter
  judge     each rewrite is cleaned as evolve cleans a link; a valid one gets n_samples answers from the solver,
            scored by the run's reward
  reward    creator_reward (below), per rewrite
  update    one RLOO step (losses.rloo_loss, no KL term) on the creator adapter; the solver's adapter is untouched
The updated adapter then writes the round's children (evolve). Its state is saved with its optimizer (offline:
iter_<t>/creator_state.pt before the phase's marker; online: in online_state.pt), so a rerun resumes from it.
"""
import contextlib

import numpy as np
import torch

import cleaning
import common
import constraints
import creator
import files
import generate
import losses
import model
import parallel
import reward
import solver
import trainstate

ADAPTER = "creator"  # the creator's adapter; the solver's is peft's "default"
STATE_FILE = "creator_state.pt"


# ------------------------------------------------------------------------------------------------- the reward
def creator_reward(valid: bool, rewards: list[float], parent: str, child: str, *, lo: float, hi: float,
                   info_metric: str = "gap", copy_threshold: float = 0.6, copy_penalty: float = 1.0) -> dict:
    """The creator's reward for one rewrite, from what the loop measures anyway (the solver's k rewards on it):

        R = -1                                           invalid (cleaning rejects it; the rules reward: no task left)
        R = i * u  -  copy_penalty * [sim >= copy_threshold]                                           otherwise
        i = info(rewards) / (hi - lo)           eva's informativeness (--info_metric), on a [0, 1] scale
        s = (mean(rewards) - lo) / (hi - lo)    how often the solver succeeds on the child, in [0, 1]
        u = 1 - |2 s - 1|                       1 at s = 1/2; 0 when the solver always or never succeeds
        sim = cleaning.similarity(parent, child)   character-3-gram Jaccard of the two tasks

    u is R-Zero's uncertainty reward (Huang et al. 2025, arXiv 2508.05004); Absolute Zero's learnability reward
    (Zhao et al. 2025, arXiv 2505.03335) is likewise 0 for tasks always or never solved: a child is worth writing
    when the solver can sometimes but not always answer it. The factor i is what eva's selection already rewards,
    so the creator aims where the solver's answers differ. The copy penalty removes the cheapest way to score: a
    near-copy of an informative parent inherits its informativeness. lo, hi: the reward's range ([0, 1] for the
    rules reward). Returns R with its parts (info, success, uncertainty, similarity, near_copy).
    """
    sim = cleaning.similarity(parent, child) if valid else None
    if not valid:
        return dict(reward=-1.0, info=None, success=None, uncertainty=None, similarity=sim, near_copy=False)
    width = max(hi - lo, 1e-8)
    r = np.array(common.as_floats(rewards), dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size < 2:  # no rewards to judge by: neither credit nor blame beyond the copy penalty
        info = success = 0.0
    else:
        info = float(np.clip(np.nan_to_num(creator.informativeness([r.tolist()], info_metric)[0]) / width, 0, 1))
        success = float(np.clip((r.mean() - lo) / width, 0, 1))
    uncertainty = 1.0 - abs(2.0 * success - 1.0)
    near_copy = sim >= copy_threshold
    value = info * uncertainty - copy_penalty * float(near_copy)
    return dict(reward=value, info=info, success=success, uncertainty=uncertainty, similarity=sim,
                near_copy=near_copy)


# ------------------------------------------------------------------------------------------------- the adapter
@contextlib.contextmanager
def speaking(learner: dict):
    """Inside, the creator's model speaks with its adapter active and trainable; on the solver's base the solver's
    adapter is frozen meanwhile and active again after."""
    m = learner["model"]
    m.set_adapter(ADAPTER)
    try:
        yield m
    finally:
        if learner["shared"]:
            m.set_adapter("default")


def attach(policy, tokenizer, cfg, creator_model=None, creator_tokenizer=None) -> dict:
    """Add the creator's adapter (the solver's LoRA settings, B = 0) beside the solver's, or on creator_model's own
    base, and its optimizer: the learner {model, tokenizer, shared (the solver's base), optimizer, scheduler, at (the
    iteration whose state is loaded; -1 = fresh)}."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(parallel.stable_seed(cfg.seed, "creator adapter"))  # A is random: the same on every rank
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    if creator_model is None:
        policy.add_adapter(ADAPTER, lora)
        learner = dict(model=policy, tokenizer=tokenizer, shared=True)
    else:  # peft wraps the creator's modules in place: creator_model itself now speaks through the adapter
        learner = dict(model=get_peft_model(creator_model, lora, adapter_name=ADAPTER).eval(),
                       tokenizer=creator_tokenizer, shared=False)
    with speaking(learner) as m:
        params = [p for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.creator_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # a constant rate
    return dict(learner, optimizer=optimizer, scheduler=scheduler, at=-1)


def load(learner: dict, run, t: int) -> None:
    """Bring the creator to its state after the last iteration <= t whose creator phase is done (fresh: none)."""
    done = [s for s in range(1, t + 1) if run.done(s, "creator") and (run.iter_dir(s) / STATE_FILE).exists()]
    last = done[-1] if done else -1
    if last == learner["at"]:
        return
    if last == -1:
        raise RuntimeError("creator_rl.load: a fresh creator cannot be restored once trained; restart the process")
    load_state_dict(learner, torch.load(run.iter_dir(last) / STATE_FILE, weights_only=False))


def state_dict(learner: dict) -> dict:
    """The creator's state: its adapter's weights, its optimizer's state and the round it is at."""
    with speaking(learner) as m:
        weights = {n: p.detach().cpu().clone() for n, p in m.named_parameters() if p.requires_grad}
    return dict(weights=weights, optimizer=learner["optimizer"].state_dict(), at=learner["at"])


@torch.no_grad()
def load_state_dict(learner: dict, state: dict) -> None:
    params = dict(learner["model"].named_parameters())
    for name, value in state["weights"].items():
        params[name].copy_(value)
    learner["optimizer"].load_state_dict(state["optimizer"])
    learner["at"] = state["at"]


def completer(learner: dict, complete):
    """evolve's `complete` with the creator's adapter active around each call."""
    def speak(messages):
        with speaking(learner):
            return complete(messages)
    return speak


# ------------------------------------------------------------------------------------------------- one round
def _messages(parents: list[dict], cfg, t: int) -> list[tuple[dict, str, str]]:
    """(parent, method, message) per parent with a task to rewrite; methods drawn per parent as evolve draws them
    (no in-code constraint step: with the rules reward the creator rewrites the task only)."""
    verifiable = reward.is_verifiable(cfg.reward)
    methods = [m for m in creator.methods_for(cfg.evolve_kinds) if not (verifiable and m == "add_constraints")]
    out = []
    for p in parents:
        task = constraints.split_task(p, verifiable)
        if task is None or not methods:
            continue
        rng = np.random.default_rng(parallel.stable_seed(cfg.seed, t, "creator round", p["id"]))
        method = methods[int(rng.integers(len(methods)))]
        out.append((p, method, creator.render(method, task)))
    return out


def _children(asked, texts: list[list[str]], pool: list[dict], cfg) -> list[dict]:
    """One record per rewrite: the cleaned child (prompt, task) or the reason it is invalid."""
    verifiable = reward.is_verifiable(cfg.reward)
    index = cleaning.new_index()
    for r in pool:
        cleaning.index_add(index, r)
    records = []
    for (parent, method, _), candidates in zip(asked, texts):
        task = constraints.split_task(parent, verifiable)
        ids, kwargs = ((parent.get("instruction_id_list") or [], parent.get("kwargs") or [])
                       if verifiable else ([], []))
        for j, raw in enumerate(candidates):
            child, why, _ = creator._written_child(parent, task, raw, ids, kwargs, method, index, verifiable=verifiable,
                                                   max_ratio=2.0, near_duplicate=0.85)
            records.append({"prompt": None, "task": None, **(child or {}), "id": f"{parent['id']}.c{j}",
                            "parent": parent["id"], "method": method, "raw": raw, "parent_task": task,
                            "valid": child is not None, "reason": why})
    return records


def learn(policy, tokenizer, scorer, parents: list[dict], samples: list[dict], pool: list[dict], learner: dict, cfg,
          t: int, save_to=None):
    """Creator round t on the selected parents (module docstring): creator_steps RLOO steps, each on fresh rewrites
    of the same messages. Returns (records per rewrite, summary, log line). samples: the parents' scored samples
    (prompt_id, rewards, info), for the summary. save_to: a file for the creator's state (rank 0 writes it
    atomically) before this returns."""
    asked = _messages(parents, cfg, t)
    records, stats, per_step = [], {}, []
    for step in range(cfg.creator_steps if asked else 0):
        batch, stats = _step(policy, tokenizer, scorer, asked, pool, learner, cfg, t, step)
        records += batch
        per_step.append(float(np.mean([r["reward"] for r in batch])))
    learner["at"] = t
    if save_to is not None:
        if parallel.is_main():
            files.write_atomic(save_to, state_dict(learner))
        parallel.barrier()
    summary = dict(_summary(records, samples, parents, stats), reward_per_step=per_step)
    return records, summary, describe(summary)


def _step(policy, tokenizer, scorer, asked, pool: list[dict], learner: dict, cfg, t: int, step: int):
    """One RLOO step: creator_group rewrites per message from the creator, judged by the solver (policy) and
    rewarded, then the update."""
    k = cfg.creator_group
    with speaking(learner):
        out = parallel.sharded(lambda mine: _sample(learner, asked, mine, cfg, t, step),
                               list(range(len(asked))), desc="creator rollouts")
    texts, token_ids = [o[0] for o in out], [o[1] for o in out]
    records = [dict(r, step=step) for r in _children(asked, texts, pool, cfg)]
    valid = [r for r in records if r["valid"]]
    scored = common.sample_and_score(policy, tokenizer, scorer, valid, cfg, t, f"creator {step}") if valid else []
    for r, s in zip(valid, scored):
        r["rewards"], r["info_raw"] = s["rewards"], s["info"]  # info in the reward's units, as the parents' is
    every = [x for r in valid for x in common.as_floats(r["rewards"]) if np.isfinite(x)]
    lo, hi = (0.0, 1.0) if reward.is_verifiable(cfg.reward) or not every else (min(every), max(every))
    for r in records:
        r.update(creator_reward(r["valid"], r.get("rewards", []), r["parent_task"] or "", r["task"] or "", lo=lo,
                                hi=hi, info_metric=cfg.info_metric, copy_threshold=cfg.copy_threshold,
                                copy_penalty=cfg.copy_penalty))
    rewards_pk = torch.tensor([r["reward"] for r in records], dtype=torch.float32).view(len(asked), k)  # [P, k]
    torch.manual_seed(parallel.stable_seed(cfg.seed, t, step, "creator update"))  # dropout: the same on a rerun
    return records, _update(learner, asked, token_ids, rewards_pk, cfg)


def describe(summary: dict) -> str:
    """A round's summary as one log line."""
    fmt = lambda x, pattern="{:.3f}": "-" if x is None else pattern.format(x)  # noqa: E731
    return (f"{summary['rewrites']} rewrites: creator reward {fmt(summary['creator_reward'])}, valid "
            f"{fmt(summary['valid'], '{:.0%}')}, near-copies {fmt(summary['near_copy'], '{:.0%}')}, children's info "
            f"{fmt(summary['child_info'])} vs parents' {fmt(summary['parent_info'])}" + (
                f"; creator reward per step {summary['reward_per_step'][0]:.3f} -> {summary['reward_per_step'][-1]:.3f}"
                if len(summary.get("reward_per_step", [])) > 1 else ""))


def _sample(learner: dict, asked, mine: list[int], cfg, t: int, step: int) -> list[tuple[list, list]]:
    """creator_group rewrites per message of this rank's share: (texts, token ids) per message."""
    out = generate.sample(learner["model"], learner["tokenizer"], [asked[i][2] for i in mine], n=cfg.creator_group,
                          max_new_tokens=cfg.creator_max_new_tokens, temperature=cfg.creator_temperature,
                          top_p=cfg.top_p, batch_size=cfg.gen_batch_size, stop=list(creator.STOP), chat=False,
                          seeds=[parallel.stable_seed(cfg.seed, t, step, "creator rollout", i) for i in mine])
    return [(list(texts), [list(ids) for ids in tokens]) for texts, tokens in zip(out.texts, out.token_ids)]


def _update(learner: dict, asked, token_ids, rewards_pk: torch.Tensor, cfg) -> dict:
    """One RLOO step on the creator's adapter. Each rank takes its share of the messages; the gradients are summed
    over ranks (each share's loss is divided by the whole batch's count), so every rank takes the same step."""
    k, world, me = cfg.creator_group, parallel.world_size(), parallel.rank()
    creator_lm, tokenizer = learner["model"], learner["tokenizer"]
    device = creator_lm.get_input_embeddings().weight.device
    rows = [(generate.encode_prompt(tokenizer, message, chat=False), token_ids[p][j] or [tokenizer.eos_token_id])
            for p, (_, _, message) in enumerate(asked) for j in range(k)]
    counts = (len(rows), sum(len(r) for _, r in rows))
    mine = list(range(me, len(asked), world))
    with speaking(learner):
        params = [p for p in creator_lm.parameters() if p.requires_grad]
        creator_lm.train()
        loss_sum = 0.0
        for s in range(0, len(mine), cfg.micro_batch_size):
            ps = mine[s:s + cfg.micro_batch_size]
            batch = solver.collate_responses([rows[p * k + j] for p in ps for j in range(k)], device)
            with model.packed_training(creator_lm), trainstate.autocast(device):
                logps = solver.response_logps(creator_lm, batch, cfg)  # [b*k, R]
                loss, _ = losses.rloo_loss(logps, batch["response_mask"], rewards_pk[ps].to(device), beta=0.0,
                                           counts=counts)
            loss.backward()
            loss_sum += loss.item()
        creator_lm.eval()
        for p in params:  # a rank without messages adds zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if world > 1:
                torch.distributed.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise SystemExit("error: the creator's gradient norm is not finite; no update made; rerun to resume")
        trainstate.optimizer_step(learner["optimizer"], learner["scheduler"])
    parts = parallel.sharded(lambda _: [loss_sum], list(range(world)), "creator loss")
    return dict(creator_loss=float(sum(parts)), creator_grad_norm=float(grad_norm))


def _summary(records: list[dict], samples: list[dict], parents: list[dict], stats: dict) -> dict:
    """The round's numbers: is the creator writing valid, new, informative children, harder than their parents?"""
    valid = [r for r in records if r["valid"]]
    by_parent = {s["prompt_id"]: s for s in samples}
    parent_rows = [by_parent[p["id"]] for p in parents if p["id"] in by_parent]

    def mean(values):
        values = [v for v in values if v is not None and np.isfinite(v)]
        return float(np.mean(values)) if values else None
    return dict(rewrites=len(records), creator_reward=mean([r["reward"] for r in records]),
                valid=len(valid) / max(1, len(records)), near_copy=mean([float(r["near_copy"]) for r in valid]),
                child_reward=mean([np.nanmean(common.as_floats(r["rewards"])) for r in valid]),
                child_info=mean([r["info_raw"] for r in valid]),
                parent_reward=mean([np.nanmean(common.as_floats(s["rewards"])) for s in parent_rows if s["rewards"]]),
                parent_info=mean([s["info"] for s in parent_rows]), **stats)
