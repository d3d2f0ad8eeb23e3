"""Benchmark (not a test): generate.sample against transformers' generate, same model, prompts, settings and batch.

    python bench/bench_generate.py                     # bundled SmolLM2-135M, 32 prompts x 4 samples x 128 tokens, CPU
    python bench/bench_generate.py --model google/gemma-2-2b-it --device cuda --prompts 64 --compile
    python bench/bench_generate.py --skip_hf --profile   # where our time goes, op by op
    python bench/bench_generate.py --dtype bf16          # both in bf16 (oneDNN's AMX kernels on CPUs that have them)
    python bench/bench_generate.py --device cuda --vllm  # vLLM too (vllm_sampler.py: weight hand-over included)

Both samplers answer the same prompts (the first --prompts of IFEval's input file when the shared data folder is
there, a fixed list otherwise) with temperature 0.7, top-p 0.9, no top-k, n samples each, one batch of all rows.
Tokens counted: response tokens before EOS, the same rule for both. Each side runs once untimed (a short warm-up)
and then --repeats timed runs; the best run counts. The machine's limit is its measured matmul rate (the fastest of
2048^3 matmuls in the model's dtype on CPU, through torch.mm and through oneDNN, 4096^3 on GPU; timed before and
after the runs) divided by the model's FLOPs per generated token:
    2 * (parameters of every Linear in the blocks + the LM head) + 4 * layers * heads * head_dim * mean context
(the second term is attention's QK^T and AV over the average context the decode steps see). It also times the
model's linear layers alone at the benchmark's row count, the part of the limit that matmuls of decode shapes reach,
generate's attention alone on a cache of the benchmark's shape, and prefill alone (a 1-token run): together, a
ceiling for this sampler at the full batch, which also pays for sampling and the small ops between the matmuls.
Absolute numbers on a shared machine are noise: read the ratios, and the load average printed beside them.
"""
import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import files  # noqa: E402

DTYPES = {"default": None, "fp32": torch.float32, "bf16": torch.bfloat16}
FALLBACK_PROMPTS = ["Write a short poem about the sea.", "Explain photosynthesis to a ten-year-old.",
                    "Give three tips for learning a new language.", "What is the difference between a list and a tuple "
                    "in Python?", "Describe your ideal weekend in one paragraph.", "Summarise the plot of Hamlet."]


def load_prompts(count: int) -> list[str]:
    path = ROOT.parent / "shared" / "data" / "ifeval_input_data.jsonl"
    if path.is_file():
        prompts = [r["prompt"] for r in files.read_jsonl(path)]
    else:
        prompts = FALLBACK_PROMPTS
    return [prompts[i % len(prompts)] for i in range(count)]


