"""Benchmark (not a test): eva's training phase against TRL's DPOTrainer on the same pairs, side by side.

    pip install trl                                  # benchmark-only; without it the TRL column is skipped
    python bench/bench_train.py                      # bundled SmolLM2-135M + LoRA r16/alpha 32, 32 pairs, CPU fp32
    python bench/bench_train.py --no-lora            # full fine-tuning
    python bench/bench_train.py --device cuda        # on a GPU (bf16 weights; eva autocasts, TRL runs bf16)

Both sides train the same model with the same LoRA adapter (model.add_lora, same seed) on the same pairs: DPO,
beta 0.1, one epoch, batch 8 as 2 micro-batches of 4, AdamW lr 5e-4 with one warm-up step (10% of 4 steps) then
cosine, clipping at 1.0, no gradient checkpointing (TRL's default is on), fp32 on the CPU. Timed:
  eva   solver.train, the whole phase: tokenising the pairs, the reference pass (once per pair, before the first
        step), the optimizer steps.
  trl   DPOTrainer.train() (the dataset is tokenised in the constructor, untimed): every step runs the reference
        forward too (with LoRA: the same model with its adapters disabled; full fine-tuning: a frozen copy).
The pairs are the demo's: the first --pairs seed prompts (data/seed_prompts.jsonl), 4 responses each sampled by
the bundled model (temperature 0.7, top-p 0.9, up to 96 new tokens, fixed seeds), the best and the worst under the
rules reward as chosen and rejected. They are built once and cached in runs/bench_train_pairs_<n>.json.

Each run is a fresh process, eva and TRL alternating (--repeats each), so neither inherits the other's memory or
warm caches and the machine's load hits both alike. Reported: pairs/s and training tokens/s (prompt + response
tokens of both responses as eva tokenises them, padding not counted), best and median over the repeats, and peak
memory: on the CPU the peak resident set of the phase (VmHWM, reset through /proc/self/clear_refs when the phase
starts) minus the resident set then, with glibc told to return every freed block over 128 KiB
(MALLOC_MMAP_THRESHOLD_) so freed tensors do not linger in the count; on CUDA torch.cuda.max_memory_allocated minus
the allocation at the start. The first-step loss of each side is printed as a check (DPO at the reference: ln 2).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _proc_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """n demo-like text pairs {prompt_id, prompt, chosen, rejected, p_chosen, p_rejected}, cached under runs/."""
    path = ROOT / "runs" / f"bench_train_pairs_{n}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import generate
    import model
    import prompts
    import reward
    records = prompts.read_prompts(str(ROOT / "data/seed_prompts.jsonl"), "rules", limit=n)
    policy, tokenizer = model.load_model("default")
    print(f"[bench] sampling 4 responses for {len(records)} seed prompts (once, cached in {path})", file=sys.stderr)
    out = generate.sample(policy, tokenizer, [r["prompt"] for r in records], n=4, max_new_tokens=96,
                          temperature=0.7, top_p=0.9, seed=seed, batch_size=32)
    pairs = []
    for record, texts, finish in zip(records, out.texts, out.finish):
        scores = [reward.rules_reward(record, t) for t in texts]
        best, worst = max(range(4), key=scores.__getitem__), min(range(4), key=scores.__getitem__)
        if best == worst:
            best, worst = 0, 3
        pairs.append(dict(prompt_id=record["id"], prompt=record["prompt"], chosen=texts[best], rejected=texts[worst],
                          chosen_finish=finish[best], rejected_finish=finish[worst], p_chosen=0.5, p_rejected=0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(pairs, indent=1))
    return pairs


def load_solver(args: argparse.Namespace):
    """The model both sides train: same weights, same adapter (or none), same seed."""
    import torch
    import model
    torch.manual_seed(0)
    policy, tokenizer = model.load_model(args.model, device=args.device)
    if args.lora:
        policy = model.add_lora(policy, r=16, alpha=32)
    return policy, tokenizer


def run_eva(args, solver, tokenizer, pairs, folder: Path) -> tuple[callable, callable]:
    import torch
    import rundir
    import solver as solver_lib
    import config
    cfg = config.Config(run_dir=str(folder), lora=args.lora, lr=5e-4, epochs=1, batch_size=8, micro_batch_size=4,
                           loss="dpo", beta=0.1, max_new_tokens=96)
    run = rundir.Run(folder)
    device = torch.device(args.device)
    masters = None if args.lora else solver  # full fine-tuning steps the fp32 weights themselves (fp32 on the CPU)
    phase = lambda: solver_lib.train(solver, masters, tokenizer, pairs, cfg, run, 0, device)
    first_loss = lambda: json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    return phase, first_loss


def run_trl(args, solver, tokenizer, pairs, folder: Path) -> tuple[callable, callable]:
    import copy
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    rows = [dict(prompt=[{"role": "user", "content": p["prompt"]}],
                 chosen=[{"role": "assistant", "content": p["chosen"]}],
                 rejected=[{"role": "assistant", "content": p["rejected"]}]) for p in pairs]
    config = DPOConfig(output_dir=str(folder), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                       num_train_epochs=1, learning_rate=5e-4, lr_scheduler_type="cosine", warmup_steps=1,
                       beta=0.1, max_grad_norm=1.0, weight_decay=0.0, gradient_checkpointing=False,
                       bf16=args.device == "cuda", use_cpu=args.device == "cpu", report_to=[], save_strategy="no",
                       logging_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True, max_length=None)
    ref_model = None if args.lora else copy.deepcopy(solver).eval().requires_grad_(False)
    trainer = DPOTrainer(model=solver, ref_model=ref_model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    first_loss = lambda: next(r["loss"] for r in trainer.state.log_history if "loss" in r)
    return trainer.train, first_loss


def worker(args: argparse.Namespace) -> dict:
    """Load the model and the pairs, run one side's training phase, return seconds, peak memory, first loss."""
    import torch
    torch.set_num_threads(args.threads)
    import model
    import solver as solver_lib
    import config
    pairs = make_pairs(args.pairs)
    solver, tokenizer = load_solver(args)
    cfg = config.Config(max_new_tokens=96)
    encoded = [solver_lib.encode_pair(tokenizer, p, cfg, model.turn_end_id(tokenizer)) for p in pairs]
    tokens = sum(2 * len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in encoded)
    with tempfile.TemporaryDirectory() as tmp:
        phase, first_loss = (run_eva if args.side == "eva" else run_trl)(args, solver, tokenizer, pairs, Path(tmp))
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
            before = _proc_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        phase()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if cuda else _proc_kib("VmHWM") * 1024
        return dict(seconds=seconds, peak=peak - before, tokens=tokens, loss=first_loss())


