"""The one Config of eva (a dataclass: each field is a flag, its comment the flag's --help), the presets, and the
checks that refuse impossible settings before any model loads. train_eva.py and online.py both read it.

    cfg = config.parse_config(["--preset", "smoke", "--lr", "1e-4"])   # defaults < preset < --config file < flags
    python train_eva.py --help                                           # every field, described
"""
import argparse
import dataclasses
import inspect
import io
import math
import os
import re
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

import torch

import creator
import losses
import model
import parallel
import reward
import tracking
import vllm_sampler

DESCRIPTION = "eva: evolving alignment via asymmetric self-play (Ye et al., arXiv 2411.00062), offline or --online."


@dataclass
class Config:
    # --- run
    run_dir: str = "runs/demo"  # run folder; rerunning with the same folder resumes it
    preset: str = "demo"  # defaults to start from: smoke | demo | paper | online (a --config file and flags win)
    seed: int = 0  # every random choice (sampling, selection, evolution, data order, LoRA init) derives from it
    allow_config_change: bool = False  # resume even if the config differs from the saved one
    report_to: str = "none"  # also send metrics.jsonl to tensorboard | wandb | trackio (comma-separated) or none
    # --- models and data
    model: str = "default"  # solver: "default" (bundled SmolLM2-135M-Instruct), a hub id or a local folder
    creator: str = "self"  # "self" (the solver rewrites prompts), a model id/folder, or endpoint:<url>#<model>
    reward: str = "rules"  # rules | hf:<id-or-folder> | judge:<base-url> | py:<file.py>:<function> (reward.py)
    # prompt sources (this and --heldout_prompts): a .jsonl/.json/.parquet file, a save_to_disk folder or a Hub
    # dataset id, as WHERE[:split[:column]], e.g. HuggingFaceH4/ultrafeedback_binarized:train_prefs (docs/data.md)
    seed_prompts: str = "data/seed_prompts.jsonl"  # the starting pool (the shipped file is IFEval-style JSON Lines)
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
    sampler: str = "eva"  # who samples the solver (rollouts, held-out answers, self-play rewrites): eva | vllm (CUDA)
    vllm_gpu_memory: float = 0.5  # --sampler vllm: share of each GPU's memory for vLLM's weights and KV cache
    # --- the creator
    # (stored with the samples, counted as "informative", selected and drawn by, offline and online)
    info_metric: str = "gap"  # informativeness: gap | max_mean | variance | mean | inv_mean | best_second | uniform
    selection: str = "weighted"  # weighted | greedy | uniform
    select_fraction: float = 0.25  # share of the pool that is evolved
    evolve_depth: int = 4  # children per selected prompt (a chain x -> x1 -> ... -> xK)
    evolve_kinds: str = "all"  # all | depth | breadth
    evolved_fraction: float = 0.8  # share of training pairs from evolved prompts (the rest from the pool)
    creator_max_new_tokens: int = 160  # longest rewrite
    creator_temperature: float = 0.7  # sampling temperature of the creator
    creator_candidates: int = 4  # rewrites sampled per link; the first that passes cleaning is kept
    creator_learns: bool = False  # the creator is a LoRA adapter trained by RLOO on the solver's signal (creator_rl.py)
    creator_group: int = 4  # --creator_learns: rewrites per parent in the creator's RLOO round (its k, >= 2)
    creator_steps: int = 1  # --creator_learns: RLOO steps per creator round, each on fresh rewrites
    creator_lr: float = 1e-4  # --creator_learns: the creator adapter's learning rate (AdamW, constant)
    copy_threshold: float = 0.6  # --creator_learns: a child this similar to its parent (3-gram Jaccard) is a near-copy
    copy_penalty: float = 1.0  # --creator_learns: subtracted from a near-copy's creator reward (1: never above 0)
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
    # the CPU demo: the bundled SmolLM2-135M-Instruct, rule rewards
    "demo": dict(max_seed_prompts=64, max_new_tokens=96, eval_max_new_tokens=96, creator_max_new_tokens=128,
                 lr=5e-4),
    # the paper: gemma-2-9b-it solver, ArmoRM reward, UltraFeedback's prompts, N=6, DPO, effective batch 64, 8 GPUs.
    # Full fine-tuning sharded with FSDP2 (lr 5e-7 is a full fine-tuning rate; LoRA needs far more); a small
    # gen_batch_size because each prompt's N rows hold a KV cache of prompt + response positions (docs/memory.md).
    "paper": dict(model="google/gemma-2-9b-it", reward="hf:RLHFlow/ArmoRM-Llama3-8B-v0.1", n_samples=6,
                  lora=False, fsdp=True,
                  temperature=0.7, top_p=0.9, max_new_tokens=2048, max_prompt_tokens=1024, gen_batch_size=4,
                  select_fraction=0.25, evolve_depth=4, evolved_fraction=0.8, loss="dpo", lr=5e-7,
                  epochs=2, batch_size=64, micro_batch_size=1, warmup_ratio=0.1, eval_max_new_tokens=2048,
                  creator_max_new_tokens=1024, gradient_checkpointing=True, vocab_chunk=32768,
                  seed_prompts="HuggingFaceH4/ultrafeedback_binarized:train_prefs"),
    # online eva on the CPU: the bundled SmolLM2-135M-Instruct, rule rewards, RLOO; info = max - mean, as online eva;
    # rollouts as long as the answers that are scored (48-token rollouts lost held-out accuracy: docs/online.md)
    "online": dict(online=True, info_metric="max_mean", max_seed_prompts=64, n_samples=4, online_prompts=8,
                   micro_batch_size=4, online_steps=24, evolve_every=6, max_new_tokens=96, eval_max_new_tokens=96,
                   creator_max_new_tokens=96, max_heldout_prompts=32, evolve_depth=2, lr=2e-4, save_every=4),
}
# Per-loss settings applied by --preset paper together with --loss; each one's source in docs/scale.md.
PAPER_LOSS_SETTINGS = {
    "dpo": dict(beta=0.05, lr=5e-7),  # the eva paper's code
    "sppo": dict(beta=0.001, lr=5e-7, optimizer="rmsprop"),  # the eva paper's code
    "simpo": dict(beta=10.0, gamma_beta_ratio=0.5, lr=8e-7, epochs=1),  # SimPO's own gemma-2-9b-it recipe
    "orpo": dict(orpo_lambda=0.1, lr=5e-7),  # ORPO paper's lambda; eva's DPO rate (no gemma-2 ORPO recipe found)
    "ipo": dict(beta=0.1, lr=5e-7),  # TRL's IPO beta; eva's DPO rate
}


