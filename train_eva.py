"""eva: evolving alignment via asymmetric self-play (Ye et al., arXiv 2411.00062): the config and the loop.

    python train_eva.py                                   # the CPU demo: SmolLM2-135M, rules reward (README)
    python train_eva.py --preset smoke --run_dir runs/smoke   # a minute or two, what the tests run
    torchrun --nproc_per_node=8 train_eva.py --preset paper --run_dir runs/gemma   # the paper's setting
    python train_eva.py --help                            # every field of Config below is a flag, described
    python train_eva.py --config run.yaml --lr 1e-4       # fields from a YAML/JSON file; flags win

Iteration 0 is ordinary preference optimisation on the seed prompts. Each later iteration t is eva: estimate
(N scored responses per pool prompt; info = reward gap), select (25% of the pool, weighted by info), evolve (the
creator rewrites each selected prompt into a chain of children), generate (N scored responses per child), pairs
(best-vs-worst, 80% from children), train (one solver update; solver.py). The children join the pool. Each phase
writes iter_<t>/ then a `done_<phase>` marker; rerunning the same command resumes at the first unfinished phase.
"""
import argparse
import dataclasses
import inspect
import io
import json
import math
import os
import re
import sys
import textwrap
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import creator
import endpoint
import files
import generate
import instructions
import losses
import model
import parallel
import reward
import rundir
import solver
import trainstate
from eval.ifeval import evaluate_ifeval
from parallel import print0

ROOT = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class Config:
    # --- run
    run_dir: str = "runs/demo"  # run folder; rerunning with the same folder resumes it
    preset: str = "demo"  # defaults to start from: smoke | demo | paper | online (a --config file and flags win)
    seed: int = 0  # every random choice (sampling, selection, evolution, data order, LoRA init) derives from it
    allow_config_change: bool = False  # resume even if the config differs from the saved one
    # --- models and data
    model: str = "default"  # solver: "default" (bundled SmolLM2-135M-Instruct), a hub id or a local folder
    creator: str = "self"  # "self" (the solver rewrites prompts), a model id/folder, or endpoint:<url>#<model>
    reward: str = "rules"  # rules | hf:<id-or-folder> | judge:<base-url> (see reward.py)
    seed_prompts: str = "data/seed_prompts.jsonl"  # the starting pool (IFEval-style JSON Lines)
    heldout_prompts: str = "data/heldout_prompts.jsonl"  # evaluated at the start and end, never trained on ("" = skip)
    max_seed_prompts: int = 0  # use only the first K seed prompts (0 = all)
    max_heldout_prompts: int = 0  # evaluate only the first K held-out prompts (0 = all)
    # --- the loop
    eva_iterations: int = 1  # eva iterations after iteration 0
    evolve: bool = True  # --no-evolve: later iterations are ordinary ones on the same pool (the baseline arm)
    pairs_per_iteration: int = 0  # train on exactly this many pairs each iteration (0 = every pair the phase made)
    n_samples: int = 4  # responses per prompt (the paper: 6)
    temperature: float = 0.7  # sampling temperature of the solver
    top_p: float = 0.9  # nucleus sampling of the solver
    max_new_tokens: int = 128  # longest response
    max_prompt_tokens: int = 512  # longer prompts are skipped and counted
    gen_batch_size: int = 32  # prompts per sampling batch (each expands to n_samples rows)
    # --- the creator
    info_metric: str = "gap"  # informativeness: gap | max_mean | variance | mean | inv_mean | best_second | uniform
    selection: str = "weighted"  # weighted | greedy | uniform
    select_fraction: float = 0.25  # share of the pool that is evolved
    evolve_depth: int = 4  # children per selected prompt (a chain x -> x1 -> ... -> xK)
    evolve_kinds: str = "all"  # all | depth | breadth
    evolved_fraction: float = 0.8  # share of training pairs from evolved prompts (the rest from the pool)
    creator_max_new_tokens: int = 160  # longest rewrite
    creator_temperature: float = 0.7  # sampling temperature of the creator
    creator_candidates: int = 4  # rewrites sampled per link; the first that passes cleaning is kept
    endpoint_timeout: float = 120.0  # seconds per socket operation of a creator endpoint or judge call
    endpoint_retries: int = 4  # retries (exponential backoff) of a failed endpoint call before it counts as failed
    # --- the solver update
    loss: str = "dpo"  # dpo | ipo | sppo | simpo | orpo
    beta: float = -1.0  # loss temperature; < 0 means the loss's own default (see losses.LOSSES)
    gamma_beta_ratio: float = 0.25  # SimPO's margin gamma / beta
    orpo_lambda: float = 0.1  # ORPO's weight of the odds-ratio term
    optimizer: str = "adamw"  # adamw | rmsprop (SPPO's choice)
    lr: float = 5e-5  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.1  # share of steps spent warming up, then cosine to zero
    epochs: int = 2  # passes over the iteration's pairs
    batch_size: int = 8  # pairs per optimizer step, over all ranks
    micro_batch_size: int = 4  # pairs per forward on one rank (gradient accumulation makes up the rest)
    max_grad_norm: float = 1.0  # gradient clipping
    vocab_chunk: int = 8192  # log-softmax over this many vocabulary columns at a time (0 = all at once)
    save_every: int = 10  # optimizer steps between resumable training checkpoints
    # --- memory
    lora: bool = True  # train a LoRA adapter (else full fine-tuning)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator
    lora_dropout: float = 0.0  # dropout inside LoRA
    load_in_4bit: bool = False  # QLoRA: NF4 base weights (bitsandbytes; CUDA, or its slow CPU back-end)
    fsdp: bool = False  # full fine-tuning under torchrun: shard weights, gradients, optimizer with FSDP2 (else DDP)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # --- evaluation
    eval_max_new_tokens: int = 128  # longest held-out answer (greedy)
    # --- online eva (online.py): the creator evolves the pool while the solver trains with RLOO or GRPO
    online: bool = False  # train online (online.py) instead of the offline iterations; n_samples is k per prompt
    online_algo: str = "rloo"  # rloo | grpo
    online_steps: int = 200  # policy-gradient steps (one batch of fresh samples each)
    online_prompts: int = 16  # prompts per step over all ranks; micro_batch_size is prompts per forward here
    online_kl: float = -1.0  # KL weight beta to the starting policy; < 0 = the algorithm's (rloo 0.05, grpo 0)
    evolve_every: int = 10  # a creator round (select, evolve) after every this many steps (0 = never: no creator)
    grpo_epsilon: float = 0.2  # GRPO's clip range of the per-token ratio
    grpo_scale_rewards: bool = True  # GRPO divides advantages by the group's std (--no-grpo_scale_rewards: Dr. GRPO)
    grpo_aggregation: str = "token"  # token (mean over all response tokens) | sequence (mean of per-response means)
    grpo_iterations: int = 1  # optimizer steps on each batch of samples (GRPO's mu; > 1 makes the clip matter)


