"""Online eva: the creator evolves the prompt pool while the solver trains with RLOO or GRPO.

    python train_eva.py --preset online --run_dir runs/online      # the CPU demo: SmolLM2-135M, rules reward
    torchrun --nproc_per_node=8 train_eva.py --online --model google/gemma-2-9b-it --reward hf:<id> --run_dir runs/o

Every step (one optimizer step, or grpo_iterations of them):
  draw     online_prompts prompts from the pool: evolved_fraction of them from evolved prompts (once there are any),
           the rest from the seeds; in each part prompts never tried come first, then draws weighted by info
  sample   n_samples (k) responses per prompt from the current policy (generate.sample), scored by the reward
  info     informativeness of those k rewards (--info_metric; the online preset's max - mean), kept per prompt
  update   RLOO or GRPO (losses.py); the reference of the KL term is the policy at the start of the run
Every evolve_every steps the creator selects among the prompts measured since its last round (creator.select on
their info) and evolves them (creator.evolve, with its de-duplication); the children join the pool untried, so
they are drawn next. Every save_every steps a checkpoint (trainable weights, optimizer, scheduler, pool and info,
RNG, step) is written atomically; rerunning the same command resumes from it. The run folder gets metrics.jsonl
(a line per step and per creator round), online_state.pt, pool.jsonl, adapter/ (LoRA) or model/ (full fine-tuning),
eval_start.json and eval_end.json, report.md and report.png.
"""
import math
import time
from contextlib import nullcontext

import numpy as np
import torch

import common
import creator
import creator_rl
import generate
import losses
import model
import parallel
import report
import rundir
import solver as solver_lib
import trainstate
from parallel import print0



def loss_settings(cfg) -> dict:
    """The --online_algo's hyperparameters: losses.ONLINE_LOSSES's defaults, then the flags (--online_kl < 0 keeps
    the algorithm's own KL weight beta)."""
    algo = losses.ONLINE_LOSSES[cfg.online_algo]
    flags = dict(beta=cfg.online_kl, epsilon=cfg.grpo_epsilon, scale_rewards=cfg.grpo_scale_rewards,
                 aggregation=cfg.grpo_aggregation)
    return {**algo.hyper, **{k: flags[k] for k in algo.hyper if k != "beta" or cfg.online_kl >= 0}}


# ------------------------------------------------------------------------------------------------- the prompt pool
def draw_batch(pool: list[dict], info: dict, n: int, evolved_fraction: float, seed: int) -> list[int]:
    """Indices of the n prompts of a step: round(n * evolved_fraction) evolved (parent set) and the rest original,
    either side topped up from the other when it runs short (creator.split_counts). In each side, prompts never
    tried come first (in a seeded order), then draws weighted by their latest info (creator.weighted_order), the
    prompts with info 0 last."""
    rng = np.random.default_rng(seed)

    def pick(indices: list[int], want: int) -> list[int]:
        untried = [i for i in indices if pool[i]["id"] not in info]
        tried = [i for i in indices if pool[i]["id"] in info]
        untried = [untried[j] for j in rng.permutation(len(untried))]
        ranked = [tried[j] for j in creator.weighted_order(np.array([info[pool[i]["id"]] for i in tried]), rng)]
        return (untried + ranked)[:want]

    evolved = [i for i, r in enumerate(pool) if r.get("parent") is not None]
    original = [i for i, r in enumerate(pool) if r.get("parent") is None]
    n_e, n_o = creator.split_counts(n, evolved_fraction, len(evolved), len(original))
    return pick(evolved, n_e) + pick(original, n_o)


# ------------------------------------------------------------------------------------------------- rollouts -> tensors
def encode(tokenizer, prompt: str, text: str, finish: str, cfg, end_id: int) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids), encoded as the offline loop encodes a pair's response."""
    return (generate.encode_prompt(tokenizer, prompt)[-cfg.max_prompt_tokens:],
            solver_lib.encode_response(tokenizer, text, finish, cfg, end_id))


