"""The solver's weights and training state, shared by the offline update (solver.py) and the online loop (online.py):
loading the solver and full fine-tuning's fp32 masters, the optimizer and its warmup-cosine schedule, the DDP wrap,
one optimizer step, the resumable checkpoint, and saving the weights of record while the sampling model takes them.

    solver, tokenizer = load_solver(cfg, run, device);  masters = load_masters(cfg, run, device, solver)
    optimizer, scheduler = make_optimizer(params, cfg, total_steps);  policy = wrap(trained, cfg)
    state = restore_checkpoint(path, trained, optimizer, scheduler, where)   # None: start from step 0
    ... backward, clip ...;  optimizer_step(optimizer, scheduler)
    save_checkpoint(path, trained, optimizer, scheduler, step, **extra)      # a loop's own state in `extra`
    save_solver(solver, masters, tokenizer, cfg, folder, device)
"""
from __future__ import annotations

import math
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

import files
import model
import parallel
import rundir
from config import Config
from parallel import print0


# ------------------------------------------------------------------------------------------------- load
def uses_fsdp(cfg: Config) -> bool:
    return cfg.fsdp and not cfg.lora and parallel.world_size() > 1


def solver_source(cfg: Config, run: rundir.Run) -> tuple[int | None, str]:
    """(last finished iteration or None, the model folder or id full fine-tuning resumes from)."""
    last = max((t for t in range(cfg.eva_iterations + 1) if run.done(t, "train")), default=None)
    if last is not None and not cfg.lora:
        return last, str(run.folder / f"iter_{last}" / "model")
    return last, cfg.model


def load_solver(cfg: Config, run: rundir.Run, device):
    """The sampling model as the last finished iteration left it (or fresh), with its LoRA adapter trainable."""
    last, source = solver_source(cfg, run)
    solver, tokenizer = model.load_model(source, device=device, load_in_4bit=cfg.load_in_4bit)
    if cfg.lora:
        # A resumed adapter gets the same preparation as a fresh one (4-bit casts, gradient checkpointing).
        adapter = run.folder / f"iter_{last}" / "adapter" if last is not None else None
        torch.manual_seed(cfg.seed)  # the LoRA A matrices are random: the same on every rank
        solver = model.add_lora(solver, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                gradient_checkpointing=cfg.gradient_checkpointing, adapter=adapter)
    solver.eval()
    return solver, tokenizer


def load_masters(cfg: Config, run: rundir.Run, device, solver):
    """Full fine-tuning's weights of record: fp32 masters that the optimizer steps (a step at a full fine-tuning
    learning rate vanishes in bf16 rounding), kept across iterations, written by save_solver and read back on resume;
    compute runs under bf16 autocast on a GPU. LoRA has none (peft keeps adapter weights in fp32): None.

    One process or DDP: the fp32 solver itself (on the CPU), else an fp32 model beside the bf16 sampling copy.
    --fsdp: fp32 shards (load_sharded).
    """
    if cfg.lora:
        return None
    source = solver_source(cfg, run)[1]
    if uses_fsdp(cfg):
        return load_sharded(source, device, torch.float32, cfg.gradient_checkpointing)
    if any(p.dtype != torch.float32 for p in solver.parameters()):
        masters, _ = model.load_model(source, device=device, dtype=torch.float32)
    else:
        masters = solver
    if cfg.gradient_checkpointing:
        masters.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return masters


def load_sharded(source: str, device, dtype: torch.dtype, checkpointing: bool = False):
    """FSDP2 shards of the model at `source` in `dtype`: made on the meta device with the attention kernel chosen for
    `device`, sharded empty, then filled by rank 0, which alone reads the weights (one host copy, not one per rank)."""
    sharded = model.empty_model(source, device, dtype)
    if checkpointing:
        sharded.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    parallel.fsdp_shard(sharded, device).to_empty(device=device)
    parallel.fsdp_fill(sharded, model.load_model(source, device="cpu", dtype=dtype)[0] if parallel.is_main() else None)
    return sharded