PRESETS = {
    # what the tests run: a handful of prompts, tiny updates; pass --model <folder> to use a tiny random model
    "smoke": dict(max_seed_prompts=8, max_heldout_prompts=4, n_samples=2, max_new_tokens=16, evolve_depth=2,
                  select_fraction=0.5, creator_max_new_tokens=32, eval_max_new_tokens=16, epochs=1, batch_size=4,
                  micro_batch_size=2, save_every=1),
    # the CPU demo: the bundled SmolLM2-135M-Instruct, rule rewards (README has its timing)
    "demo": dict(max_seed_prompts=64, max_new_tokens=96, eval_max_new_tokens=96, creator_max_new_tokens=128,
                 lr=5e-4),
    # the paper: gemma-2-9b-it solver, ArmoRM reward, N=6, DPO beta 0.05, lr 5e-7, effective batch 64, 8 GPUs.
    # Full fine-tuning sharded with FSDP2, as the paper's code did (lr 5e-7 is a full fine-tuning rate; LoRA needs
    # far more). gen_batch_size 4: 24 rows of KV cache at 1024 + 2048 positions (README's memory table).
    "paper": dict(model="google/gemma-2-9b-it", reward="hf:RLHFlow/ArmoRM-Llama3-8B-v0.1", n_samples=6,
                  lora=False, fsdp=True,
                  temperature=0.7, top_p=0.9, max_new_tokens=2048, max_prompt_tokens=1024, gen_batch_size=4,
                  select_fraction=0.25, evolve_depth=4, evolved_fraction=0.8, loss="dpo", lr=5e-7,
                  epochs=2, batch_size=64, micro_batch_size=1, warmup_ratio=0.1, eval_max_new_tokens=2048,
                  creator_max_new_tokens=1024, gradient_checkpointing=True, vocab_chunk=32768,
                  seed_prompts="data/seed_prompts.jsonl"),
    # online eva on the CPU: the bundled SmolLM2-135M-Instruct, rule rewards, RLOO, about 15 minutes on 2 cores
    "online": dict(online=True, max_seed_prompts=64, n_samples=4, online_prompts=8, micro_batch_size=4,
                   online_steps=24, evolve_every=6, max_new_tokens=48, eval_max_new_tokens=96,
                   creator_max_new_tokens=96, max_heldout_prompts=32, evolve_depth=2, lr=2e-4, save_every=4),
}
# The paper's per-loss settings, applied by --preset paper together with --loss: the only source of its beta.
PAPER_LOSS_SETTINGS = {"dpo": dict(beta=0.05, lr=5e-7), "sppo": dict(beta=0.001, lr=5e-7, optimizer="rmsprop"),
                       "simpo": dict(beta=2.0, lr=5e-7), "orpo": dict(lr=5e-7), "ipo": dict(beta=0.1, lr=5e-7)}


