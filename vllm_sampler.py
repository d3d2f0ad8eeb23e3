"""--sampler vllm: the solver's rollouts, held-out answers and self-play rewrites sampled by vLLM (optional, CUDA).

    pip install vllm                                       # on a CUDA machine; not in requirements.txt
    torchrun --nproc_per_node=8 train_eva.py --preset paper --sampler vllm --run_dir runs/paper

Each rank starts one vLLM engine inside its own process, beside training (TRL's "colocate" mode). The engine sleeps
while the solver trains (weights and KV cache released); before each sampling call it wakes, takes the solver's
current weights (a LoRA adapter merged on the fly, never into the solver), and samples the requests eva's own sampler
would: the chat-formatted prompt ids, n samples from each prompt's seed, EOS and stop strings. Its rows are cut by
generate.finish_rows, so texts, token ids and "stop"/"length" mean what they mean with eva's sampler.

    vllm_sampler.attach(solver, cfg)        # after this, generate.sample(solver, ...) goes through vLLM
    vllm_sampler.use(solver, llm)           # the same with an engine already started
"""
import functools
import importlib.util
import os

import torch

import generate
import model as model_lib
import parallel


def check(cfg) -> None:
    """One line for a --sampler vllm that cannot run here, before any model loads."""
    if cfg.load_in_4bit:
        raise ValueError("--sampler vllm with --load_in_4bit: vLLM would sample from different (bf16) weights than "
                         "the 4-bit solver trains; use --sampler eva, or drop --load_in_4bit")
    if not torch.cuda.is_available():
        raise ValueError("--sampler vllm needs a CUDA GPU, and none is visible; use --sampler eva (the default)")
    if importlib.util.find_spec("vllm") is None:
        raise ValueError("--sampler vllm: the vllm package is not installed; pip install vllm (it brings its own "
                         "CUDA build of torch), or use --sampler eva")


def start(model_path: str, gpu_memory: float, seed: int):
    """A sleeping vLLM engine for the model at model_path; one per rank (data parallel, no tensor parallelism)."""
    # in-process engine: the weight hand-over is a copy between tensors on one GPU, nothing serialised
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    world = parallel.world_size()
    llm = vllm.LLM(model=model_path, dtype="bfloat16", gpu_memory_utilization=gpu_memory, seed=seed,
                   enable_sleep_mode=True, tensor_parallel_size=1, data_parallel_size=world,
                   distributed_executor_backend="external_launcher" if world > 1 else None)
    llm.sleep(level=2)  # its weights are replaced before every call anyway
    return llm


def attach(solver, cfg) -> None:
    """Route every generate.sample call on `solver` through a vLLM engine started from the solver's base model."""
    use(solver, start(model_lib.resolve(cfg.model), cfg.vllm_gpu_memory, cfg.seed))


def use(solver, llm) -> None:
    """Route every generate.sample call on `solver` through the engine `llm` (generate.sample checks for it)."""
    solver.sample_with = functools.partial(sample, llm)


def hf_weights(model):
    """(name, tensor) for every weight of `model` under its checkpoint's names (what vLLM's load_weights reads). A
    LoRA layer's weight comes with its update merged, W + scale * B A, computed aside: the solver is not changed."""
    from peft.tuners.lora import LoraLayer
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapters = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".base_layer"):
            owner = owner[:-len(".base_layer")]
            layer = adapters[owner]
            if leaf == "weight" and not layer.merged and not layer.disable_adapters:
                param = param + layer.get_delta_weight(layer.active_adapters[0]).to(param.dtype)
        yield f"{owner}.{leaf}", param.detach()


def load_weights(llm, model) -> None:
    """Wake the engine and give it `model`'s current weights."""
    llm.wake_up(tags=["weights"])
    with torch.no_grad():
        llm.apply_model(lambda engine_model: engine_model.load_weights(hf_weights(model)))
    llm.wake_up(tags=["kv_cache"])
    llm.reset_prefix_cache()  # cached prefixes hold keys of the old weights


def sample(llm, model, tokenizer, prompts: list[str], n: int, *, max_new_tokens: int, temperature: float,
           top_p: float, top_k: int, stop: list[str], seeds: list[int], chat: bool,
           progress: bool) -> generate.SampleOutput:
    """generate.sample's answer from the engine `llm` with `model`'s current weights (arguments checked there)."""
    import vllm
    load_weights(llm, model)
    eos = generate.eos_ids(model, tokenizer)
    requests = [{"prompt_token_ids": generate.encode_prompt(tokenizer, p, chat)} for p in prompts]
    draws = 1 if temperature == 0 else n  # vLLM refuses n > 1 greedy samples: they would all be the same
    params = [vllm.SamplingParams(n=draws, seed=seed & (2**63 - 1), temperature=temperature, top_p=top_p,
                                  top_k=top_k, max_tokens=max_new_tokens, stop=stop, stop_token_ids=eos)
              for seed in seeds]
    try:
        outputs = llm.generate(requests, params, use_tqdm=progress)
    finally:
        llm.sleep(level=2)  # training gets the memory back
    out = to_sample_output(tokenizer, outputs, draws, eos, stop)
    if draws < n:
        out = generate.SampleOutput(*([rows * n for rows in field] for field in (out.texts, out.token_ids, out.finish)))
    return out


def to_sample_output(tokenizer, outputs, n: int, eos, stop) -> generate.SampleOutput:
    """vLLM's RequestOutputs (one per prompt, n completions each) as a SampleOutput: each completion's token ids cut
    as eva cuts its own rows (EOS dropped, text before a stop string)."""
    texts, tokens, finish = [], [], []
    for out in outputs:
        done = sorted(out.outputs, key=lambda c: c.index)
        if len(done) != n or any(c.finish_reason not in ("stop", "length") for c in done):
            raise RuntimeError(f"vLLM request {out.request_id}: {len(done)} of {n} completions finished, reasons "
                               f"{[c.finish_reason for c in done]}")
        t, ids, f = generate.finish_rows(tokenizer, [list(c.token_ids) for c in done], eos, stop)
        texts.append(t), tokens.append(ids), finish.append(f)
    return generate.SampleOutput(texts=texts, token_ids=tokens, finish=finish)