# Fields with a fixed set of values: shown by --help, enforced by check_config (flags and --config files alike).
CHOICES = dict(preset=tuple(PRESETS), loss=tuple(losses.LOSSES), info_metric=creator.METRICS,
               selection=("weighted", "greedy", "uniform"), evolve_kinds=("all", "depth", "breadth"),
               optimizer=("adamw", "rmsprop"), online_algo=("rloo", "grpo"), grpo_aggregation=("token", "sequence"),
               sampler=("eva", "vllm"))


def field_docs() -> dict[str, tuple[str, str]]:
    """{field: (section, text)} read off Config's source: the comment beside a field (then any comment lines right
    above it) is its --help text."""
    source = textwrap.dedent(inspect.getsource(Config))
    comments = {tok.start[0]: tok.string.lstrip("# ").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    docs, section, above = {}, "run", []
    for lineno, line in enumerate(source.splitlines(), 1):
        if line.strip().startswith("# ---"):
            section = comments[lineno].lstrip("- ")
        elif line.strip().startswith("#"):  # comment lines above a field: its help's second part
            above.append(comments[lineno])
        elif (name := re.match(r"\s+(\w+):", line)) and lineno in comments:
            docs[name.group(1)], above = (section, "; ".join([comments[lineno]] + above)), []
    return docs


def flag_help(f: dataclasses.Field, comment: str) -> str:
    """A flag's --help line: its comment, its default and the presets that change it."""
    presets = ", ".join(f"{name} {values[f.name]}" for name, values in PRESETS.items() if f.name in values)
    return f"{comment} (default: {f.default}{'; preset ' + presets if presets else ''})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field, grouped as Config is, each with its comment, default, preset values and choices."""
    parser = argparse.ArgumentParser(
        usage="%(prog)s [--preset NAME] [--config FILE] [--FIELD VALUE ...]", allow_abbrev=False,
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
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
    reward.check_spec(cfg.reward)  # syntax and options; a py: file is imported, no model or endpoint touched
    tracking.check(cfg.report_to)  # known names, packages installed: nothing is imported
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
        ("vllm_gpu_memory", 0 < cfg.vllm_gpu_memory < 1, "in (0, 1)"),
        ("creator_group", cfg.creator_group >= 2, "at least 2 (RLOO compares each rewrite with its siblings)"),
        ("creator_lr", cfg.creator_lr > 0, "> 0"),
        ("copy_threshold", 0 < cfg.copy_threshold <= 1, "in (0, 1]"),
        ("copy_penalty", cfg.copy_penalty >= 0, ">= 0"),
    ]
    ranges += [(name, getattr(cfg, name) >= 1, "at least 1") for name in (
        "max_new_tokens", "max_prompt_tokens", "gen_batch_size", "creator_max_new_tokens", "eval_max_new_tokens",
        "epochs", "batch_size", "micro_batch_size", "evolve_depth", "creator_candidates", "creator_steps")]
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
    if cfg.creator_learns:  # a LoRA adapter on the solver's base (or the creator's), trained before each creator round
        for holds, why in [(cfg.lora or cfg.creator != "self", "needs --lora (the creator is a second LoRA adapter on "
                                                                "the solver's base) or a --creator model of its own"),
                           (not cfg.creator.startswith("endpoint:"), "needs a local creator (self or a model), "
                                                                     "not an endpoint"),
                           (cfg.sampler == "eva", "samples with --sampler eva only")]:
            if not holds:
                raise ValueError(f"--creator_learns {why}")
    if cfg.sampler == "vllm":  # 4-bit, no GPU, no package: one line each
        vllm_sampler.check(cfg)
    if cfg.fsdp and cfg.lora:
        raise ValueError("--fsdp shards full fine-tuning; LoRA and QLoRA train with DDP: add --no-lora or --no-fsdp")