# Fields with a fixed set of values: shown by --help, enforced by check_config (flags and --config files alike).
CHOICES = dict(preset=tuple(PRESETS), loss=tuple(losses.LOSSES), info_metric=creator.METRICS,
               selection=("weighted", "greedy", "uniform"), evolve_kinds=("all", "depth", "breadth"),
               optimizer=("adamw", "rmsprop"), online_algo=("rloo", "grpo"), grpo_aggregation=("token", "sequence"))


def field_docs() -> dict[str, tuple[str, str]]:
    """{field: (section, comment)} read off Config's source, so the comment beside each field is its --help text."""
    source = textwrap.dedent(inspect.getsource(Config))
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    docs, section = {}, "run"
    for lineno, line in enumerate(source.splitlines(), 1):
        if line.strip().startswith("# ---"):
            section = comments[lineno].lstrip("- ")
        elif (name := re.match(r"\s+(\w+):", line)) and lineno in comments:
            docs[name.group(1)] = (section, comments[lineno])
    return docs


def flag_help(f: dataclasses.Field, comment: str) -> str:
    """A flag's --help line: its comment, its default and the presets that change it."""
    presets = ", ".join(f"{name} {values[f.name]}" for name, values in PRESETS.items() if f.name in values)
    return f"{comment} (default: {f.default}{'; preset ' + presets if presets else ''})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field, grouped as Config is, each with its comment, default, preset values and choices."""
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--preset NAME] [--config FILE] [--FIELD VALUE ...]", allow_abbrev=False,
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each value comes from, last wins: the Config default, the --preset (demo unless given), the --config "
               "file, the flags given.")
    parser.add_argument("--config", metavar="FILE", help="read field values from a YAML or JSON file (keys are the "
                        "flag names; flags given explicitly win; a run folder's config.json works too)")
    docs, groups = field_docs(), {}
    for f in dataclasses.fields(Config):
        section, comment = docs[f.name]
        group = groups.setdefault(section, parser.add_argument_group(section))
        kwargs = dict(default=None, help=flag_help(f, comment))  # None: "not given", so presets and files can fill in
        if f.type is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
        else:
            metavar = "{" + ",".join(CHOICES[f.name]) + "}" if f.name in CHOICES else f.type.__name__.upper()
            group.add_argument(f"--{f.name}", type=f.type, metavar=metavar, **kwargs)
    return parser


def read_config_file(path: str) -> dict:
    """Field values from a YAML or JSON file: unknown keys and values of the wrong type are refused, named."""
    import yaml  # JSON is YAML too; pyyaml comes with transformers
    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise FileNotFoundError(f"--config {path}: cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML or JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of field names to values")
    types = {f.name: f.type for f in dataclasses.fields(Config)}
    for key, value in values.items():
        if key not in types:
            raise ValueError(f"--config {path}: unknown key {key!r} (not a field of Config; see --help)")
        want = types[key]
        try:  # numbers convert as flags do (YAML reads 1e-4 as text); bools and text must be what they say
            values[key] = want(value) if want in (int, float) and type(value) in (int, float, str) else value
        except ValueError:
            pass
        if type(values[key]) is not want or (want is int and isinstance(value, float)):
            raise ValueError(f"--config {path}: {key} must be {want.__name__}, got {value!r}")
    return values


