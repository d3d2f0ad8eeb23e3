"""eva: evolving alignment via asymmetric self-play (Ye et al., arXiv 2411.00062), the whole loop in one file.

    python train_eva.py                                   # the CPU demo: SmolLM2-135M, rules reward, ~12 min on 2 cores
    python train_eva.py --preset smoke --run_dir runs/smoke   # a minute or two, what the tests run
    torchrun --nproc_per_node=8 train_eva.py --preset paper --run_dir runs/gemma   # the paper's setting
    python train_eva.py --help                            # every field of Config below is a flag

Iteration 0 is ordinary preference optimisation on the seed prompts: sample N responses per prompt with the
solver, score them, train on best-vs-worst pairs. Each later iteration t is eva:
  estimate  sample N responses per prompt of the pool with the current solver; info(x) = reward gap
  select    draw 25% of the pool, weighted by normalised info, without replacement
  evolve    the creator rewrites each selected prompt into a chain of children (harder or different prompts)
  generate  sample + score N responses per child
  pairs     best-vs-worst pairs: 80% from children, 20% from the pool
  train     one solver update with the chosen loss; the reference is the solver as the iteration starts
The children join the pool. Every phase writes its output to runs/<name>/iter_<t>/ and then a marker
`done_<phase>`; rerunning the same command resumes at the first phase without a marker.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import creator
import endpoint
import generate
import losses
import model as modeling
import parallel
import reward as rewards
from eval.ifeval import evaluate_ifeval
from parallel import print0

ROOT = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class Config:
    # --- run
    run_dir: str = "runs/demo"  # run folder; rerunning with the same folder resumes it
    preset: str = "demo"  # defaults to start from: smoke | demo | paper (flags given explicitly win)
    seed: int = 0  # every random choice (sampling, selection, evolution, data order, LoRA init) derives from it
    allow_config_change: bool = False  # resume even if the config differs from the saved one
    # --- models and data
    model: str = "default"  # solver: "default" (bundled SmolLM2-135M-Instruct), a hub id or a local folder
    creator: str = "self"  # "self" (the solver rewrites prompts), a model id/folder, or endpoint:<url>#<model>
    reward: str = "rules"  # rules | hf:<id-or-folder> | judge:<base-url> (see reward.py)
    seed_prompts: str = "data/seed_prompts.jsonl"  # the starting pool (IFEval-style JSON Lines)
    heldout_prompts: str = "data/heldout_prompts.jsonl"  # evaluated at the start and the end, never trained on ("" = skip)
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


PRESETS = {
    # what the tests run: a handful of prompts, tiny updates; pass --model <folder> to use a tiny random model
    "smoke": dict(max_seed_prompts=8, max_heldout_prompts=4, n_samples=2, max_new_tokens=16, evolve_depth=2,
                  select_fraction=0.5, creator_max_new_tokens=32, eval_max_new_tokens=16, epochs=1, batch_size=4,
                  micro_batch_size=2, save_every=1),
    # the CPU demo: the bundled SmolLM2-135M-Instruct, rule rewards, about 12 minutes on 2 cores (README)
    "demo": dict(max_seed_prompts=64, max_new_tokens=96, eval_max_new_tokens=96, creator_max_new_tokens=128,
                 lr=5e-4),
    # the paper: gemma-2-9b-it solver, ArmoRM reward, N=6, DPO beta 0.05, lr 5e-7, effective batch 64, 8 GPUs.
    # Full fine-tuning sharded with FSDP2, as the paper's code did (lr 5e-7 is a full fine-tuning rate; LoRA needs
    # ~100x more). gen_batch_size 4: 24 rows of KV cache at 1024 + 2048 positions = 25 GB (README's memory table).
    "paper": dict(model="google/gemma-2-9b-it", reward="hf:RLHFlow/ArmoRM-Llama3-8B-v0.1", n_samples=6,
                  lora=False, fsdp=True,
                  temperature=0.7, top_p=0.9, max_new_tokens=2048, max_prompt_tokens=1024, gen_batch_size=4,
                  select_fraction=0.25, evolve_depth=4, evolved_fraction=0.8, loss="dpo", lr=5e-7,
                  epochs=2, batch_size=64, micro_batch_size=1, warmup_ratio=0.1, eval_max_new_tokens=2048,
                  creator_max_new_tokens=1024, gradient_checkpointing=True, vocab_chunk=32768,
                  seed_prompts="data/seed_prompts.jsonl"),
}
# The paper's per-loss settings, applied by --preset paper together with --loss: the only source of its beta.
PAPER_LOSS_SETTINGS = {"dpo": dict(beta=0.05, lr=5e-7), "sppo": dict(beta=0.001, lr=5e-7, optimizer="rmsprop"),
                       "simpo": dict(beta=2.0, lr=5e-7), "orpo": dict(lr=5e-7), "ipo": dict(beta=0.1, lr=5e-7)}


def parse_config(argv=None) -> Config:
    """Flags from the dataclass fields; --preset picks the defaults, explicit flags override them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    for f in dataclasses.fields(Config):
        if f.type is bool or f.type == "bool":
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type) if isinstance(f.type, str) else f.type
            parser.add_argument(f"--{f.name}", type=kind, default=None, metavar=kind.__name__.upper())
    args = parser.parse_args(argv)  # unknown flags exit with "unrecognized arguments: ..."
    given = {k: v for k, v in vars(args).items() if v is not None}
    preset = given.get("preset", Config.preset)
    if preset not in PRESETS:
        parser.error(f"--preset {preset}: choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    if preset == "paper":
        values.update(PAPER_LOSS_SETTINGS.get(given.get("loss", "dpo"), {}))
    values.update(given)
    cfg = Config(**values)
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Refuse impossible settings before any model is loaded or any prompt sampled: one line naming the flag."""
    choices = dict(loss=tuple(losses.LOSSES), info_metric=creator.METRICS, selection=("weighted", "greedy", "uniform"),
                   evolve_kinds=("all", "depth", "breadth"), optimizer=("adamw", "rmsprop"))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name} {getattr(cfg, name)}: choose one of {', '.join(allowed)}")
    for f in dataclasses.fields(Config):  # nan and inf pass no range check below
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name} {value}: must be a finite number")
    rewards.check_spec(cfg.reward)  # syntax and options only: nothing is loaded or contacted
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
    if cfg.batch_size % (world * cfg.micro_batch_size) != 0:
        raise ValueError(f"--batch_size {cfg.batch_size} must be a multiple of world size {world} x "
                         f"--micro_batch_size {cfg.micro_batch_size}")
    if cfg.load_in_4bit and not cfg.lora:
        raise ValueError("--load_in_4bit trains LoRA adapters on a frozen 4-bit base: it needs --lora")
    if cfg.load_in_4bit:  # the same checks model.load_model makes, here so that they come before any model is loaded
        modeling.four_bit_config(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.fsdp and cfg.lora:
        raise ValueError("--fsdp shards full fine-tuning; LoRA and QLoRA train with DDP: add --no-lora or --no-fsdp")


# ------------------------------------------------------------------------------------------------- files
def write_atomic(path: Path, content) -> None:
    """Write to a temporary name, then rename: a killed run never leaves a half file that looks whole.
    content: text, or any object for torch.save (checkpoints). Rank 0 writes."""
    if not parallel.is_main():
        return
    tmp = path.with_name(path.name + ".tmp")
    text = isinstance(content, str)
    with open(tmp, "w" if text else "wb") as f:
        if text:
            f.write(content)
        else:
            torch.save(content, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a node that loses power keeps no empty "finished" file
    os.replace(tmp, path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    return [record for _, record in numbered_jsonl(path)]


def numbered_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, record) for every non-blank line, so errors name the file's own line numbers."""
    records = []
    try:
        with open(path, "rb") as f:
            raw_lines = f.readlines()
    except OSError as err:  # a directory, a file without read permission, ...
        raise ValueError(f"{path}: cannot read it ({err.strerror or err})") from None
    for lineno, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # utf-8-sig: a leading byte-order mark is fine
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {err.start + 1} of the line is "
                             f"{raw[err.start]:#04x}); save the file as UTF-8") from None
        if line.strip():
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    return records


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
    for lineno, record in numbered_jsonl(file):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object")
        record = dict(record)
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
            rewards.validate_record(record, where)
        record.setdefault("parent", None)
        record.setdefault("iteration", 0)
        record.setdefault("method", None)
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts in the file")
    return records[:limit] if limit else records