def matmul_rates(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """{kernel: best-of-6 FLOP/s} of one large square matmul in the model's dtype. On a CPU both torch.mm
    (MKL) and oneDNN's GEMM (the one generate.py uses) are timed: the limit takes the faster, the best the machine
    does rather than the best of the library we happen to call."""
    size = 2048 if device.type == "cpu" else 4096
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    import onednn
    kernels = {"torch.mm": lambda: a @ b}
    if device.type == "cpu" and onednn.AVAILABLE:
        reordered = torch.ops.mkldnn._reorder_linear_weight(b, size)
        kernels["oneDNN"] = lambda: torch.ops.mkldnn._linear_pointwise(a, reordered, None, "none", [], "")  # a @ b.T
    return {name: 2 * size**3 / best_seconds(kernel, device, 6) for name, kernel in kernels.items()}


def flops_per_token(model, mean_context: float) -> float:
    config = model.config.get_text_config()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    linear = sum(m.weight.numel() for name, m in base.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    head = config.vocab_size * config.hidden_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim * mean_context
    return 2 * (linear + head) + attention


def linear_rate(model, rows: int, as_generate: bool = True) -> float:
    """Tokens/s if a decode step of `rows` rows cost only its linear layers and LM head, best of 6. as_generate: run
    as generate.py runs them (oneDNN on an x86 CPU), the ceiling of any sampler built on these matmuls; otherwise
    as the modules run them (torch's linear, what `generate` uses)."""
    import onednn
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(rows, m.in_features, device=model.device, dtype=model.dtype) for m in layers]

    def step():
        for m, x in zip(layers, inputs):
            m(x)

    with torch.inference_mode(), onednn.packed_linears(model) if as_generate else contextlib.nullcontext():
        return rows / best_seconds(step, model.device, 6)


@torch.inference_mode()
def attention_rate(model, prompts: int, n: int, prompt_len: int, new_tokens: int, stride: int = 8) -> float:
    """Tokens/s if a decode step of prompts * n rows cost only its attention: generate._attend on a cache of the
    benchmark's shape (prompt part prompt_len slots, own blocks new_tokens), random keys and values, every layer its
    own buffers so that they come from memory as in a real step; the steps t = 0, stride, 2 * stride, ... stand for
    all new_tokens steps (attention's cost grows linearly with t). Best of 2."""
    from generate import _Layer, _attend, _attention_options, _decode_masks
    config = model.config.get_text_config()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attns = [layer.self_attn for layer in base.model.layers]
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, attns[0].head_dim
    rows, device, dtype = prompts * n, model.device, model.dtype
    layers = [_Layer(prompts, prompt_len, n, new_tokens) for _ in attns]
    for layer in layers:
        layer.slot = torch.arange(rows, device=device)  # every row live
        layer.lazy_initialization(*[torch.empty(prompts, kv_heads, prompt_len, dim, device=device, dtype=dtype)] * 2)
        for buffer in (layer.keys_t, layer.values, layer.own_keys, layer.own_values):
            buffer.normal_()
    query = torch.randn(rows, heads, dim, device=device, dtype=dtype)  # [R, H, D]
    first = torch.zeros(prompts, dtype=torch.long, device=device)  # every prompt slot real (the cost is the same)

    def steps():
        for t in range(0, new_tokens, stride):
            masks = _decode_masks(config, first, prompt_len, t, dtype)
            for i, (layer, attn) in enumerate(zip(layers, attns)):
                layer.t = t
                _attend(layer, query, *_attention_options(config, attn, i, masks))

    return rows * new_tokens / (best_seconds(steps, device, 2) * stride)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed calls of fn(), synchronised with the device."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def run_ours(model, tok, prompts, args) -> tuple[float, int]:
    from generate import sample
    sync(model.device)
    start, cpu = time.perf_counter(), time.process_time()
    out = sample(model, tok, prompts, n=args.n, max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=0.9,
                 batch_size=len(prompts), seed=0, compile=args.compile)
    sync(model.device)
    return time.perf_counter() - start, time.process_time() - cpu, sum(len(s) for row in out.token_ids for s in row)


def run_vllm(model, tok, prompts, args) -> tuple[float, int]:
    """--sampler vllm's call: the same generate.sample, routed to the engine (which first takes the weights)."""
    import vllm_sampler
    vllm_sampler.use(model, args.engine)
    try:
        return run_ours(model, tok, prompts, args)
    finally:
        del model.sample_with


def run_hf(model, tok, prompts, args) -> tuple[float, int]:
    from generate import eos_ids, encode_prompt
    ids = [encode_prompt(tok, p) for p in prompts]
    L = max(map(len, ids))
    inp = torch.tensor([[tok.pad_token_id] * (L - len(x)) + x for x in ids], device=model.device)  # [P, L]
    first = torch.tensor([L - len(x) for x in ids], device=model.device)  # [P] first real token of each row
    attn = torch.arange(L, device=model.device)[None] >= first[:, None]  # [P, L]
    eos = eos_ids(model, tok)
    sync(model.device)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        out = model.generate(input_ids=inp, attention_mask=attn.long(), do_sample=True, temperature=0.7, top_p=0.9,
                             top_k=0, num_return_sequences=args.n, max_new_tokens=args.max_new_tokens,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)
    sync(model.device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    count = 0
    for row in out[:, L:].tolist():
        count += next((k for k, x in enumerate(row) if x in eos), len(row))
    return seconds, cpu, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("-n", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", choices=DTYPES, default="default",
                    help="the model's dtype for both samplers (default: load_model's, fp32 on a CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="torch.compile our decode step (GPU)")
    ap.add_argument("--skip_hf", action="store_true", help="time ours only")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of our timed run")
    ap.add_argument("--vllm", action="store_true", help="also time vLLM as --sampler vllm runs it (CUDA, pip install "
                                                         "vllm)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import model as model_lib
    device = torch.device(args.device)
    model, tok = model_lib.load_model(args.model, device=device, dtype=DTYPES[args.dtype])
    prompts = load_prompts(args.prompts)
    from generate import encode_prompt
    lengths = [len(encode_prompt(tok, p)) for p in prompts]
    prompt_len, longest = sum(lengths) / len(lengths), max(lengths)
    print(f"model {args.model} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{torch.get_num_threads()} threads, {args.prompts} prompts (mean {prompt_len:.0f} tokens) x {args.n} "
          f"samples x {args.max_new_tokens} new tokens, temperature 0.7, top-p 0.9, dtype {model.dtype}")
    rates = matmul_rates(device, model.dtype)
    sides = {"ours": run_ours} if args.skip_hf else {"ours": run_ours, "hf generate": run_hf}
    if args.vllm:
        import vllm_sampler
        args.engine = vllm_sampler.start(model_lib.resolve(args.model), gpu_memory=0.5, seed=0)
        sides["vllm"] = run_vllm
    results = {}
    for name, fn in sides.items():
        warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 4})
        fn(model, tok, prompts[:2], warm)
        load = os.getloadavg()[0]
        if args.profile and name == "ours":
            with torch.profiler.profile() as prof:
                best = min((fn(model, tok, prompts, args) for _ in range(args.repeats)), key=lambda r: r[0])
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        else:
            best = min((fn(model, tok, prompts, args) for _ in range(args.repeats)), key=lambda r: r[0])
        results[name] = best[2] / best[0], best[2] / best[1], best[2]
        print(f"{name:>12}: {best[2]:6d} tokens in {best[0]:7.2f} s = {results[name][0]:7.1f} tokens/s   "
              f"({best[1]:7.2f} CPU s = {results[name][1]:7.1f} tokens per CPU-second; load average "
              f"{load:.2f} -> {os.getloadavg()[0]:.2f})")
    # the better of before and after the runs
    rates = {name: max(rate, rates[name]) for name, rate in matmul_rates(device, model.dtype).items()}
    rate = max(rates.values())
    mean_context = prompt_len + results["ours"][2] / (args.prompts * args.n) / 2
    flops = flops_per_token(model, mean_context)
    limit = rate / flops
    kernels = ", ".join(f"{name} {r / 1e9:.1f}" for name, r in rates.items())
    print(f"matmul rate {rate / 1e9:.1f} GFLOP/s ({kernels}; best of 12 each, {torch.get_num_threads()} threads); "
          f"model {flops / 1e6:.1f} MFLOP/token (mean context {mean_context:.0f}) -> limit {limit:.1f} tokens/s")
    ours = results["ours"]  # tokens/s, tokens per CPU-second, tokens
    ceiling, modules = linear_rate(model, args.prompts * args.n), linear_rate(model, args.prompts * args.n, False)
    print(f"linear layers alone at {args.prompts * args.n} rows: {ceiling:.1f} tokens/s = {ceiling / limit:.2f} of the "
          f"limit (a step that cost nothing else); as the modules run them: {modules:.1f} tokens/s")
    attention = attention_rate(model, args.prompts, args.n, longest, args.max_new_tokens)
    both = 1 / (1 / ceiling + 1 / attention)
    prefill = min(run_ours(model, tok, prompts, argparse.Namespace(**{**vars(args), "max_new_tokens": 1}))[0]
                  for _ in range(2))
    bound = ours[2] / (prefill + ours[2] / both)
    print(f"attention alone at {args.prompts * args.n} rows: {attention:.1f} tokens/s; linear layers and attention "
          f"together: {both:.1f} tokens/s = {both / limit:.2f} of the limit; with prefill (a 1-token run, "
          f"{prefill:.2f} s): {bound:.1f} tokens/s = {bound / limit:.2f} (before sampling, norms, rotary, cache writes "
          f"and Python)")
    line = f"ours / limit = {ours[0] / limit:.2f}, ours / linear layers alone = {ours[0] / ceiling:.2f}"
    if "hf generate" in results:
        hf = results["hf generate"]
        line = f"ours / hf generate = {ours[0] / hf[0]:.2f}x (per CPU-second {ours[1] / hf[1]:.2f}x)   " + line
    if torch.get_num_threads() == 1:  # one thread: CPU time is what an otherwise idle core would take
        line += f" (per CPU-second {ours[1] / limit:.2f})"
    print(line)
    if "vllm" in results:
        print(f"vllm / hf generate = {results['vllm'][0] / results['hf generate'][0]:.2f}x, ours / vllm = "
              f"{ours[0] / results['vllm'][0]:.2f}x" if "hf generate" in results else
              f"ours / vllm = {ours[0] / results['vllm'][0]:.2f}x")


if __name__ == "__main__":
    main()