def parse_config(argv=None) -> Config:
    """Config defaults, then the --preset's values, then a --config file's, then the flags given explicitly."""
    args = build_parser().parse_args(argv)  # unknown flags exit with "unrecognized arguments: ..."
    given = {k: v for k, v in vars(args).items() if v is not None and k != "config"}
    if args.config:
        given = {**read_config_file(args.config), **given}
    preset = given.get("preset", Config.preset)
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    if preset == "paper":
        values.update(PAPER_LOSS_SETTINGS.get(given.get("loss", "dpo"), {}))
    values.update(given)
    cfg = Config(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Refuse impossible settings before any model is loaded or any prompt sampled: one line naming the flag."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} {getattr(cfg, name)}: choose one of {', '.join(allowed)}")
    for f in dataclasses.fields(Config):  # nan and inf pass no range check below
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name} {value}: must be a finite number")
    reward.check_spec(cfg.reward)  # syntax and options only: nothing is loaded or contacted
    if cfg.loss == "orpo" and cfg.beta >= 0:
        raise ValueError(f"--beta {cfg.beta}: --loss orpo has no beta; its odds-ratio weight is --orpo_lambda")
    ranges = [  # (flag, holds, what it must be); written as "holds" so that a nan fails too
        ("lr", cfg.lr > 0, "> 0"),
        ("beta", cfg.beta != 0, "> 0 (or < 0 for the loss's own default)"),
        ("orpo_lambda", cfg.orpo_lambda >= 0, ">= 0"),
        ("gamma_beta_ratio", cfg.gamma_beta_ratio >= 0, ">= 0"),
        ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("warmup_ratio", 0 <= cfg.warmup_ratio < 1, "in [0, 1)"),
        ("max_grad_norm", cfg.max_grad_norm > 0, "> 0"),
        ("vocab_chunk", cfg.vocab_chunk >= 0, ">= 0 (0 = the whole vocabulary at once)"),
        ("save_every", cfg.save_every >= 1, "at least 1"),
        ("n_samples", cfg.n_samples >= 2, "at least 2 (one response per prompt makes no pair and no reward gap)"),
        ("temperature", cfg.temperature >= 0, ">= 0 (0 = greedy)"),
        ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]"),
        ("creator_temperature", cfg.creator_temperature >= 0, ">= 0 (0 = greedy)"),
        ("lora_r", cfg.lora_r >= 1, "at least 1"),
        ("lora_alpha", cfg.lora_alpha >= 1, "at least 1"),
        ("lora_dropout", 0 <= cfg.lora_dropout < 1, "in [0, 1)"),
        ("select_fraction", 0 < cfg.select_fraction <= 1, "in (0, 1]"),
        ("evolved_fraction", 0 < cfg.evolved_fraction <= 1, "in (0, 1]"),
        ("endpoint_timeout", cfg.endpoint_timeout > 0, "> 0 seconds"),
        ("endpoint_retries", cfg.endpoint_retries >= 0, ">= 0"),
    ]
    ranges += [(name, getattr(cfg, name) >= 1, "at least 1") for name in (
        "max_new_tokens", "max_prompt_tokens", "gen_batch_size", "creator_max_new_tokens", "eval_max_new_tokens",
        "epochs", "batch_size", "micro_batch_size", "evolve_depth", "creator_candidates")]
    ranges += [(name, getattr(cfg, name) >= 0, ">= 0") for name in (
        "eva_iterations", "pairs_per_iteration", "max_seed_prompts", "max_heldout_prompts")]
    for name, holds, requirement in ranges:
        if not holds:
            raise ValueError(f"--{name} {getattr(cfg, name)}: must be {requirement}")
    world = parallel.world_size() if parallel.world_size() > 1 else int(os.environ.get("WORLD_SIZE", 1))
    if not cfg.online and cfg.batch_size % (world * cfg.micro_batch_size) != 0:
        raise ValueError(f"--batch_size {cfg.batch_size} must be a multiple of world size {world} x "
                         f"--micro_batch_size {cfg.micro_batch_size}")
    if cfg.load_in_4bit and not cfg.lora:
        raise ValueError("--load_in_4bit trains LoRA adapters on a frozen 4-bit base: it needs --lora")
    if cfg.load_in_4bit:  # the same checks model.load_model makes, here so that they come before any model is loaded
        model.four_bit_config(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.online:  # online eva's fields; the batch_size check above is the offline loop's
        for name, holds, requirement in [
                ("online_steps", cfg.online_steps >= 1, "at least 1"), ("evolve_every", cfg.evolve_every >= 0, ">= 0"),
                ("grpo_epsilon", cfg.grpo_epsilon > 0, "> 0"), ("grpo_iterations", cfg.grpo_iterations >= 1,
                                                                "at least 1"),
                ("online_prompts", cfg.online_prompts % (world * cfg.micro_batch_size) == 0,
                 f"a multiple of world size {world} x --micro_batch_size {cfg.micro_batch_size}")]:
            if not holds:
                raise ValueError(f"--{name} {getattr(cfg, name)}: must be {requirement}")
        if cfg.grpo_iterations > 1 and cfg.online_algo != "grpo":
            raise ValueError("--grpo_iterations > 1 reuses samples off-policy, which only GRPO's clipped ratio "
                             "allows: add --online_algo grpo")
        if cfg.fsdp:
            raise ValueError("--online trains with DDP (LoRA, QLoRA or full fine-tuning): drop --fsdp")
    if cfg.fsdp and cfg.lora:
        raise ValueError("--fsdp shards full fine-tuning; LoRA and QLoRA train with DDP: add --no-lora or --no-fsdp")


# ------------------------------------------------------------------------------------------------- prompts and samples
def read_prompts(path: str, reward_spec: str, limit: int = 0) -> list[dict]:
    """Prompt records from a JSON Lines file; any bad line stops the run before work starts, named by file:line.

    A record needs a prompt and an id (`id`, `key` or `prompt_id`, the UltraFeedback shape); the rules reward also
    needs its constraints (`instruction_id_list`, `kwargs`), which other rewards ignore."""
    file = Path(path) if Path(path).is_absolute() or Path(path).exists() else ROOT / path
    if file.is_dir():
        raise ValueError(f"{path}: is a directory; give the prompt file (JSON Lines) itself")
    if not file.exists():
        raise FileNotFoundError(f"{path}: prompt file not found")
    records, seen = [], set()
    for lineno, record in files.numbered_jsonl(file):
        where = f"{path}:{lineno}"
        ident = next((record[k] for k in ("id", "key", "prompt_id") if record.get(k) is not None), None)
        if ident is None:
            raise ValueError(f"{where}: missing field 'id' (or 'key' or 'prompt_id')")
        record.pop("key", None)
        record["id"] = str(ident)
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ValueError(f"{where}: missing or empty field 'prompt'")
        if record["id"] in seen:
            raise ValueError(f"{where}: duplicate id {record['id']!r}")
        seen.add(record["id"])
        if reward_spec == "rules" and "instruction_id_list" not in record:
            raise ValueError(f"{where}: missing field 'instruction_id_list' (the rules reward checks those "
                             f"constraints; a plain prompt needs --reward hf:... or judge:...)")
        record.setdefault("instruction_id_list", [])
        record.setdefault("kwargs", [{} for _ in record["instruction_id_list"]])
        if reward_spec == "rules":
            instructions.validate_record(record, where)
        record.setdefault("parent", None)
        record.setdefault("iteration", 0)
        record.setdefault("method", None)
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts in the file")
    return records[:limit] if limit else records


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
    info = creator.informativeness([as_floats(s["rewards"]) for s in samples], "gap")
    for s, value in zip(samples, info):
        s["info"] = float(np.nan_to_num(value))  # all rewards tied: no information, 0
    return samples


def as_floats(values: list) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def fixed_count(pairs: list[dict], total: int | None, seed: int) -> list[dict]:
    """Exactly `total` pairs (a seeded subset, or every pair repeated in turn when there are too few)."""
    if not total or not pairs or len(pairs) == total:
        return pairs
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in np.resize(order, total)]


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
    return float(np.nanmean([as_floats(s["rewards"]) for s in samples])) if samples else 0.0


