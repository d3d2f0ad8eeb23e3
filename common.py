"""What both loops (train_eva.py offline, online.py online) do the same way: start a run (check the inputs, open the
run folder), load the models, sample and score responses, evaluate on the held-out prompts, build the creator's
completer. Nothing here knows which loop calls it.
"""
import json
import math
import time

import numpy as np
import torch

import creator
import generate
import model
import parallel
import prompts
import reward
import rundir
import trainstate
import vllm_sampler
from config import Config
from eval.ifeval import evaluate_ifeval
from parallel import print0


# ------------------------------------------------------------------------------------------------- start
def load_models(cfg: Config, run: rundir.Run, device):
    """(solver, fp32 masters or None, tokenizer, reward scorer, (creator model, tokenizer) or (None, None))."""
    policy, tokenizer = trainstate.load_solver(cfg, run, device)
    masters = trainstate.load_masters(cfg, run, device, policy)
    if cfg.sampler == "vllm":
        vllm_sampler.attach(policy, cfg)
    context = getattr(policy.config, "max_position_embeddings", None)
    if context and cfg.max_prompt_tokens + cfg.max_new_tokens > context:
        raise ValueError(f"--max_prompt_tokens {cfg.max_prompt_tokens} + --max_new_tokens {cfg.max_new_tokens} exceed "
                         f"the context of {cfg.model} ({context} tokens); lower them")
    judge = dict(timeout=cfg.endpoint_timeout, retries=cfg.endpoint_retries) if cfg.reward.startswith("judge:") else {}
    scorer = reward.load_reward(cfg.reward, device=device, **judge)  # ?timeout=&retries= in the URL still win
    creator_lm = (None, None)
    if cfg.creator != "self" and not cfg.creator.startswith("endpoint:"):
        creator_lm = model.load_model(cfg.creator, device=device)
    return policy, masters, tokenizer, scorer, creator_lm


def start_run(cfg: Config) -> tuple[torch.device, list[dict], list[dict], rundir.Run]:
    """Ranks up, the prompt files read and the models found, then the run folder opened: bad input stops a run
    here, before a folder is created or a model is loaded. Returns (device, seed prompts, held-out prompts, run)."""
    device = parallel.init()
    torch.manual_seed(cfg.seed)
    seeds = prompts.read_prompts(cfg.seed_prompts, cfg.reward, cfg.max_seed_prompts)
    heldout = prompts.read_prompts(cfg.heldout_prompts, "rules", cfg.max_heldout_prompts) if cfg.heldout_prompts else []
    if cfg.online and len(seeds) < cfg.online_prompts:
        raise ValueError(f"--online_prompts {cfg.online_prompts}: {cfg.seed_prompts} has only {len(seeds)} prompts")
    model.resolve(cfg.model)
    if cfg.creator != "self" and not cfg.creator.startswith("endpoint:"):
        model.resolve(cfg.creator)
    return device, seeds, heldout, rundir.open_run(cfg)


# ------------------------------------------------------------------------------------------------- samples
def sample_and_score(policy, tokenizer, scorer, records: list[dict], cfg: Config, t: int, phase: str) -> list[dict]:
    """N responses per prompt and their rewards: sample records, sharded over ranks."""
    seeds = [parallel.stable_seed(cfg.seed, t, phase, r["id"]) for r in records]

    def work(indices: list[int]) -> list[dict]:
        batch = [records[i] for i in indices]
        out = parallel.halve_on_oom(lambda size: generate.sample(
            policy, tokenizer, [r["prompt"] for r in batch], n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, seeds=[seeds[i] for i in indices], batch_size=size,
            progress=parallel.is_main()), cfg.gen_batch_size, f"{phase}: sampling")
        flat_prompts = [r for r in batch for _ in range(cfg.n_samples)]
        flat_responses = [text for texts in out.texts for text in texts]
        # One call as long as memory allows; after an out-of-memory error, the same items in smaller calls.
        flat_scores = parallel.halve_on_oom(
            lambda size: [score for s in range(0, len(flat_responses), size)
                          for score in scorer.score(flat_prompts[s:s + size], flat_responses[s:s + size])],
            max(1, len(flat_responses)), f"{phase}: scoring")
        # A reward that could not be computed (a judge that gave no rating) is NaN in memory and null on disk.
        # finish: "stop" (the model ended its turn) or "length" (cut at --max_new_tokens), per response.
        return [{"prompt_id": r["id"], "responses": texts, "finish": finish,
                 "rewards": [float(s) if math.isfinite(s) else None
                             for s in flat_scores[k * cfg.n_samples:(k + 1) * cfg.n_samples]]}
                for k, (r, texts, finish) in enumerate(zip(batch, out.texts, out.finish))]

    samples = parallel.sharded(work, list(range(len(records))), desc=phase)
    info = creator.informativeness([as_floats(s["rewards"]) for s in samples], cfg.info_metric)
    for s, value in zip(samples, info):
        s["info"] = float(np.nan_to_num(value))  # all rewards tied: no information, 0
    return samples