def alternate_sides(script: str, repeats: int, env: dict) -> dict:
    """Run `script` again with --side eva and --side trl (TRL only where installed), `repeats` times each,
    alternating, each in a fresh process; {side: [the JSON each run printed last]}."""
    sides = ["eva"]
    if importlib.util.find_spec("trl") is None:
        print("TRL is not installed in this Python, so its column is skipped; to compare, install it (benchmark-only) "
              "with `pip install trl` and rerun.")
    else:
        sides.append("trl")
    results = {side: [] for side in sides}
    for _ in range(repeats):
        for side in sides:
            out = subprocess.run([sys.executable, script, *sys.argv[1:], "--side", side], capture_output=True,
                                 text=True, env=env)
            if out.returncode != 0:
                sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


def versions(sides) -> str:
    """torch's version, and TRL's when it ran: for the header line of a side-by-side table."""
    import torch
    text = f"torch {torch.__version__}"
    if "trl" in sides:
        import trl
        text += f", trl {trl.__version__}"
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model spec for model.load_model")
    p.add_argument("--pairs", type=int, default=32, help="preference pairs (first N seed prompts)")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                   help="LoRA r16/alpha 32 on every linear layer (--no-lora: full fine-tuning)")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per side, alternating")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--side", choices=["eva", "trl"], help=argparse.SUPPRESS)  # set in the worker processes
    args = p.parse_args()
    if args.side:
        print(json.dumps(worker(args)))
        return

    make_pairs(args.pairs)  # build the cache once, before any timed run
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TOKENIZERS_PARALLELISM": "false"}
    results = alternate_sides(__file__, args.repeats, env)
    tokens = results["eva"][0]["tokens"]
    print(f"model {args.model} {'+ LoRA r16/alpha 32' if args.lora else 'full fine-tuning'}, {args.pairs} pairs "
          f"({tokens} training tokens), DPO, batch 8 (2 x 4), 1 epoch, device {args.device}, {args.threads} "
          f"threads, {versions(results)}; {args.repeats} fresh runs per side, alternating")
    print(f"{'side':<5} {'pairs/s best':>12} {'median':>7} {'tokens/s best':>14} {'median':>7} "
          f"{'peak MiB best':>14} {'median':>7} {'step-1 loss':>12}")
    summary = {}
    for side, runs in results.items():
        rate = sorted(args.pairs / r["seconds"] for r in runs)
        peak = sorted(r["peak"] / 2**20 for r in runs)
        summary[side] = dict(best=rate[-1], median=statistics.median(rate), peak=peak[0],
                             peak_median=statistics.median(peak))
        print(f"{side:<5} {rate[-1]:>12.3f} {statistics.median(rate):>7.3f} {rate[-1] * tokens / args.pairs:>14.0f} "
              f"{statistics.median(rate) * tokens / args.pairs:>7.0f} {peak[0]:>14.0f} {statistics.median(peak):>7.0f} "
              f"{runs[0]['loss']:>12.4f}")
    print(f"(ln 2 = {math.log(2):.4f}; peak = the phase's peak memory above what the process held when it started)")
    if "trl" in summary:
        e, t = summary["eva"], summary["trl"]
        print(f"eva / trl: pairs/s {e['best'] / t['best']:.2f}x best, {e['median'] / t['median']:.2f}x median; "
              f"peak memory {e['peak'] / t['peak']:.2f}x best, {e['peak_median'] / t['peak_median']:.2f}x median")


if __name__ == "__main__":
    main()