def estimate(policy, tokenizer, scorer, pool: list[dict], cfg: Config, t: int):
    """N responses per pool prompt from the current solver, scored (at t = 0 this is iteration 0's generation)."""
    samples = sample_and_score(policy, tokenizer, scorer, pool, cfg, t, "estimate")
    rewards, informative, n = mean_reward(samples), sum(s["info"] > 0 for s in samples), len(samples)
    return samples, dict(prompts=n, mean_reward=rewards, informative=informative), (
        f"{n} prompts x {cfg.n_samples}, mean reward {rewards:.3f}, informative {informative}/{n}")


def select_parents(pool: list[dict], samples: list[dict], cfg: Config, t: int):
    """The pool prompts to evolve, drawn by informativeness."""
    by_id = {r["id"]: r for r in pool}
    info = creator.informativeness([as_floats(s["rewards"]) for s in samples], cfg.info_metric)
    chosen = creator.select(info, cfg.select_fraction, cfg.selection, parallel.stable_seed(cfg.seed, t, "select"))
    return [by_id[samples[i]["prompt_id"]] for i in chosen], dict(selected=len(chosen), pool=len(pool)), (
        f"{len(chosen)} of {len(pool)} prompts ({cfg.selection}, {cfg.info_metric})")


def evolve_prompts(selected: list[dict], pool: list[dict], complete, tokenizer, cfg: Config, t: int):
    """The creator's children of the selected prompts (creator.evolve), too-long ones skipped."""
    evolved, stats = creator.evolve(selected, complete, depth=cfg.evolve_depth, kinds=cfg.evolve_kinds,
                                    seed=parallel.stable_seed(cfg.seed, t, "evolve"), iteration=t,
                                    verifiable=cfg.reward == "rules", pool=pool)
    evolved = drop_long_prompts(evolved, tokenizer, cfg, "evolved prompts")
    rejected = ", ".join(f"{k} {v}" for k, v in stats["rejected"].items() if v) or "none"
    kept, written = stats["kept"], stats["written"]
    return evolved, dict(children=len(evolved), **stats), (
        f"{len(selected)} parents -> {kept} children: {written} written by the creator "
        f"({100 * written / max(1, kept):.0f}%), {kept - written} by the in-code constraint step ({stats['fallback']} "
        f"replacing a rejected link); {stats['candidates']} candidates for {stats['creator_calls']} links, rejected: "
        f"{rejected}; {len(evolved)} kept under max_prompt_tokens")