def kill_point(t: int, phase: str, step: int | None = None) -> None:
    """Test hook: EVA_KILL_AT="<t>:<phase>[:<step>]" makes this process SIGKILL itself here.

    Run.mark calls it after a phase's outputs are written and before its marker; train calls it after each
    checkpoint (with the checkpoint's step). "1:train" dies at the first matching point, "1:train:2" only after
    the step-2 checkpoint. tests/test_resume.py uses it to kill a run inside every phase and check that the
    resumed run ends exactly where an uninterrupted one does. Unset (always, outside tests) it does nothing.
    """
    spec = os.environ.get("EVA_KILL_AT")
    if not spec:
        return
    want_t, want_phase, *want_step = spec.split(":")
    if int(want_t) == t and want_phase == phase and (not want_step or int(want_step[0]) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def nonfinite_point(t: int, step: int) -> bool:
    """Test hook: EVA_NONFINITE_AT="<rank>:<t>:<step>" makes that rank's loss NaN at training step `step` of
    iteration t, so tests can check that every rank stops together. Unset (always, outside tests) it is False."""
    spec = os.environ.get("EVA_NONFINITE_AT")
    return bool(spec) and [int(x) for x in spec.split(":")] == [parallel.rank(), t, step]


class Run:
    """The run folder: iter_<t>/ subfolders, phase markers, metrics.jsonl."""

    def __init__(self, folder: Path):
        self.folder = folder

    def iter_dir(self, t: int) -> Path:
        path = self.folder / f"iter_{t}"
        if parallel.is_main():
            path.mkdir(parents=True, exist_ok=True)
        return path

    def done(self, t: int, phase: str) -> bool:
        # Rank 0's answer for all: a phase without collectives (select, pairs) lets rank 0 write its marker before a
        # slower rank looks, which would then skip the phase's barrier and hang the next collective.
        return parallel.broadcast((self.folder / f"iter_{t}" / f"done_{phase}").exists())

    def mark(self, t: int, phase: str, summary: dict) -> None:
        kill_point(t, phase)  # test hook: outputs written, marker not yet
        write_atomic(self.iter_dir(t) / f"done_{phase}", json.dumps(summary) + "\n")
        self.log({"iteration": t, "phase": phase, **summary})
        parallel.barrier()

    def log(self, record: dict) -> None:
        if parallel.is_main():
            with open(self.folder / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def open_run(cfg: Config) -> Run:
    """Create the run folder, or resume it when the config matches the saved one."""
    folder = Path(cfg.run_dir)
    saved_path = folder / "config.json"
    current = dataclasses.asdict(cfg)
    started = any(folder.glob("iter_*/done_*")) or (folder / "eval_start.json").exists()
    if saved_path.is_file() and started:  # before any finished work, a corrected command simply starts over
        saved = json.loads(saved_path.read_text())
        ignore = {"allow_config_change", "run_dir"}  # where the folder lives is not a setting
        changed = sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))
        if changed and not cfg.allow_config_change:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise SystemExit(f"error: {folder} was started with another config ({diff}); "
                             f"use another --run_dir, or --allow_config_change to resume anyway")
        print0(f"resuming {folder}" + (f" (accepted changes: {', '.join(changed)})" if changed else ""))
    elif folder.exists() and any(folder.iterdir()) and not saved_path.is_file():
        raise SystemExit(f"error: {folder} exists and is not an eva run folder (no config.json); refusing to touch it")
    if parallel.is_main():
        folder.mkdir(parents=True, exist_ok=True)
    parallel.barrier()
    write_atomic(saved_path, json.dumps(current, indent=1) + "\n")
    return Run(folder)


