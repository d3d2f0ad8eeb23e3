"""Benchmark (not a test): plain vs vocabulary-chunked per-token log-probs (losses.target_logps), side by side.

    python bench/bench_logps.py                                   # B=4 T=512 V=49152 bf16, train step, CPU, <1 min
    python bench/bench_logps.py --vocab 256000 --seq 1024 --device cuda    # gemma-2-sized vocabulary on a GPU
    python bench/bench_logps.py --mode ref                        # no-grad reference pass instead of fwd+bwd

The inputs are what the training step's packed forward hands over: the logits of the positions that predict a
response token (B sequences of T tokens, the first quarter of each a prompt, whose logits are never computed), their
targets, and each token's sequence; one call is target_logps then losses.packed_sequence_logps. Each path runs in
its own fresh process so the numbers cannot leak into each other. What is measured:
  time  median wall time of one call (forward + backward into the logits for --mode train), after one warm-up.
  memory on CPU: peak resident memory (ru_maxrss) of the process minus that of an identical process that only
        builds the inputs, i.e. the extra peak memory the log-prob computation needs on top of the logits.
        On CUDA: torch.cuda.max_memory_allocated minus the memory allocated before the call.
Absolute times on a shared machine are noise; read the ratio.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def worker(args: argparse.Namespace) -> dict:
    """Build the inputs, run one path `args.repeats` times, return its median time and peak extra memory."""
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from losses import packed_sequence_logps, target_logps

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, DTYPES[args.dtype])
    B, T, V = args.batch, args.seq, args.vocab
    per_row = T - T // 4  # a quarter prompt, the rest response
    K = B * per_row
    logits = torch.empty(K, V, dtype=dtype, device=dev)  # [K, V]
    for s in range(0, K, 64):  # fill in slices so no fp32 [K, V] temporary inflates the baseline
        logits[s:s + 64] = torch.randn(min(64, K - s), V, device=dev) * 2
    targets = torch.randint(0, V, (K,), device=dev)  # [K]
    row = torch.arange(B, device=dev).repeat_interleave(per_row)  # [K]: the sequence of each token
    train = args.mode == "train"
    logits.requires_grad_(train)
    chunk = None if args.path == "plain" else args.chunk

    def call() -> None:
        logits.grad = None
        with torch.set_grad_enabled(train):
            out = packed_sequence_logps(target_logps(logits, targets, chunk), row, B)
            if train:
                (out.sum.sum() + out.avg.sum()).backward()  # the gradient lands in logits.grad, as for lm_head
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    if args.path != "baseline":
        for i in range(args.repeats + 1):
            t0 = time.perf_counter()
            call()
            if i:  # the first call is a warm-up
                times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"time": sorted(times)[len(times) // 2] if times else 0.0, "peak": peak,
            "logits_bytes": logits.numel() * logits.element_size()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the logits")
    p.add_argument("--chunk", type=int, default=8192, help="vocab_chunk of the chunked path")
    p.add_argument("--mode", choices=["train", "ref"], default="train", help="fwd+bwd, or a no-grad forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--path", choices=["baseline", "plain", "chunked"], help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args()
    if args.path:
        print(json.dumps(worker(args)))
        return

    res = {}
    for path in (["baseline"] if args.device == "cpu" else []) + ["plain", "chunked"]:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--path", path]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"bench_logps.py: the {path} worker failed:\n{run.stderr[-2000:]}")
        res[path] = json.loads(run.stdout.strip().splitlines()[-1])
    base = res.get("baseline", {"peak": 0})["peak"]
    unit = res["plain"]["logits_bytes"]
    what = "fwd+bwd" if args.mode == "train" else "no-grad fwd"
    mem = "peak RSS above an inputs-only process" if args.device == "cpu" else "CUDA max_memory_allocated above start"
    print(f"target_logps + packed_sequence_logps {what}: B={args.batch} T={args.seq} V={args.vocab} {args.dtype} "
          f"logits ({unit / 2**20:.0f} MiB), chunk {args.chunk}, {args.device}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"memory = {mem}")
    print(f"{'path':<9}{'time ms':>10}{'peak extra MiB':>17}{'x logits':>10}")
    for path in ("plain", "chunked"):
        extra = res[path]["peak"] - base
        print(f"{path:<9}{res[path]['time'] * 1e3:>10.1f}{extra / 2**20:>17.0f}{extra / unit:>10.2f}")
    t = res["chunked"]["time"] / res["plain"]["time"]
    m = (res["chunked"]["peak"] - base) / max(res["plain"]["peak"] - base, 1)
    print(f"chunked / plain: time {t:.2f}x, peak extra memory {m:.2f}x")


if __name__ == "__main__":
    main()