# ------------------------------------------------------------------------------------------------- optimize
def lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warmup then cosine decay to zero, as a multiplier of --lr."""
    warmup = max(1, round(cfg.warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params: list, cfg: Config, total_steps: int):
    """(--optimizer over params, its warmup-cosine scheduler over total_steps optimizer steps)."""
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.RMSprop(params, lr=cfg.lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total_steps, cfg))


def wrap(trained, cfg: Config):
    """What the training forward runs: DDP around the trained weights under torchrun (FSDP2 shards are their own)."""
    ddp = parallel.world_size() > 1 and not uses_fsdp(cfg)
    return torch.nn.parallel.DistributedDataParallel(trained) if ddp else trained


def accumulating(policy, last: bool):
    """The context of one micro batch's forward: DDP all-reduces gradients on the last micro batch only (its flag is
    read in forward); FSDP reduce-scatters every one, since unsharded gradients would cost the memory it saves."""
    ddp = isinstance(policy, torch.nn.parallel.DistributedDataParallel)
    return policy.no_sync() if ddp and not last else nullcontext()


def autocast(device):
    """bf16 autocast on a GPU (the weights stay fp32 masters or fp32 adapters); nothing on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def optimizer_step(optimizer, scheduler) -> None:
    """One optimizer step on the accumulated (and clipped) gradients, the schedule advanced, the gradients freed."""
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    """This process's torch RNG state (CPU, and the current CUDA device when there is one)."""
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: Path, trained, optimizer, scheduler, step: int, **extra) -> None:
    """Trainable weights, optimizer, scheduler, step, every rank's RNG state (each draws its own dropout masks) and
    `extra` (a loop's own state), gathered for rank 0 to write atomically. FSDP2 shards: each rank writes its own
    weights and optimizer state (torch.distributed.checkpoint) to a folder beside `path`, which names it. Collective."""
    rng = parallel.sharded(lambda mine: [rng_state() for _ in mine], list(range(parallel.world_size())),
                           desc="rng state")
    shards = f"{path.name}.step{step}" if parallel.is_sharded(trained) else None
    if shards:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        weights, optim = get_state_dict(trained, optimizer)
        dcp.save(dict(model=weights, optimizer=optim), checkpoint_id=path.parent / shards)
    if parallel.is_main():
        weights = None if shards else {n: p.detach().cpu() for n, p in trained.named_parameters() if p.requires_grad}
        files.write_atomic(path, dict(weights=weights, optimizer=None if shards else optimizer.state_dict(),
                                      shards=shards, scheduler=scheduler.state_dict(), step=step, rng=rng, **extra))
        for old in path.parent.glob(f"{path.name}.step*"):  # after the write that stops naming them
            if old.name != shards:
                shutil.rmtree(old)
    parallel.barrier()


@torch.no_grad()
def restore_checkpoint(path: Path, trained, optimizer, scheduler, where: str) -> dict | None:
    """Load a save_checkpoint file into the trainable weights, optimizer, scheduler and this rank's RNG; the whole
    state (its "step" and the loop's extras), or None without a checkpoint. `where` labels the log line."""
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if state.get("shards"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        weights, optim = get_state_dict(trained, optimizer)
        loaded = dict(model=weights, optimizer=optim)
        dcp.load(loaded, checkpoint_id=path.parent / state["shards"])
        set_state_dict(trained, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    else:
        trainable = {n: p for n, p in trained.named_parameters() if p.requires_grad}
        for name, value in state["weights"].items():
            trainable[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if len(state.get("rng") or []) == parallel.world_size():
        set_rng_state(state["rng"][parallel.rank()])
    else:
        print0(f"{where}: the checkpoint holds no RNG state for {parallel.world_size()} ranks; dropout draws will "
               f"differ from an uninterrupted run")
    return state


# ------------------------------------------------------------------------------------------------- save
@torch.no_grad()
def copy_weights(source, target) -> None:
    """target's parameters take source's values (fp32 masters, FSDP2 shards gathered, into the sampling model, rounded
    to its dtype). Collective under --fsdp."""
    if source is target:
        return
    targets = dict(target.named_parameters())
    for name, param in parallel.full_parameters(source):
        targets[name].copy_(param)


@torch.no_grad()
def save_solver(solver, masters, tokenizer, cfg: Config, folder: Path, device) -> None:
    """Write the weights of record to folder/adapter (LoRA) or folder/model (full fine-tuning's fp32 masters) and
    make the sampling model equal to them again, on every rank."""
    if cfg.lora or masters is solver:
        if parallel.is_main():
            if cfg.lora:
                model.save_adapter(solver, folder / "adapter", cfg.model)
            else:
                model.save_full(solver, tokenizer, folder / "model")
    elif uses_fsdp(cfg):
        # One parameter at a time: every rank all-gathers it into its sampling copy (back on `device`, rounded to
        # the sampling dtype) and rank 0 streams its fp32 value into safetensors shards.
        targets = dict(solver.to(device).named_parameters())

        def gathered():
            for name, full in parallel.full_parameters(masters):
                targets[name].copy_(full)
                yield name, full
        if parallel.is_main():
            model.save_streamed(gathered(), solver, tokenizer, folder / "model")
        else:
            for _ in gathered():
                pass
    else:  # a bf16 sampling copy of fp32 masters (one process or DDP on a GPU)
        if parallel.is_main():
            model.save_full(masters, tokenizer, folder / "model")
        copy_weights(masters, solver)
    parallel.barrier()