def sample_children(policy, tokenizer, scorer, evolved: list[dict], cfg: Config, t: int):
    """N responses per evolved prompt, scored."""
    samples = sample_and_score(policy, tokenizer, scorer, evolved, cfg, t, "generate")
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


def load_models(cfg: Config, run: rundir.Run, device):
    """(solver, fp32 masters or None, tokenizer, reward scorer, (creator model, tokenizer) or (None, None))."""
    policy, tokenizer = trainstate.load_solver(cfg, run, device)
    masters = trainstate.load_masters(cfg, run, device, policy)
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
    seeds = read_prompts(cfg.seed_prompts, cfg.reward, cfg.max_seed_prompts)
    heldout = read_prompts(cfg.heldout_prompts, "rules", cfg.max_heldout_prompts) if cfg.heldout_prompts else []
    if cfg.online and len(seeds) < cfg.online_prompts:
        raise ValueError(f"--online_prompts {cfg.online_prompts}: {cfg.seed_prompts} has only {len(seeds)} prompts")
    model.resolve(cfg.model)
    if cfg.creator != "self" and not cfg.creator.startswith("endpoint:"):
        model.resolve(cfg.creator)
    return device, seeds, heldout, rundir.open_run(cfg)


def main(argv=None) -> None:
    cfg = parse_config(argv)
    if cfg.online:  # online eva: the creator evolves the pool while the solver trains; it reuses this file's phases
        import online
        return online.run(cfg)
    device, seeds, heldout, run = start_run(cfg)
    print0(f"eva: {len(seeds)} seed prompts, {len(heldout)} held-out, solver {cfg.model}, reward {cfg.reward}, "
           f"loss {cfg.loss}, world size {parallel.world_size()}, device {device}")
    policy, masters, tokenizer, scorer, creator_lm = load_models(cfg, run, device)
    evaluate_once(policy, tokenizer, heldout, cfg, run, "start")
    pool = drop_long_prompts(seeds, tokenizer, cfg, "seed prompts")
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
            complete = lambda: make_completer(cfg, t, policy, tokenizer, *creator_lm)  # noqa: E731
            evolved = phase(run, t, "evolve", "evolved.jsonl",
                            lambda: evolve_prompts(selected, pool, complete(), tokenizer, cfg, t))
            evolved_samples = phase(run, t, "generate", "evolved_samples.jsonl",
                                    lambda: sample_children(policy, tokenizer, scorer, evolved, cfg, t))
        pairs = phase(run, t, "pairs", "pairs.jsonl",
                      lambda: build_pairs(pool, samples, evolved, evolved_samples, cfg, t), timed=False)
        phase(run, t, "train", "pool_next.jsonl",
              lambda: update_solver(policy, masters, tokenizer, pairs, pool + evolved, cfg, run, t, device))
        solver.drop_checkpoint(folder)

    evaluate_once(policy, tokenizer, heldout, cfg, run, "end")
    if parallel.is_main():
        import report
        print(report.write_report(run.folder, cfg.eva_iterations))
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