def filled_rewards(samples: list[dict]) -> torch.Tensor:
    """[P, k] rewards; a reward that could not be computed (null) is replaced by the mean of its prompt's others."""
    rows = []
    for s in samples:
        r = np.array(common.as_floats(s["rewards"]), dtype=np.float64)  # [k]
        fill = float(np.nanmean(r)) if np.isfinite(r).any() else 0.0
        rows.append(np.where(np.isfinite(r), r, fill))
    return torch.tensor(np.array(rows), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- one update
def policy_update(policy, trained, reference, params, optimizer, scheduler, rows, rewards_pk: torch.Tensor, cfg,
                  device, step: int) -> dict:
    """RLOO or GRPO (losses.ONLINE_LOSSES) on this rank's share of a step's rollouts. rows: (prompt ids, response
    ids), prompt-major, k per prompt, all ranks' rows in order; rewards_pk [P, k] for all prompts. Each micro batch's
    loss is divided by the whole batch's count over the world size, so that DDP's average of the ranks' gradients
    is the gradient of the whole batch's loss, whatever the split."""
    k, world, me = cfg.n_samples, parallel.world_size(), parallel.rank()
    algo, settings = losses.ONLINE_LOSSES[cfg.online_algo], loss_settings(cfg)
    counts = (len(rows) / world, sum(len(r) for _, r in rows) / world)  # every rank holds every row
    per_rank = rewards_pk.shape[0] // world
    mine = range(me * per_rank, (me + 1) * per_rank)  # this rank's prompts
    micro = [list(mine[s:s + cfg.micro_batch_size]) for s in range(0, per_rank, cfg.micro_batch_size)]
    batches = [solver_lib.collate_responses([rows[p * k + j] for p in ps for j in range(k)], device) for ps in micro]
    refs, olds = [None] * len(batches), [None] * len(batches)  # the reference's and the sampler's log-probs
    with torch.no_grad(), trainstate.autocast(device):
        if reference is not None:
            with reference[1](), model.packed_training(reference[0]):
                refs = [solver_lib.response_logps(reference[0], b, cfg) for b in batches]
        if cfg.grpo_iterations > 1:  # later iterations are off-policy: their ratio is to the sampling policy
            with model.packed_training(trained):
                olds = [solver_lib.response_logps(trained, b, cfg) for b in batches]
    kls, clipped = [], []
    for it in range(cfg.grpo_iterations):
        loss_sum = 0.0
        for m, (ps, batch) in enumerate(zip(micro, batches)):
            # packed_training around forward and backward: checkpointed layers run their forward again in backward
            with trainstate.accumulating(policy, m + 1 == len(micro)), model.packed_training(trained):
                with trainstate.autocast(device):
                    logps = solver_lib.response_logps(policy, batch, cfg)  # [b*k, R]
                    loss, stats = algo.fn(logps, batch["response_mask"], rewards_pk[ps].to(device), ref_logps=refs[m],
                                          old_logps=olds[m], counts=counts, **settings)
                stop_if_nonfinite(loss, f"the {cfg.online_algo} loss", step)
                loss.backward()
            loss_sum += loss.item()
            clipped += [stats["clipped"]] if "clipped" in stats else []
            if it == 0 and refs[m] is not None:
                kls += (logps.detach() - refs[m]).sum(-1).tolist()  # per-response KL, summed over tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        stop_if_nonfinite(grad_norm, "the gradient norm", step)
        trainstate.optimizer_step(optimizer, scheduler)
    # the whole batch's numbers: each rank's loss is its share of the sum (times world), per-row lists gathered
    parts = parallel.sharded(lambda _: [(loss_sum, kls, clipped)], list(range(world)), "step stats")
    kls, clipped = [x for p in parts for x in p[1]], [x for p in parts for x in p[2]]
    return dict(loss=sum(p[0] for p in parts) / world, kl=float(np.mean(kls)) if kls else None,
                grad_norm=float(grad_norm), clipped=float(np.mean(clipped)) if clipped else None)


def stop_if_nonfinite(value: torch.Tensor, what: str, step: int) -> None:
    """Stop every rank together (one all-reduce of a flag) before a NaN or inf reaches the weights."""
    if parallel.any_rank(not torch.isfinite(value).all()):
        raise SystemExit(f"error: online step {step}: {what} is not finite; no update made; rerun to resume from the "
                         f"last checkpoint")


# ------------------------------------------------------------------------------------------------- the creator
def creator_round(cfg, round_: int, step: int, pool: list[dict], info: dict, seen: dict, solver, tokenizer,
                  creator_model, creator_tokenizer, scorer=None, learner=None) -> dict:
    """select among the prompts measured in the last evolve_every steps, evolve them; children join `pool`. With
    --creator_learns the creator first takes its own RLOO round on these parents (creator_rl.learn)."""
    recent = [r for r in pool if seen.get(r["id"], 0) > step - cfg.evolve_every]
    values = np.array([info[r["id"]] or math.nan for r in recent])  # 0 (all rewards tied) is never selected
    chosen = creator.select(values, cfg.select_fraction, cfg.selection, parallel.stable_seed(cfg.seed, step,
                                                                                               "select"))
    parents = [recent[i] for i in chosen]
    t0 = time.time()
    children, stats, learned = [], dict(creator_calls=0, rejected={}), {}
    if parents and learner is not None:
        measured = [{"prompt_id": r["id"], "rewards": [], "info": info[r["id"]]} for r in parents]
        _, learned, _ = creator_rl.learn(solver, tokenizer, scorer, parents, measured, pool, learner, cfg, round_)
    if parents:
        complete = common.make_completer(cfg, round_, solver, tokenizer, creator_model, creator_tokenizer)
        complete = complete if learner is None else creator_rl.completer(learner, complete)
        children, stats = creator.evolve_with(cfg, parents, complete, round_, pool)
        children = common.drop_long_prompts(children, tokenizer, cfg, "evolved prompts")
    pool.extend(children)
    return dict(step=step, phase="evolve", round=round_, recent=len(recent), parents=len(parents),
                children=len(children), pool=len(pool), creator_calls=stats["creator_calls"],
                rejected={k: v for k, v in stats["rejected"].items() if v}, seconds=round(time.time() - t0, 1),
                **({"creator": learned} if learner is not None else {}))


# ------------------------------------------------------------------------------------------------- the loop
def train(cfg, run, solver, masters, tokenizer, scorer, pool: list[dict], device, creator_model=None,
          creator_tokenizer=None, learner=None) -> list[dict]:
    """The online loop, resumable from online_state.pt; returns the final pool with each prompt's info."""
    trained = solver if masters is None else masters
    reference = None  # (model, context to run it in): the policy at the start of the run
    if loss_settings(cfg)["beta"] > 0:
        if cfg.lora:  # the same module with its adapter switched off: no second copy of the weights
            reference = (solver, solver.disable_adapter)
        elif trainstate.uses_fsdp(cfg):  # full fine-tuning, sharded: a frozen copy of the starting weights, sharded too
            reference = (trainstate.load_sharded(cfg.model, device, model.default_dtype(device)).requires_grad_(False),
                         nullcontext)
        else:  # full fine-tuning: a frozen copy of the starting weights
            ref_model, _ = model.load_model(cfg.model, device=device)
            reference = (ref_model.requires_grad_(False), nullcontext)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer, scheduler = trainstate.make_optimizer(params, cfg, cfg.online_steps * cfg.grpo_iterations)
    info, seen, rounds, start = {}, {}, 0, 0  # info: prompt id -> latest info; seen: id -> last step drawn
    ckpt = run.folder / "online_state.pt"
    torch.manual_seed(parallel.stable_seed(cfg.seed, "online"))  # dropout's draws
    state = trainstate.restore_checkpoint(ckpt, trained, optimizer, scheduler, "[online]")
    if state is not None:
        start, pool, info, seen, rounds = (state[k] for k in ("step", "pool", "info", "seen", "rounds"))
        trainstate.copy_weights(trained, solver)
        if learner is not None:
            creator_rl.load_state_dict(learner, state["creator"])
        print0(f"[online] resuming at step {start}/{cfg.online_steps}, pool {len(pool)}")
    run.forget(lambda r: "iteration" not in r and r.get("step", 0) > start)  # a killed run's steps after `start`
    policy = trainstate.wrap(trained, cfg)
    end_id = model.turn_end_id(tokenizer)
    bar = parallel.progress(range(start, cfg.online_steps), desc="online", initial=start, total=cfg.online_steps)
    for step in (s + 1 for s in bar):
        t0 = time.time()
        chosen = draw_batch(pool, info, cfg.online_prompts, cfg.evolved_fraction,
                            parallel.stable_seed(cfg.seed, step, "draw"))
        batch = [pool[i] for i in chosen]
        samples = common.sample_and_score(solver, tokenizer, scorer, batch, cfg, step, "online")
        rewards_pk = filled_rewards(samples)  # [P, k]
        batch_info = np.nan_to_num(creator.informativeness(rewards_pk.tolist(), cfg.info_metric))  # ties: 0
        for r, value in zip(batch, batch_info):
            info[r["id"]], seen[r["id"]] = float(value), step
        rows = [encode(tokenizer, r["prompt"], text, finish, cfg, end_id)
                for r, s in zip(batch, samples) for text, finish in zip(s["responses"], s["finish"])]
        t1 = time.time()
        if trainstate.uses_fsdp(cfg) and device.type == "cuda":
            solver.to("cpu")  # out of the GPU's way while the shards train (docs/memory.md)
        policy.train()
        stats = policy_update(policy, trained, reference, params, optimizer, scheduler, rows, rewards_pk, cfg,
                              device, step)
        trained.eval()
        trainstate.copy_weights(trained, solver.to(device))  # full fine-tuning: the sampler takes the fp32 steps
        record = dict(step=step, reward=float(rewards_pk.mean()), **stats, info=float(batch_info.mean()),
                      informative=int((batch_info > 0).sum()), pool=len(pool),
                      evolved=sum(r.get("parent") is not None for r in batch), lr=scheduler.get_last_lr()[0],
                      gen_seconds=round(t1 - t0, 2), update_seconds=round(time.time() - t1, 2))
        run.log(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", pool=len(pool))
        if cfg.evolve_every and step % cfg.evolve_every == 0 and step < cfg.online_steps:
            rounds += 1
            evolved = creator_round(cfg, rounds, step, pool, info, seen, solver, tokenizer, creator_model,
                                    creator_tokenizer, scorer, learner)
            run.log(evolved)
            print0(f"[online] step {step}: creator round {rounds}: {evolved['parents']} of {evolved['recent']} "
                   f"recent prompts -> {evolved['children']} children, pool {len(pool)} ({evolved['seconds']:.0f} s)")
            if evolved.get("creator"):
                print0(f"[online] step {step}: the creator learned: {creator_rl.describe(evolved['creator'])}")
        if step % cfg.save_every == 0 or step == cfg.online_steps:
            trainstate.save_checkpoint(ckpt, trained, optimizer, scheduler, step, pool=pool, info=info, seen=seen,
                                       rounds=rounds, creator=learner and creator_rl.state_dict(learner))
            rundir.fault("online", 0, step)  # test hook
    return [{**r, "info": info.get(r["id"]), "last_step": seen.get(r["id"])} for r in pool]


def run(cfg) -> None:
    """train_eva.py --online: set up as the offline loop does, evaluate, train online, evaluate, report."""
    device, seeds, heldout, run_ = common.start_run(cfg)
    print0(f"online eva: {len(seeds)} seed prompts, {len(heldout)} held-out, solver {cfg.model}, reward {cfg.reward}, "
           f"{cfg.online_algo} k={cfg.n_samples} beta={loss_settings(cfg)['beta']}, {cfg.online_steps} steps x "
           f"{cfg.online_prompts} prompts, creator every {cfg.evolve_every} steps, world size "
           f"{parallel.world_size()}, device {device}")
    solver, masters, tokenizer, scorer, (creator_model, creator_tokenizer) = common.load_models(cfg, run_, device)
    learner = None  # --creator_learns: the creator's adapter and optimizer
    if cfg.creator_learns:
        learner = creator_rl.attach(solver, tokenizer, cfg, creator_model, creator_tokenizer)

    common.evaluate_once(solver, tokenizer, heldout, cfg, run_, "start")
    pool = common.drop_long_prompts(seeds, tokenizer, cfg, "seed prompts")
    if len(pool) < cfg.online_prompts:
        raise ValueError(f"--online_prompts {cfg.online_prompts}: only {len(pool)} seed prompts fit "
                         f"--max_prompt_tokens {cfg.max_prompt_tokens}")
    t0 = time.time()
    final_pool = train(cfg, run_, solver, masters, tokenizer, scorer, pool, device, creator_model, creator_tokenizer,
                       learner)
    run_.write_jsonl(run_.folder / "pool.jsonl", final_pool)
    trainstate.save_solver(solver, masters, tokenizer, cfg, run_.folder, device)
    print0(f"[online] trained {cfg.online_steps} steps, pool {len(final_pool)} ({time.time() - t0:.0f} s this run)")
    common.evaluate_once(solver, tokenizer, heldout, cfg, run_, "end")
    if parallel.is_main():
        print(report.write_online_report(run_.folder))
    run_.close()
    parallel.barrier()
