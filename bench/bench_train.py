"""Benchmark (not a test): eva's DPO training step against a plain one, same model and batch, side by side.

    python bench/bench_train.py                  # bundled SmolLM2-135M + LoRA r16, 4 pairs x ~200 tokens, CPU fp32
    python bench/bench_train.py --dtype bf16     # bf16 weights on the CPU: the logits' regime of a GPU run
    python bench/bench_train.py --device cuda    # on a GPU (bf16 weights, bf16 autocast as train_eva does)

The two steps, each a full optimizer step (forward, loss, backward, AdamW) on the same pairs:
  ours   train_eva's: collate chosen and rejected rows into one batch, one forward, per-token log-probs with the
         vocabulary in chunks (losses.sequence_logps, --vocab_chunk columns at a time), losses.preference_loss.
  plain  the straightforward step: chosen and rejected in two separate forwards (each padded to its own length),
         log_softmax of the full logits in fp32, gather, mask, sum, the DPO formula written out.
The reference log-probs are constants here (train_eva computes them once per iteration, before the first step).

Each path runs in a fresh process, so neither can inherit the other's memory. Reported per path: the best
seconds per step of --repeats after one warm-up (the least disturbed one: the machine is shared), training tokens
per second (real prompt + response tokens of both responses, padding not counted), the padded tokens the forwards
actually ran, and the peak memory of the steps above what the process held before them: on the CPU the peak
resident set (VmHWM, reset through /proc/self/clear_refs just before the steps) minus the resident set then, with
glibc told to return every freed block over 128 KiB (MALLOC_MMAP_THRESHOLD_), so freed tensors do not linger in
the count; on CUDA torch.cuda.max_memory_allocated minus the allocation before the steps. Read the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _proc_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def make_pairs(tokenizer, n: int, seed: int) -> list[dict]:
    """n encoded pairs of random ordinary tokens: prompt 40-80, responses 100-160 tokens (+ EOS), as encode_pair."""
    import numpy as np
    rng = np.random.default_rng(seed)
    special = set(tokenizer.all_special_ids)
    ordinary = np.array([i for i in range(len(tokenizer)) if i not in special])
    draw = lambda lo, hi: rng.choice(ordinary, int(rng.integers(lo, hi + 1))).tolist()
    eos = [tokenizer.eos_token_id]
    return [dict(prompt=draw(40, 80), chosen=draw(100, 160) + eos, rejected=draw(100, 160) + eos) for _ in range(n)]


def plain_logps(model, rows: list[list[int]], n_response: list[int], pad: int, device):
    """Sum of log p(response tokens) per row: one padded forward, fp32 log_softmax over the whole vocabulary."""
    import torch
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [B, T]
    attention = torch.zeros_like(ids)  # [B, T]
    labels_mask = torch.zeros_like(ids, dtype=torch.bool)  # [B, T] marks response tokens
    for i, (row, n) in enumerate(zip(rows, n_response)):
        ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        labels_mask[i, len(row) - n:len(row)] = True
    ids, attention, labels_mask = ids.to(device), attention.to(device), labels_mask.to(device)
    logits = model(input_ids=ids, attention_mask=attention).logits  # [B, T, V]
    logps = logits[:, :-1].float().log_softmax(-1)  # [B, T-1, V] fp32
    token = logps.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    return (token * labels_mask[:, 1:]).sum(-1)  # [B]


def worker(args: argparse.Namespace) -> dict:
    """Load the model and the batch, run `args.path`'s step, return time, tokens and peak memory."""
    import torch
    sys.path.insert(0, str(ROOT))
    import losses
    import model
    import solver
    import train_eva

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    policy, tokenizer = model.load_model(args.model, device=device, dtype=dtype)
    policy = model.add_lora(policy, r=args.lora_r, gradient_checkpointing=args.gradient_checkpointing)
    policy.train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    pairs = make_pairs(tokenizer, args.pairs, seed=0)
    tokens = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)
    widths = {half: max(len(p["prompt"]) + len(p[half]) for p in pairs) for half in ("chosen", "rejected")}
    padded = 2 * len(pairs) * max(widths.values()) if args.path == "ours" else len(pairs) * sum(widths.values())
    pad = solver.pad_id(policy)
    cfg = train_eva.Config(vocab_chunk=args.vocab_chunk)
    beta = 0.1
    ref = torch.linspace(-300.0, -250.0, 2 * len(pairs), device=device)  # [2P] constants: chosen, then rejected
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step_ours() -> None:
        batch = solver.collate(pairs, pad, device)  # [2P, T] chosen rows, then rejected rows
        with autocast:
            chosen, rejected = solver.forward_logps(policy, batch, cfg)
        ref_c = losses.SeqLogps(ref[:len(pairs)], chosen.count, ref[:len(pairs)] / chosen.count.clamp(min=1))
        ref_r = losses.SeqLogps(ref[len(pairs):], rejected.count, ref[len(pairs):] / rejected.count.clamp(min=1))
        loss, _, _ = losses.preference_loss("dpo", chosen, rejected, ref_c, ref_r, beta=beta)
        loss.mean().backward()

    def step_plain() -> None:
        with autocast:
            chosen = plain_logps(policy, [p["prompt"] + p["chosen"] for p in pairs],
                                 [len(p["chosen"]) for p in pairs], pad, device)  # [P]
            rejected = plain_logps(policy, [p["prompt"] + p["rejected"] for p in pairs],
                                   [len(p["rejected"]) for p in pairs], pad, device)  # [P]
        margin = (chosen - ref[:len(pairs)]) - (rejected - ref[len(pairs):])  # [P]
        (-torch.nn.functional.logsigmoid(beta * margin)).mean().backward()

    step = step_ours if args.path == "ours" else step_plain

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set to the current one
        before = _proc_kib("VmRSS") * 1024
    times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i:  # the first step is a warm-up (and allocates AdamW's state)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_kib("VmHWM") * 1024
    return dict(time=min(times), tokens=tokens, padded=padded, peak=peak - before,
                vocab=policy.get_output_embeddings().weight.shape[0], dtype=str(policy.dtype).split(".")[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="model spec for model.load_model")
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    p.add_argument("--vocab_chunk", type=int, default=8192, help="train_eva's --vocab_chunk for our path")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per path (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="model weights (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--path", choices=["ours", "plain"], help=argparse.SUPPRESS)  # set in the worker processes
    args = p.parse_args()
    if args.path:
        print(json.dumps(worker(args)))
        return

    results = {}
    for path in ("ours", "plain"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--path", path]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            sys.exit(f"{path} failed:\n{out.stderr[-3000:]}")
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
    r = results["ours"]
    print(f"model {args.model} ({r['dtype']}) + LoRA r{args.lora_r}, {args.pairs} pairs = {r['tokens']} training "
          f"tokens, vocabulary {r['vocab']}, device {args.device}, {args.threads} threads, "
          f"best of {args.repeats} steps")
    print(f"{'step':<58} {'s/step':>8} {'tokens/s':>10} {'padded':>8} {'peak extra MiB':>15}")
    labels = {"ours": f"ours  (one forward, log-probs in {args.vocab_chunk}-column chunks)",
              "plain": "plain (two forwards, fp32 log_softmax of the full logits)"}
    for path, res in results.items():
        print(f"{labels[path]:<58} {res['time']:>8.2f} {res['tokens'] / res['time']:>10.0f} {res['padded']:>8} "
              f"{res['peak'] / 2**20:>15.0f}")
    ours, plain = results["ours"], results["plain"]
    print(f"ratio plain / ours: time {plain['time'] / ours['time']:.2f}x, "
          f"peak memory {plain['peak'] / max(ours['peak'], 1):.2f}x")


if __name__ == "__main__":
    main()
