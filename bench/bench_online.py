"""Benchmark (not a test): an online RLOO step in eva against TRL's RLOOTrainer, side by side.

    pip install trl                              # benchmark-only; without it the TRL column is skipped
    python bench/bench_online.py                 # bundled SmolLM2-135M + LoRA r16/alpha 32, CPU fp32
    python bench/bench_online.py --steps 6 --repeats 3

Both sides run the same RLOO steps: the same model with the same LoRA adapter (model.add_lora, same seed), the
first steps x prompts seed prompts (data/seed_prompts.jsonl), k = 4 responses per prompt sampled at temperature
0.7, top-p 0.9, up to 48 new tokens (the online preset's settings), scored by the rules reward; 8 prompts (32
responses) per optimizer step in micro-batches of 4 prompts (16 responses), AdamW lr 2e-4, KL weight 0.05 to the
starting policy (the adapters switched off), clipping at 1.0. Timed:
  eva   online.train with the creator off (--evolve_every 0): sampling with generate.sample, scoring, the update
        (one final checkpoint write included).
  trl   RLOOTrainer.train(): sampling with the model's generate(), scoring, the update.
Generation's share of a step: eva from its per-step metrics (sampling + scoring), TRL from a timer around the
model's generate() (sampling only). Mean response length is printed for both: a side that writes longer answers
pays for it. Each run is a fresh process, eva and TRL alternating (--repeats each).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_train  # noqa: E402  (its fresh-process runner)

K, PROMPTS_PER_STEP, MICRO_PROMPTS, MAX_NEW_TOKENS, LR, BETA = 4, 8, 4, 48, 2e-4, 0.05


def records(args) -> list[dict]:
    import prompts
    return prompts.read_prompts(str(ROOT / "data/seed_prompts.jsonl"), "rules", limit=args.steps * PROMPTS_PER_STEP)


def run_eva(args, folder: Path) -> dict:
    import online
    import parallel
    import rundir
    import common
    import config
    cfg = config.parse_config(["--preset", "online", "--run_dir", str(folder), "--evolve_every", "0",
                                  "--online_steps", str(args.steps), "--online_prompts", str(PROMPTS_PER_STEP),
                                  "--n_samples", str(K), "--micro_batch_size", str(MICRO_PROMPTS),
                                  "--max_new_tokens", str(MAX_NEW_TOKENS), "--lr", str(LR), "--online_kl", str(BETA),
                                  "--warmup_ratio", "0", "--save_every", str(args.steps), "--model", args.model])
    device = parallel.init()
    run = rundir.open_run(cfg)
    solver, masters, tokenizer, scorer, _ = common.load_models(cfg, run, device)
    pool = records(args)
    import generate
    lengths, sample = [], generate.sample

    def counted(*a, **kw):
        out = sample(*a, **kw)
        lengths.extend(len(ids) for rows in out.token_ids for ids in rows)
        return out

    generate.sample = counted
    t0 = time.perf_counter()
    online.train(cfg, run, solver, masters, tokenizer, scorer, pool, device)
    seconds = time.perf_counter() - t0
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "gen_seconds" in s]
    gen = sum(s["gen_seconds"] for s in steps)
    return dict(seconds=seconds, gen_seconds=gen, length=statistics.mean(lengths),
                reward=statistics.mean(s["reward"] for s in steps))


def run_trl(args, folder: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer
    import model
    import reward
    torch.manual_seed(0)
    solver, tokenizer = model.load_model(args.model)
    solver = model.add_lora(solver, r=16, alpha=32)
    recs = records(args)
    by_id = {str(r["id"]): r for r in recs}
    rows = [dict(prompt=[{"role": "user", "content": r["prompt"]}], record_id=str(r["id"])) for r in recs]
    seen = dict(lengths=[], rewards=[], gen=0.0)

    def rules(prompts, completions, record_id, **_):
        scores = [reward.rules_reward(by_id[i], c[0]["content"]) for i, c in zip(record_id, completions)]
        seen["rewards"] += scores
        return scores

    generate = solver.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        seen["gen"] += time.perf_counter() - t0
        prompt_len = kw["input_ids"].shape[1] if "input_ids" in kw else a[0].shape[1]
        pad = tokenizer.pad_token_id
        seen["lengths"] += [int((row[prompt_len:] != pad).sum()) for row in out]
        return out

    solver.generate = timed_generate
    config = RLOOConfig(output_dir=str(folder), per_device_train_batch_size=MICRO_PROMPTS * K,
                        gradient_accumulation_steps=PROMPTS_PER_STEP // MICRO_PROMPTS, num_generations=K,
                        max_completion_length=MAX_NEW_TOKENS, temperature=0.7, top_p=0.9, learning_rate=LR, beta=BETA,
                        lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, max_steps=args.steps,
                        shuffle_dataset=False, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                        seed=0, dataloader_num_workers=0, disable_tqdm=True, gradient_checkpointing=False)
    trainer = RLOOTrainer(model=solver, reward_funcs=rules, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, gen_seconds=seen["gen"], length=statistics.mean(seen["lengths"]),
                reward=statistics.mean(seen["rewards"]))


def worker(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        return (run_eva if args.side == "eva" else run_trl)(args, Path(tmp) / "run")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model spec for model.load_model")
    p.add_argument("--steps", type=int, default=4, help="RLOO steps per run")
    p.add_argument("--repeats", type=int, default=2, help="fresh-process runs per side, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--side", choices=["eva", "trl"], help=argparse.SUPPRESS)  # set in the worker processes
    args = p.parse_args()
    if args.side:
        print(json.dumps(worker(args)))
        return
    results = bench_train.alternate_sides(__file__, args.repeats, {**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    print(f"model {args.model} + LoRA r16/alpha 32, RLOO k={K}, {PROMPTS_PER_STEP} prompts per step, up to "
          f"{MAX_NEW_TOKENS} new tokens, {args.steps} steps per run, {args.threads} threads, "
          f"{bench_train.versions(results)}; {args.repeats} fresh runs per side, alternating")
    print(f"{'side':<5} {'steps/s best':>12} {'median':>8} {'s/step med':>10} {'generation share':>16} "
          f"{'mean length':>11} {'mean reward':>11}")
    summary = {}
    for side, runs in results.items():
        rate = sorted(args.steps / r["seconds"] for r in runs)
        share = statistics.median(r["gen_seconds"] / r["seconds"] for r in runs)
        summary[side] = dict(best=rate[-1], median=statistics.median(rate))
        print(f"{side:<5} {rate[-1]:>12.4f} {statistics.median(rate):>8.4f} {1 / statistics.median(rate):>10.1f} "
              f"{share:>16.2f} {statistics.mean(r['length'] for r in runs):>11.1f} "
              f"{statistics.mean(r['reward'] for r in runs):>11.3f}")
    if "trl" in summary:
        e, t = summary["eva"], summary["trl"]
        print(f"eva / trl: steps/s {e['best'] / t['best']:.2f}x best, {e['median'] / t['median']:.2f}x median")


if __name__ == "__main__":
    main()