# ------------------------------------------------------------------------------------------------- phases
def stable_seed(*parts) -> int:
    """A seed from any parts (seed, iteration, phase, prompt id) that is the same on every rank and every run."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def sample_and_score(solver, tokenizer, scorer, records: list[dict], cfg: Config, t: int, phase: str) -> list[dict]:
    """N responses per prompt and their rewards: sample records, sharded over ranks."""
    seeds = [stable_seed(cfg.seed, t, phase, r["id"]) for r in records]

    def work(indices: list[int]) -> list[dict]:
        batch = [records[i] for i in indices]
        out = generate.halve_on_oom(lambda size: generate.sample(
            solver, tokenizer, [r["prompt"] for r in batch], n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, seeds=[seeds[i] for i in indices], batch_size=size,
            progress=parallel.is_main()), cfg.gen_batch_size, f"{phase}: sampling")
        flat_prompts = [r for r in batch for _ in range(cfg.n_samples)]
        flat_responses = [text for texts in out.texts for text in texts]
        # One call as long as memory allows; after an out-of-memory error, the same items in smaller calls.
        flat_scores = generate.halve_on_oom(
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
    kept = [r for r in records if len(prompt_token_ids(tokenizer, r["prompt"])) <= cfg.max_prompt_tokens]
    if len(kept) < len(records):
        skipped = [r["id"] for r in records if r not in kept]
        print0(f"[{where}] skipped {len(skipped)} prompts longer than --max_prompt_tokens "
               f"{cfg.max_prompt_tokens}: {', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}")
    return kept


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


# ------------------------------------------------------------------------------------------------- training
def encode_pair(tokenizer, pair: dict, cfg: Config, end_id: int) -> dict:
    """Token ids of prompt, chosen and rejected, tokenised separately (joining strings merges boundary tokens).

    A response the model ended itself gets the chat template's end-of-turn token `end_id` (model.turn_end_id), so
    the model also learns where an answer stops. One cut at --max_new_tokens (finish "length", or longer than that
    after re-tokenisation) gets none: it must not learn to stop where the cap fell.
    """
    prompt = prompt_token_ids(tokenizer, pair["prompt"])[-cfg.max_prompt_tokens:]

    def response(text: str, finish: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return ids[:cfg.max_new_tokens] if finish == "length" or len(ids) > cfg.max_new_tokens else ids + [end_id]

    # pairs written before samples recorded how each response ended have no finish field: taken as "stop"
    return dict(prompt=prompt, chosen=response(pair["chosen"], pair.get("chosen_finish", "stop")),
                rejected=response(pair["rejected"], pair.get("rejected_finish", "stop")))


def collate(encoded: list[dict], pad_id: int, device) -> dict:
    """Chosen rows then rejected rows in one right-padded batch, so both go through one forward."""
    rows = [e["prompt"] + e["chosen"] for e in encoded] + [e["prompt"] + e["rejected"] for e in encoded]
    n_response = [len(e["chosen"]) for e in encoded] + [len(e["rejected"]) for e in encoded]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [2B, T]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [2B, T]
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [2B, T]
    for i, (row, n) in enumerate(zip(rows, n_response)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        response_mask[i, len(row) - n:len(row)] = 1
    return dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                response_mask=response_mask.to(device))


def forward_logps(policy, batch: dict, cfg: Config) -> tuple[losses.SeqLogps, losses.SeqLogps]:
    """Per-sequence log-probs of the chosen and rejected halves of a collated batch."""
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [2B, T, V]
    logps = losses.sequence_logps(logits, batch["input_ids"], batch["response_mask"], cfg.vocab_chunk or None)
    half = logits.shape[0] // 2
    split = lambda s, part: losses.SeqLogps(*(getattr(s, k)[part] for k in ("sum", "count", "avg")))
    return split(logps, slice(0, half)), split(logps, slice(half, None))


@torch.no_grad()
def reference_logps(solver, encoded: list[dict], cfg: Config, device) -> torch.Tensor:
    """[P, 6] log-probs of every pair under the iteration's starting policy (chosen/rejected sum, count, avg)."""
    solver.eval()

    def work(indices: list[int]) -> list[list[float]]:
        out = []
        for s in range(0, len(indices), cfg.micro_batch_size):
            batch = collate([encoded[i] for i in indices[s:s + cfg.micro_batch_size]], pad_id(solver), device)
            chosen, rejected = forward_logps(solver, batch, cfg)
            out += torch.stack([chosen.sum, chosen.count, chosen.avg, rejected.sum, rejected.count, rejected.avg],
                               1).tolist()
        return out

    return torch.tensor(parallel.sharded(work, list(range(len(encoded))), desc="reference"), dtype=torch.float32)