def as_floats(values: list) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def drop_long_prompts(records: list[dict], tokenizer, cfg: Config, where: str) -> list[dict]:
    """Prompts whose chat-formatted length exceeds --max_prompt_tokens are skipped, and the skip is reported."""
    kept = [r for r in records if len(generate.encode_prompt(tokenizer, r["prompt"])) <= cfg.max_prompt_tokens]
    if len(kept) < len(records):
        skipped = [r["id"] for r in records if r not in kept]
        print0(f"[{where}] skipped {len(skipped)} prompts longer than --max_prompt_tokens "
               f"{cfg.max_prompt_tokens}: {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}")
    return kept


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(policy, tokenizer, records: list[dict], cfg: Config) -> dict:
    """Held-out constraint accuracy with greedy answers (IFEval's strict prompt- and instruction-level)."""
    result = parallel.halve_on_oom(lambda size: evaluate_ifeval(policy, tokenizer, records, batch_size=size,
                                                                max_new_tokens=cfg.eval_max_new_tokens,
                                                                progress=parallel.is_main()),
                                   cfg.gen_batch_size, "held-out evaluation")
    result["answers"] = [{"prompt_id": r["id"], "answer": a} for r, a in zip(records, result.pop("responses"))]
    return result


def evaluate_once(policy, tokenizer, heldout: list[dict], cfg: Config, run: rundir.Run, when: str) -> None:
    """eval_<when>.json for the solver as it is now, unless a finished run already wrote it."""
    path = run.folder / f"eval_{when}.json"
    if not heldout or path.exists():
        return
    t0 = time.time()
    result = evaluate(policy, tokenizer, heldout, cfg)
    run.write(path, json.dumps(result, indent=1) + "\n")
    print0(f"[{when}] held-out: prompt-level {result['prompt_level']:.3f}, instruction-level "
           f"{result['instruction_level']:.3f} ({time.time() - t0:.0f} s)")


def make_completer(cfg: Config, t: int, policy, tokenizer, creator_model=None, creator_tokenizer=None):
    """The creator's `complete(messages) -> candidates per message`: the solver itself (self-play), another local
    model, or an endpoint; cfg.creator_candidates texts per message."""
    if cfg.creator.startswith("endpoint:"):
        url, _, name = cfg.creator[len("endpoint:"):].partition("#")
        return creator.endpoint_completer(url, name, temperature=cfg.creator_temperature,
                                          max_tokens=cfg.creator_max_new_tokens, timeout=cfg.endpoint_timeout,
                                          retries=cfg.endpoint_retries, candidates=cfg.creator_candidates)
    lm, tok = (policy, tokenizer) if cfg.creator == "self" else (creator_model, creator_tokenizer)
    return creator.local_completer(lm, tok, seed=parallel.stable_seed(cfg.seed, t, "creator"),
                                   max_new_tokens=cfg.creator_max_new_tokens, temperature=cfg.creator_temperature,
                                   top_p=cfg.top_p, batch_size=cfg.gen_batch_size, candidates=cfg.creator_candidates)
