"""eva: evolving alignment via asymmetric self-play (Ye et al., arXiv 2411.00062): the offline loop.

    python train_eva.py                                   # the CPU demo: SmolLM2-135M, rules reward (README)
    python train_eva.py --preset smoke --run_dir runs/smoke   # a minute or two, what the tests run
    torchrun --nproc_per_node=8 train_eva.py --preset paper --run_dir runs/gemma   # the paper's setting
    python train_eva.py --help                            # every field of config.Config is a flag, described
    python train_eva.py --config run.yaml --lr 1e-4       # fields from a YAML/JSON file; flags win

Iteration 0 is ordinary preference optimisation on the seed prompts. Each later iteration t is eva: estimate
(N scored responses per pool prompt; info = reward gap), select (25% of the pool, weighted by info), evolve (the
creator rewrites each selected prompt into a chain of children), generate (N scored responses per child), pairs
(best-vs-worst, 80% from children), train (one solver update; solver.py). The children join the pool. Each phase
writes iter_<t>/ then a `done_<phase>` marker; rerunning the same command resumes at the first unfinished phase.
"""
import sys
import time

import numpy as np
import torch

import common
import config
import creator
import creator_rl
import endpoint
import files
import online
import parallel
import report
import rundir
import solver
import trainstate
from config import Config
from parallel import print0


def fixed_count(pairs: list[dict], total: int | None, seed: int) -> list[dict]:
    """Exactly `total` pairs (a seeded subset, or every pair repeated in turn when there are too few)."""
    if not total or not pairs or len(pairs) == total:
        return pairs
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in np.resize(order, total)]


# ------------------------------------------------------------------------------------------------- the loop
def phase(run: rundir.Run, t: int, name: str, output: str, make, timed: bool = True) -> list[dict]:
    """One resumable phase of iteration t. Unless its marker exists, make() -> (records, summary, line): the records
    go to iter_<t>/<output>, the summary (with the seconds taken) to the marker and metrics.jsonl, the line to the
    log. Either way the records are read back from the file, so a resumed run continues from what was written."""
    path = run.folder / f"iter_{t}" / output
    if not run.done(t, name):
        start = time.time()
        records, summary, line = make()
        seconds = time.time() - start
        run.write_jsonl(path, records)
        run.mark(t, name, dict(summary, seconds=round(seconds, 1)) if timed else summary)
        print0(f"[iter {t}] {name}: {line}" + (f" ({seconds:.0f} s)" if timed else ""))
    return files.read_jsonl(path)


def mean_reward(samples: list[dict]) -> float:
    return float(np.nanmean([common.as_floats(s["rewards"]) for s in samples])) if samples else 0.0


def estimate(policy, tokenizer, scorer, pool: list[dict], cfg: Config, t: int):
    """N responses per pool prompt from the current solver, scored (at t = 0 this is iteration 0's generation)."""
    samples = common.sample_and_score(policy, tokenizer, scorer, pool, cfg, t, "estimate")
    rewards, informative, n = mean_reward(samples), sum(s["info"] > 0 for s in samples), len(samples)
    return samples, dict(prompts=n, mean_reward=rewards, informative=informative), (
        f"{n} prompts x {cfg.n_samples}, mean reward {rewards:.3f}, informative {informative}/{n}")


def select_parents(pool: list[dict], samples: list[dict], cfg: Config, t: int):
    """The pool prompts to evolve, drawn by informativeness."""
    by_id = {r["id"]: r for r in pool}
    info = creator.informativeness([common.as_floats(s["rewards"]) for s in samples], cfg.info_metric)
    chosen = creator.select(info, cfg.select_fraction, cfg.selection, parallel.stable_seed(cfg.seed, t, "select"))
    return [by_id[samples[i]["prompt_id"]] for i in chosen], dict(selected=len(chosen), pool=len(pool)), (
        f"{len(chosen)} of {len(pool)} prompts ({cfg.selection}, {cfg.info_metric})")


def evolve_prompts(selected: list[dict], pool: list[dict], complete, tokenizer, cfg: Config, t: int):
    """The creator's children of the selected prompts (creator.evolve), too-long ones skipped."""
    evolved, stats = creator.evolve_with(cfg, selected, complete, t, pool)
    evolved = common.drop_long_prompts(evolved, tokenizer, cfg, "evolved prompts")
    rejected = ", ".join(f"{k} {v}" for k, v in stats["rejected"].items() if v) or "none"
    kept, written = stats["kept"], stats["written"]
    return evolved, dict(children=len(evolved), **stats), (
        f"{len(selected)} parents -> {kept} children: {written} written by the creator "
        f"({100 * written / max(1, kept):.0f}%), {kept - written} by the in-code constraint step ({stats['fallback']} "
        f"replacing a rejected link); {stats['candidates']} candidates for {stats['creator_calls']} links, rejected: "
        f"{rejected}; {len(evolved)} kept under max_prompt_tokens")


def sample_children(policy, tokenizer, scorer, evolved: list[dict], cfg: Config, t: int):
    """N responses per evolved prompt, scored."""
    samples = common.sample_and_score(policy, tokenizer, scorer, evolved, cfg, t, "generate")
    rewards = mean_reward(samples)
    return samples, dict(prompts=len(evolved), mean_reward=rewards), (
        f"{len(evolved)} evolved prompts x {cfg.n_samples}, mean reward {rewards:.3f}")