def pad_id(solver) -> int:
    config = solver.config
    return config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or 0)


def lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warmup then cosine decay to zero, as a multiplier of --lr."""
    warmup = max(1, round(cfg.warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def rng_state() -> dict:
    """This process's torch RNG state (CPU, and the current CUDA device when there is one)."""
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def stop_nonfinite(folder: Path, ckpt_path: Path, t: int, step: int, what: str, pair_ids, pairs: list[dict]) -> None:
    """Write the offending batch and stop the run: a NaN or inf never reaches the weights or a checkpoint.

    Collective: every rank calls it once any rank found a non-finite value (parallel.any_rank), with the pairs it
    found it in (none on a rank whose values were finite), and every rank stops with the same message."""
    found = parallel.sharded(lambda mine: [[int(i) for i in pair_ids] for _ in mine],
                             list(range(parallel.world_size())), desc="non-finite pairs")  # [rank][pair]
    indices = [i for ids in found for i in ids]
    bad = dict(iteration=t, step=step, ranks=[r for r, ids in enumerate(found) if ids], what=what,
               pair_indices=indices, prompt_ids=[pairs[i]["prompt_id"] for i in indices])
    path = folder / "nonfinite_batch.json"
    write_atomic(path, json.dumps(bad) + "\n")
    kept = (f"the last good checkpoint ({ckpt_path}) is kept and a rerun resumes from it" if ckpt_path.exists() else
            "no checkpoint yet: a rerun restarts the phase from the iteration's starting solver")
    ids = ", ".join(bad["prompt_ids"][:8]) + (" ..." if len(bad["prompt_ids"]) > 8 else "")
    raise SystemExit(f"error: iteration {t} step {step}: {what} is not finite (pairs of prompts {ids}); no update "
                     f"made; {kept}; the batch is in {path}")