def build_pairs(pool, samples, evolved, evolved_samples, cfg: Config, t: int):
    """Best-vs-worst pairs: from the pool only (iteration 0, --no-evolve), else mixed with the children's."""
    total, seed = cfg.pairs_per_iteration or None, parallel.stable_seed(cfg.seed, t, "mix")
    pairs = creator.make_pairs(pool, samples, source="original")
    if t > 0 and cfg.evolve:
        evolved_pairs = creator.make_pairs(evolved, evolved_samples, source="evolved")
        pairs = creator.mix(evolved_pairs, pairs, evolved_fraction=cfg.evolved_fraction, total=total, seed=seed)
    pairs = fixed_count(pairs, total, seed)
    n_evolved = sum(p["source"] == "evolved" for p in pairs)
    return pairs, dict(pairs=len(pairs), evolved=n_evolved, original=len(pairs) - n_evolved), (
        f"{len(pairs)} ({n_evolved} from evolved prompts)")


def update_solver(policy, masters, tokenizer, pairs: list[dict], pool_next: list[dict], cfg: Config,
                  run: rundir.Run, t: int, device):
    """One solver update on the pairs, its weights written; the phase's records are the next iteration's pool."""
    if not pairs:
        print0(f"[iter {t}] train: no pairs (every prompt's responses tied); the solver is unchanged")
        summary = dict(pairs=0, steps=0)
    else:
        summary = solver.train(policy, masters, tokenizer, pairs, cfg, run, t, device)
    trainstate.save_solver(policy, masters, tokenizer, cfg, run.iter_dir(t), device)
    loss = "" if summary.get("first_loss") is None else \
        f", loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
    return pool_next, summary, f"{summary['pairs']} pairs, {summary['steps']} steps{loss}"


def main(argv=None) -> None:
    cfg = config.parse_config(argv)
    if cfg.online:  # online eva: the creator evolves the pool while the solver trains (online.py)
        return online.run(cfg)
    device, seeds, heldout, run = common.start_run(cfg)
    print0(f"eva: {len(seeds)} seed prompts, {len(heldout)} held-out, solver {cfg.model}, reward {cfg.reward}, "
           f"loss {cfg.loss}, world size {parallel.world_size()}, device {device}")
    policy, masters, tokenizer, scorer, creator_lm = common.load_models(cfg, run, device)
    learner = creator_rl.attach(policy, tokenizer, cfg, *creator_lm) if cfg.creator_learns else None  # its adapter
    common.evaluate_once(policy, tokenizer, heldout, cfg, run, "start")
    pool = common.drop_long_prompts(seeds, tokenizer, cfg, "seed prompts")
    if not pool:
        raise ValueError(f"{cfg.seed_prompts}: every prompt is longer than --max_prompt_tokens {cfg.max_prompt_tokens}")

    for t in range(cfg.eva_iterations + 1):
        folder = run.iter_dir(t)
        parallel.barrier()
        if t > 0:
            pool = files.read_jsonl(run.folder / f"iter_{t - 1}" / "pool_next.jsonl")
        if run.done(t, "train"):
            continue
        run.write_jsonl(folder / "pool.jsonl", pool)
        samples = phase(run, t, "estimate", "samples.jsonl", lambda: estimate(policy, tokenizer, scorer, pool, cfg, t))
        evolved, evolved_samples = [], []
        if t > 0 and cfg.evolve:
            selected = phase(run, t, "select", "selected.jsonl", lambda: select_parents(pool, samples, cfg, t),
                             timed=False)
            if learner is not None:  # the creator's own RLOO round on rewrites of these parents (creator_rl.py)
                creator_rl.load(learner, run, t - 1)
                phase(run, t, "creator", "creator_rollouts.jsonl", lambda: creator_rl.learn(
                    policy, tokenizer, scorer, selected, samples, pool, learner, cfg, t,
                    save_to=run.iter_dir(t) / creator_rl.STATE_FILE))
                creator_rl.load(learner, run, t)

            def complete():  # the creator's `complete`: with its own adapter when it learns
                made = common.make_completer(cfg, t, policy, tokenizer, *creator_lm)
                return made if learner is None else creator_rl.completer(learner, made)
            evolved = phase(run, t, "evolve", "evolved.jsonl",
                            lambda: evolve_prompts(selected, pool, complete(), tokenizer, cfg, t))
            evolved_samples = phase(run, t, "generate", "evolved_samples.jsonl",
                                    lambda: sample_children(policy, tokenizer, scorer, evolved, cfg, t))
        pairs = phase(run, t, "pairs", "pairs.jsonl",
                      lambda: build_pairs(pool, samples, evolved, evolved_samples, cfg, t), timed=False)
        phase(run, t, "train", "pool_next.jsonl",
              lambda: update_solver(policy, masters, tokenizer, pairs, pool + evolved, cfg, run, t, device))
        solver.drop_checkpoint(folder)

    common.evaluate_once(policy, tokenizer, heldout, cfg, run, "end")
    if parallel.is_main():
        print(report.write_report(run.folder, cfg.eva_iterations))
    run.close()
    parallel.barrier()


if __name__ == "__main__":
    # Expected faults end in one line (the phase markers keep the finished work; rerun to resume), bugs in a traceback.
    try:
        main()
    except (FileNotFoundError, ValueError, endpoint.EndpointError) as err:
        sys.exit(f"error: {err}")
    except torch.cuda.OutOfMemoryError as err:
        sys.exit(f"error: out of memory ({(str(err).strip().splitlines() or [''])[0]}); lower --micro_batch_size, "
                 f"or use --gradient_checkpointing / --load_in_4bit; rerun the same command to resume")