def train(solver, masters, tokenizer, pairs: list[dict], cfg: Config, run: Run, t: int, device) -> dict:
    """One solver update on the iteration's pairs; resumable from the last checkpoint inside the phase.

    LoRA steps the adapter inside `solver`; full fine-tuning steps the fp32 `masters` (see load_masters), and
    save_solver then refreshes the sampling model from them. The reference is `solver` as the phase starts."""
    import gc
    from contextlib import nullcontext
    folder = run.iter_dir(t)
    spec = losses.LOSSES[cfg.loss]
    end_id = modeling.turn_end_id(tokenizer)
    encoded = [encode_pair(tokenizer, p, cfg, end_id) for p in pairs]
    ref_path = folder / "reference_logps.pt"
    ref = None
    if spec.needs_reference:  # once per iteration, before the first step, from the starting policy
        if ref_path.exists():
            ref = torch.load(ref_path)
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                ref = reference_logps(solver, encoded, cfg, device)
            write_atomic(ref_path, ref)
    p_chosen = torch.tensor([p["p_chosen"] for p in pairs], dtype=torch.float32)
    p_rejected = torch.tensor([p["p_rejected"] for p in pairs], dtype=torch.float32)

    fsdp = uses_fsdp(cfg)
    ddp = parallel.world_size() > 1 and not fsdp
    trained = solver if masters is None else masters
    policy = trained
    if fsdp and device.type == "cuda":
        solver.to("cpu")  # out of the GPU's way while the shards train; save_solver brings it back
    params = [p for p in policy.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.RMSprop(params, lr=cfg.lr)
    steps_per_epoch = math.ceil(len(pairs) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, cfg))
    start_step = 0
    ckpt_path = folder / "train_state.pt"
    # Dropout is the one user of torch's global RNG: seeded per phase here, and restored from a checkpoint below, so
    # neither an earlier iteration nor a restart changes the draws.
    torch.manual_seed(stable_seed(cfg.seed, t, "train"))
    if ckpt_path.exists() and not fsdp:  # --fsdp writes no mid-phase checkpoint: a killed phase starts over
        state = torch.load(ckpt_path, weights_only=False)
        trainable = {n: p for n, p in trained.named_parameters() if p.requires_grad}
        for name, value in state["weights"].items():
            trainable[name].data.copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        if len(state.get("rng") or []) == parallel.world_size():
            set_rng_state(state["rng"][parallel.rank()])
        else:
            print0(f"[iter {t}] train: the checkpoint holds no RNG state for {parallel.world_size()} ranks; "
                   f"dropout draws will differ from an uninterrupted run")
        print0(f"[iter {t}] train: resuming at step {start_step}/{total_steps}")

    if ddp:
        policy = torch.nn.parallel.DistributedDataParallel(trained)
    world, me = parallel.world_size(), parallel.rank()
    per_rank = cfg.batch_size // world
    # The data order of every epoch is fixed by the seed, so a resumed run sees the same batches.
    orders = [np.random.default_rng(stable_seed(cfg.seed, t, "order", e)).permutation(len(pairs))
              for e in range(cfg.epochs)]
    policy.train()
    stats = []
    bar = parallel.progress(range(start_step, total_steps), desc=f"iter {t} train", initial=start_step,
                            total=total_steps)
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        batch_ids = np.resize(orders[epoch], steps_per_epoch * cfg.batch_size)  # wraps to fill the last batch
        batch_ids = batch_ids[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        local_ids = batch_ids[me * per_rank:(me + 1) * per_rank]
        step_loss, step_chosen, step_rejected = [], [], []
        for s in range(0, per_rank, cfg.micro_batch_size):
            ids = local_ids[s:s + cfg.micro_batch_size]
            batch = collate([encoded[i] for i in ids], pad_id(solver), device)
            # DDP all-reduces on the last micro batch only (its flag is read in forward); FSDP reduce-scatters
            # every one, since unsharded gradients would cost the memory it saves. bf16 autocast on a GPU.
            no_sync = policy.no_sync() if ddp and s + cfg.micro_batch_size < per_rank else nullcontext()
            with no_sync, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                chosen, rejected = forward_logps(policy, batch, cfg)
            ref_chosen = ref_rejected = None
            if ref is not None:
                r = ref[torch.as_tensor(ids)].to(device)  # [b, 6]
                ref_chosen, ref_rejected = losses.SeqLogps(*r[:, 0:3].T), losses.SeqLogps(*r[:, 3:6].T)
            loss, chosen_reward, rejected_reward = losses.preference_loss(
                cfg.loss, chosen, rejected, ref_chosen, ref_rejected,
                p_chosen=p_chosen[ids].to(device), p_rejected=p_rejected[ids].to(device),
                beta=None if cfg.beta < 0 else cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio, lam=cfg.orpo_lambda)
            if nonfinite_point(t, step + 1):  # test hook
                loss = loss * math.nan
            # decided together (one all-reduce of a flag), so no rank waits for another that stopped
            nonfinite = not torch.isfinite(loss).all()
            if parallel.any_rank(nonfinite):
                stop_nonfinite(folder, ckpt_path, t, step + 1, f"the {cfg.loss} loss", ids if nonfinite else [], pairs)
            # sum over the global batch / batch size; DDP averages over ranks, hence the * world
            (loss.sum() * world / cfg.batch_size).backward()
            step_loss += loss.detach().tolist()
            step_chosen += chosen_reward.tolist()
            step_rejected += rejected_reward.tolist()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if parallel.any_rank(not torch.isfinite(grad_norm)):  # the reduced gradients': the same on every rank
            stop_nonfinite(folder, ckpt_path, t, step + 1, "the gradient norm", local_ids, pairs)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # log the global batch, not rank 0's share of it
            parts = parallel.sharded(lambda mine: [(step_loss, step_chosen, step_rejected) for _ in mine],
                                     list(range(world)), desc="step stats")
            step_loss, step_chosen, step_rejected = ([x for part in parts for x in part[k]] for k in range(3))
        margins = np.array(step_chosen) - np.array(step_rejected)
        record = dict(iteration=t, step=step + 1, loss=float(np.mean(step_loss)), margin=float(margins.mean()),
                      accuracy=float((margins > 0).mean()), grad_norm=float(grad_norm),
                      lr=scheduler.get_last_lr()[0])
        stats.append(record)
        run.log(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
        if (step + 1) % cfg.save_every == 0 and step + 1 < total_steps and not fsdp:
            # every rank's RNG state (each draws its own dropout masks), gathered for rank 0 to save
            rng = parallel.sharded(lambda mine: [rng_state() for _ in mine], list(range(world)), desc="rng state")
            if parallel.is_main():
                weights = {n: p.detach().cpu() for n, p in trained.named_parameters() if p.requires_grad}
                write_atomic(ckpt_path, dict(weights=weights, optimizer=optimizer.state_dict(),
                                             scheduler=scheduler.state_dict(), step=step + 1, rng=rng))
                kill_point(t, "train", step + 1)  # test hook
    del policy, params, optimizer, scheduler
    gc.collect()  # FSDP's hooks form reference cycles: free the optimizer state now
    trained.eval()
    solver.eval()
    return dict(pairs=len(pairs), steps=total_steps,
                first_loss=stats[0]["loss"] if stats else None, last_loss=stats[-1]["loss"] if stats else None)


def uses_fsdp(cfg: Config) -> bool:
    return cfg.fsdp and not cfg.lora and parallel.world_size() > 1


def save_solver(solver, masters, tokenizer, cfg: Config, folder: Path, device) -> None:
    """Write the weights of record (the LoRA adapter, or full fine-tuning's fp32 masters) and make the sampling
    model equal to them again, on every rank."""
    if cfg.lora or masters is solver:
        if parallel.is_main():
            if cfg.lora:
                modeling.save_adapter(solver, folder / "adapter", cfg.model)
            else:
                modeling.save_full(solver, tokenizer, folder / "model")
    elif uses_fsdp(cfg):
        # Rank 0 gathers the fp32 shards into its plain model, upcast on the CPU, and writes them; every rank then
        # holds the same sampling copy, rounded to the sampling dtype.
        solver.to("cpu")
        if parallel.is_main():
            solver.float()
        parallel.fsdp_gather(masters, solver)
        if parallel.is_main():
            modeling.save_full(solver, tokenizer, folder / "model")
        solver.to(device, sampling_dtype(device))
    else:  # a bf16 sampling copy of fp32 masters (one process or DDP on a GPU)
        if parallel.is_main():
            modeling.save_full(masters, tokenizer, folder / "model")
        with torch.no_grad():
            targets = dict(solver.named_parameters())
            for name, param in masters.named_parameters():
                targets[name].copy_(param)
    parallel.barrier()


def sampling_dtype(device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # load_model's default


def solver_source(cfg: Config, run: Run) -> tuple[int | None, str]:
    """(last finished iteration or None, the model folder or id full fine-tuning resumes from)."""
    last = max((t for t in range(cfg.eva_iterations + 1) if run.done(t, "train")), default=None)
    if last is not None and not cfg.lora:
        return last, str(run.folder / f"iter_{last}" / "model")
    return last, cfg.model


def load_solver(cfg: Config, run: Run, device):
    """The sampling model as the last finished iteration left it (or fresh), with its LoRA adapter trainable."""
    last, source = solver_source(cfg, run)
    solver, tokenizer = modeling.load_model(source, device=device, load_in_4bit=cfg.load_in_4bit)
    if cfg.lora:
        # A resumed adapter gets the same preparation as a fresh one (4-bit casts, gradient checkpointing).
        adapter = run.folder / f"iter_{last}" / "adapter" if last is not None else None
        torch.manual_seed(cfg.seed)  # the LoRA A matrices are random: the same on every rank
        solver = modeling.add_lora(solver, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                   gradient_checkpointing=cfg.gradient_checkpointing, adapter=adapter)
    solver.eval()
    return solver, tokenizer


def load_masters(cfg: Config, run: Run, device, solver):
    """Full fine-tuning's weights of record: fp32 masters that the optimizer steps (a 5e-7 step vanishes in bf16
    rounding), kept across iterations, written by save_solver and read back on resume; compute runs under bf16
    autocast on a GPU. LoRA has none (peft keeps adapter weights in fp32): None.

    One process or DDP: the fp32 solver itself (on the CPU), else an fp32 model beside the bf16 sampling copy.
    --fsdp: fp32 shards (parallel.fsdp_shard), loaded on the CPU so that no rank holds the whole model on its GPU.
    """
    if cfg.lora:
        return None
    fsdp = uses_fsdp(cfg)
    if fsdp or any(p.dtype != torch.float32 for p in solver.parameters()):
        masters, _ = modeling.load_model(solver_source(cfg, run)[1], device="cpu" if fsdp else device,
                                         dtype=torch.float32)
    else:
        masters = solver
    if cfg.gradient_checkpointing:
        masters.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return parallel.fsdp_shard(masters, device) if fsdp else masters


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(solver, tokenizer, records: list[dict], cfg: Config) -> dict:
    """Held-out constraint accuracy with greedy answers (IFEval's strict prompt- and instruction-level)."""
    result = generate.halve_on_oom(lambda size: evaluate_ifeval(solver, tokenizer, records, batch_size=size,
                                                                max_new_tokens=cfg.eval_max_new_tokens,
                                                                progress=parallel.is_main()),
                                   cfg.gen_batch_size, "held-out evaluation")
    result["answers"] = [{"prompt_id": r["id"], "answer": a} for r, a in zip(records, result.pop("responses"))]
    return result


def evaluate_once(solver, tokenizer, heldout: list[dict], cfg: Config, run: Run, when: str) -> None:
    """eval_<when>.json for the solver as it is now, unless a finished run already wrote it."""
    path = run.folder / f"eval_{when}.json"
    if not heldout or path.exists():
        return
    t0 = time.time()
    result = evaluate(solver, tokenizer, heldout, cfg)
    write_atomic(path, json.dumps(result, indent=1) + "\n")
    print0(f"[{when}] held-out: prompt-level {result['prompt_level']:.3f}, instruction-level "
           f"{result['instruction_level']:.3f} ({time.time() - t0:.0f} s)")


# ------------------------------------------------------------------------------------------------- the loop
def make_completer(cfg: Config, t: int, solver, tokenizer, creator_model=None, creator_tokenizer=None):
    """The creator's `complete(messages) -> candidates per message`: the solver itself (self-play), another local
    model, or an endpoint; cfg.creator_candidates texts per message."""
    if cfg.creator.startswith("endpoint:"):
        url, _, name = cfg.creator[len("endpoint:"):].partition("#")
        return creator.endpoint_completer(url, name, temperature=cfg.creator_temperature,
                                          max_tokens=cfg.creator_max_new_tokens, timeout=cfg.endpoint_timeout,
                                          retries=cfg.endpoint_retries, candidates=cfg.creator_candidates)
    model, tok = (solver, tokenizer) if cfg.creator == "self" else (creator_model, creator_tokenizer)
    return creator.local_completer(model, tok, seed=stable_seed(cfg.seed, t, "creator"),
                                   max_new_tokens=cfg.creator_max_new_tokens, temperature=cfg.creator_temperature,
                                   top_p=cfg.top_p, batch_size=cfg.gen_batch_size, candidates=cfg.creator_candidates)


def main(argv=None) -> None:
    cfg = parse_config(argv)
    device = parallel.init()
    torch.manual_seed(cfg.seed)
    # Bad input stops the run here, before a run folder is created or a model is loaded.
    seeds = read_prompts(cfg.seed_prompts, cfg.reward, cfg.max_seed_prompts)
    heldout = read_prompts(cfg.heldout_prompts, "rules", cfg.max_heldout_prompts) if cfg.heldout_prompts else []
    modeling.resolve(cfg.model)
    if cfg.creator not in ("self",) and not cfg.creator.startswith("endpoint:"):
        modeling.resolve(cfg.creator)
    run = open_run(cfg)
    print0(f"eva: {len(seeds)} seed prompts, {len(heldout)} held-out, solver {cfg.model}, reward {cfg.reward}, "
           f"loss {cfg.loss}, world size {parallel.world_size()}, device {device}")

    solver, tokenizer = load_solver(cfg, run, device)
    masters = load_masters(cfg, run, device, solver)
    context = getattr(solver.config, "max_position_embeddings", None)
    if context and cfg.max_prompt_tokens + cfg.max_new_tokens > context:
        raise ValueError(f"--max_prompt_tokens {cfg.max_prompt_tokens} + --max_new_tokens {cfg.max_new_tokens} exceed "
                         f"the context of {cfg.model} ({context} tokens); lower them")
    judge = dict(timeout=cfg.endpoint_timeout, retries=cfg.endpoint_retries) if cfg.reward.startswith("judge:") else {}
    scorer = rewards.load_reward(cfg.reward, device=device, **judge)  # ?timeout=&retries= in the URL still win
    creator_model = creator_tokenizer = None
    if cfg.creator != "self" and not cfg.creator.startswith("endpoint:"):
        creator_model, creator_tokenizer = modeling.load_model(cfg.creator, device=device)

    evaluate_once(solver, tokenizer, heldout, cfg, run, "start")

    pool = drop_long_prompts(seeds, tokenizer, cfg, "seed prompts")
    if not pool:
        raise ValueError(f"{cfg.seed_prompts}: every prompt is longer than --max_prompt_tokens {cfg.max_prompt_tokens}")
    for t in range(cfg.eva_iterations + 1):
        folder = run.iter_dir(t)
        parallel.barrier()
        if t > 0:
            pool = read_jsonl(run.folder / f"iter_{t - 1}" / "pool_next.jsonl")
        if run.done(t, "train"):
            pool = read_jsonl(folder / "pool_next.jsonl")
            continue
        write_jsonl(folder / "pool.jsonl", pool)
        phase_start = time.time()

        # estimate (t > 0) / generate (t = 0): N responses per pool prompt from the current solver, scored
        if not run.done(t, "estimate"):
            samples = sample_and_score(solver, tokenizer, scorer, pool, cfg, t, "estimate")
            write_jsonl(folder / "samples.jsonl", samples)
            mean_reward = float(np.nanmean([as_floats(s["rewards"]) for s in samples]))
            informative = sum(s["info"] > 0 for s in samples)
            run.mark(t, "estimate", dict(prompts=len(samples), mean_reward=mean_reward, informative=informative,
                                         seconds=round(time.time() - phase_start, 1)))
            print0(f"[iter {t}] estimate: {len(samples)} prompts x {cfg.n_samples}, mean reward {mean_reward:.3f}, "
                   f"informative {informative}/{len(samples)} ({time.time() - phase_start:.0f} s)")
        samples = read_jsonl(folder / "samples.jsonl")
        by_id = {r["id"]: r for r in pool}
        original_pairs = creator.make_pairs(pool, samples, source="original")

        evolved = []
        if t > 0 and cfg.evolve:
            if not run.done(t, "select"):
                info = creator.informativeness([as_floats(s["rewards"]) for s in samples], cfg.info_metric)
                chosen = creator.select(info, cfg.select_fraction, cfg.selection, stable_seed(cfg.seed, t, "select"))
                write_jsonl(folder / "selected.jsonl", [by_id[samples[i]["prompt_id"]] for i in chosen])
                run.mark(t, "select", dict(selected=len(chosen), pool=len(pool)))
                print0(f"[iter {t}] select: {len(chosen)} of {len(pool)} prompts ({cfg.selection}, {cfg.info_metric})")
            selected = read_jsonl(folder / "selected.jsonl")

            if not run.done(t, "evolve"):
                t1 = time.time()
                complete = make_completer(cfg, t, solver, tokenizer, creator_model, creator_tokenizer)
                evolved, stats = creator.evolve(selected, complete, depth=cfg.evolve_depth, kinds=cfg.evolve_kinds,
                                                seed=stable_seed(cfg.seed, t, "evolve"), iteration=t,
                                                verifiable=cfg.reward == "rules", pool=pool)
                evolved = drop_long_prompts(evolved, tokenizer, cfg, "evolved prompts")
                write_jsonl(folder / "evolved.jsonl", evolved)
                run.mark(t, "evolve", dict(children=len(evolved), **stats, seconds=round(time.time() - t1, 1)))
                rejected = ", ".join(f"{k} {v}" for k, v in stats["rejected"].items() if v) or "none"
                kept, written = stats["kept"], stats["written"]
                print0(f"[iter {t}] evolve: {len(selected)} parents -> {kept} children: {written} written by the "
                       f"creator ({100 * written / max(1, kept):.0f}%), {kept - written} by the in-code constraint "
                       f"step ({stats['fallback']} replacing a rejected link); {stats['candidates']} candidates for "
                       f"{stats['creator_calls']} links, rejected: {rejected}; {len(evolved)} kept under "
                       f"max_prompt_tokens ({time.time() - t1:.0f} s)")
            evolved = read_jsonl(folder / "evolved.jsonl")

            if not run.done(t, "generate"):
                t1 = time.time()
                evolved_samples = sample_and_score(solver, tokenizer, scorer, evolved, cfg, t, "generate")
                write_jsonl(folder / "evolved_samples.jsonl", evolved_samples)
                mean_reward = float(np.nanmean([as_floats(s["rewards"]) for s in evolved_samples])) if evolved else 0.0
                run.mark(t, "generate", dict(prompts=len(evolved), mean_reward=mean_reward,
                                             seconds=round(time.time() - t1, 1)))
                print0(f"[iter {t}] generate: {len(evolved)} evolved prompts x {cfg.n_samples}, mean reward "
                       f"{mean_reward:.3f} ({time.time() - t1:.0f} s)")
            evolved_samples = read_jsonl(folder / "evolved_samples.jsonl")

        if not run.done(t, "pairs"):
            total = cfg.pairs_per_iteration or None
            if t == 0 or not cfg.evolve:
                pairs = fixed_count(original_pairs, total, stable_seed(cfg.seed, t, "mix"))
            else:
                evolved_pairs = creator.make_pairs(evolved, evolved_samples, source="evolved")
                pairs = creator.mix(evolved_pairs, original_pairs, evolved_fraction=cfg.evolved_fraction,
                                    total=total, seed=stable_seed(cfg.seed, t, "mix"))
                pairs = fixed_count(pairs, total, stable_seed(cfg.seed, t, "mix"))
            write_jsonl(folder / "pairs.jsonl", pairs)
            n_evolved = sum(p["source"] == "evolved" for p in pairs)
            run.mark(t, "pairs", dict(pairs=len(pairs), evolved=n_evolved, original=len(pairs) - n_evolved))
            print0(f"[iter {t}] pairs: {len(pairs)} ({n_evolved} from evolved prompts)")
        pairs = read_jsonl(folder / "pairs.jsonl")

        t1 = time.time()
        if not pairs:
            print0(f"[iter {t}] train: no pairs (every prompt's responses tied); the solver is unchanged")
            summary = dict(pairs=0, steps=0)
        else:
            summary = train(solver, masters, tokenizer, pairs, cfg, run, t, device)
        save_solver(solver, masters, tokenizer, cfg, folder, device)
        write_jsonl(folder / "pool_next.jsonl", pool + evolved)
        run.mark(t, "train", dict(**summary, seconds=round(time.time() - t1, 1)))
        if parallel.is_main():  # the phase is done: its checkpoint (weights and optimizer state) only takes space
            for name in ("train_state.pt", "train_state.pt.tmp"):  # .tmp: a write a kill interrupted
                (folder / name).unlink(missing_ok=True)
        loss = "" if summary.get("first_loss") is None else \
            f", loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
        print0(f"[iter {t}] train: {summary['pairs']} pairs, {summary['steps']} steps{loss} ({time.time() - t1:.0f} s)")
        pool = pool + evolved

    evaluate_once(solver, tokenizer, heldout, cfg, run, "end")
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
