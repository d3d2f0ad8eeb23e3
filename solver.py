"""The solver update: one pass of preference optimisation on an iteration's pairs, resumable mid-phase. train_eva.py
calls train in every iteration (trainstate.py loads and saves the solver, and holds the optimizer and checkpoint).

    encode_pair -> collate -> forward_logps -> losses.preference_loss -> backward -> clip -> step
"""
from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import numpy as np
import torch

import files
import generate
import losses
import model
import parallel
import rundir
import trainstate
from config import Config
from parallel import print0



# ------------------------------------------------------------------------------------------------- batches
def encode_response(tokenizer, text: str, finish: str, cfg: Config, end_id: int) -> list[int]:
    """A response's token ids. One the model ended itself gets the chat template's end-of-turn token `end_id`
    (model.turn_end_id), so the model also learns where an answer stops. One cut at --max_new_tokens (finish
    "length", or longer than that after re-tokenisation) gets none: it must not learn to stop where the cap fell."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ids[:cfg.max_new_tokens] if finish == "length" or len(ids) > cfg.max_new_tokens else ids + [end_id]


def encode_pair(tokenizer, pair: dict, cfg: Config, end_id: int) -> dict:
    """Token ids of prompt, chosen and rejected, tokenised separately (joining strings merges boundary tokens)."""
    prompt = generate.encode_prompt(tokenizer, pair["prompt"])[-cfg.max_prompt_tokens:]
    # a pair without finish fields (its samples did not say how each response ended) counts its responses as ended
    return dict(prompt=prompt,
                chosen=encode_response(tokenizer, pair["chosen"], pair.get("chosen_finish", "stop"), cfg, end_id),
                rejected=encode_response(tokenizer, pair["rejected"], pair.get("rejected_finish", "stop"), cfg,
                                         end_id))


def pack(rows: list[tuple[list[int], list[int]]], device) -> dict:
    """(prompt ids, response ids) rows packed end to end into one row without padding, for one forward of all:
    input_ids, position_ids [1, N] (restarting at 0 per sequence), segments: (start, end) of each sequence; for each
    of the K response tokens, keep [K] the position whose logits predict it, target [K] its id, row [K] its sequence
    and col [K] its index in the response."""
    ids, positions, segments, keep, row, col = [], [], [], [], [], []
    for i, (prompt, response) in enumerate(rows):
        start, first = len(ids), max(len(prompt), 1)  # nothing predicts a sequence's first token
        ids += prompt + response
        positions += range(len(prompt) + len(response))
        segments.append((start, len(ids)))
        keep += range(start + first - 1, len(ids) - 1)
        row += [i] * (len(ids) - start - first)
        col += range(first - len(prompt), len(response))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    input_ids = as_tensor(ids)[None]  # [1, N]
    keep = as_tensor(keep)  # [K]
    return dict(input_ids=input_ids, position_ids=as_tensor(positions)[None], segments=segments, keep=keep,
                target=input_ids[0, keep + 1], row=as_tensor(row), col=as_tensor(col), rows=len(rows))


def collate(encoded: list[dict], device) -> dict:
    """A micro-batch of encoded pairs packed into one row: chosen sequence i is row i, rejected i is row B + i."""
    return pack([(e["prompt"], e["chosen"]) for e in encoded] + [(e["prompt"], e["rejected"]) for e in encoded],
                device)


def packed_token_logps(policy, batch: dict, cfg: Config) -> torch.Tensor:
    """[K] log-probs of the response tokens of a packed batch: one forward, each sequence attending only to itself,
    the LM head applied only where a response token is predicted. Call it inside model.packed_training(policy),
    which also covers the backward."""
    logits = policy(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=batch["keep"],
                    eva_segments=batch["segments"], use_cache=False).logits[0]  # [K, V]
    return losses.target_logps(logits, batch["target"], cfg.vocab_chunk or None)


def collate_responses(rows: list[tuple[list[int], list[int]]], device) -> dict:
    """(prompt ids, response ids) rows packed into one row (pack), plus response_mask [B, R]: which of the
    R = longest-response columns hold a response token. For the RL losses (online.py, creator_rl.py)."""
    batch = pack(rows, device)
    mask = torch.zeros((len(rows), max(len(r) for _, r in rows)), dtype=torch.bool, device=device)  # [B, R]
    mask[batch["row"], batch["col"]] = True
    return dict(batch, response_mask=mask)


def response_logps(model_, batch: dict, cfg) -> torch.Tensor:
    """[B, R] log-probs of each row's response tokens (0 past its end) under model_, from one packed forward; call it
    inside model.packed_training."""
    flat = packed_token_logps(model_, batch, cfg)  # [K]
    return flat.new_zeros(batch["response_mask"].shape).index_put((batch["row"], batch["col"]), flat)


def forward_logps(policy, batch: dict, cfg: Config) -> tuple[losses.SeqLogps, losses.SeqLogps]:
    """Per-sequence log-probs of the chosen and rejected halves of a collated batch (see packed_token_logps)."""
    logps = losses.packed_sequence_logps(packed_token_logps(policy, batch, cfg), batch["row"], batch["rows"])
    half = batch["rows"] // 2
    split = lambda s, part: losses.SeqLogps(*(getattr(s, k)[part] for k in ("sum", "count", "avg")))
    return split(logps, slice(0, half)), split(logps, slice(half, None))


@torch.no_grad()
def reference_logps(solver, encoded: list[dict], cfg: Config, device) -> torch.Tensor:
    """[P, 6] log-probs of every pair under the iteration's starting policy (chosen/rejected sum, count, avg)."""
    solver.eval()

    def work(indices: list[int]) -> list[list[float]]:
        out = []
        with model.packed_training(solver):
            for s in range(0, len(indices), cfg.micro_batch_size):
                batch = collate([encoded[i] for i in indices[s:s + cfg.micro_batch_size]], device)
                chosen, rejected = forward_logps(solver, batch, cfg)
                out += torch.stack([chosen.sum, chosen.count, chosen.avg, rejected.sum, rejected.count,
                                    rejected.avg], 1).tolist()
        return out

    return torch.tensor(parallel.sharded(work, list(range(len(encoded))), desc="reference"), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- the update
def train(solver, masters, tokenizer, pairs: list[dict], cfg: Config, run: rundir.Run, t: int, device) -> dict:
    """One solver update on the iteration's pairs; resumable from the last checkpoint inside the phase.

    LoRA steps the adapter inside `solver`; full fine-tuning steps the fp32 `masters` (trainstate.load_masters),
    and trainstate.save_solver then refreshes the sampling model from them. The reference is `solver` as the phase
    starts."""
    folder = run.iter_dir(t)
    end_id = model.turn_end_id(tokenizer)
    encoded = [encode_pair(tokenizer, p, cfg, end_id) for p in pairs]
    ref = starting_reference(solver, encoded, cfg, folder / "reference_logps.pt", device)
    p_chosen = torch.tensor([p["p_chosen"] for p in pairs], dtype=torch.float32)
    p_rejected = torch.tensor([p["p_rejected"] for p in pairs], dtype=torch.float32)
    trained = solver if masters is None else masters
    if trainstate.uses_fsdp(cfg) and device.type == "cuda":
        solver.to("cpu")  # out of the GPU's way while the shards train; save_solver brings it back
    params = [p for p in trained.parameters() if p.requires_grad]
    total_steps = math.ceil(len(pairs) / cfg.batch_size) * cfg.epochs
    optimizer, scheduler = trainstate.make_optimizer(params, cfg, total_steps)
    # Dropout is the one user of torch's global RNG: seeded per phase here, and restored from a checkpoint, so
    # neither an earlier iteration nor a restart changes the draws.
    torch.manual_seed(parallel.stable_seed(cfg.seed, t, "train"))
    start_step = resume(folder, trained, optimizer, scheduler, cfg, t, total_steps)
    run.forget(lambda r: r.get("iteration") == t and "phase" not in r and r.get("step", 0) > start_step)
    policy = trainstate.wrap(trained, cfg)
    settings = loss_settings(cfg)
    world, per_rank = parallel.world_size(), cfg.batch_size // parallel.world_size()
    policy.train()
    stats = []
    bar = parallel.progress(range(start_step, total_steps), desc=f"iter {t} train", initial=start_step,
                            total=total_steps)
    with model.packed_training(policy):  # the packed forward, for forward and (checkpointed) backward alike
        for step in bar:
            local_ids = batch_ids(step, len(pairs), cfg, t)
            step_loss, step_chosen, step_rejected = [], [], []
            for s in range(0, per_rank, cfg.micro_batch_size):
                ids = local_ids[s:s + cfg.micro_batch_size]
                batch = collate([encoded[i] for i in ids], device)
                last = s + cfg.micro_batch_size >= per_rank
                with trainstate.accumulating(policy, last), trainstate.autocast(device):
                    chosen, rejected = forward_logps(policy, batch, cfg)
                ref_chosen, ref_rejected = reference_of(ref, ids, device)
                loss, chosen_reward, rejected_reward = losses.preference_loss(
                    cfg.loss, chosen, rejected, ref_chosen, ref_rejected, p_chosen=p_chosen[ids].to(device),
                    p_rejected=p_rejected[ids].to(device), **settings)
                if rundir.fault("loss", t, step + 1) == "nan":  # test hook
                    loss = loss * math.nan
                stop_if_nonfinite(loss, f"the {cfg.loss} loss", ids, pairs, folder, t, step + 1)
                # sum over the global batch / batch size; DDP averages over ranks, hence the * world
                (loss.sum() * world / cfg.batch_size).backward()
                step_loss += loss.detach().tolist()
                step_chosen += chosen_reward.tolist()
                step_rejected += rejected_reward.tolist()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            stop_if_nonfinite(grad_norm, "the gradient norm", local_ids, pairs, folder, t, step + 1)
            trainstate.optimizer_step(optimizer, scheduler)
            record = step_record(t, step + 1, step_loss, step_chosen, step_rejected, grad_norm, scheduler)
            stats.append(record)
            run.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
            if (step + 1) % cfg.save_every == 0 and step + 1 < total_steps and not trainstate.uses_fsdp(cfg):
                trainstate.save_checkpoint(folder / "train_state.pt", trained, optimizer, scheduler, step + 1)
                rundir.fault("train", t, step + 1)  # test hook
    del policy, params, optimizer, scheduler
    gc.collect()  # FSDP's hooks form reference cycles: free the optimizer state now
    trained.eval()
    solver.eval()
    return dict(pairs=len(pairs), steps=total_steps,
                first_loss=stats[0]["loss"] if stats else None, last_loss=stats[-1]["loss"] if stats else None)


def loss_settings(cfg: Config) -> dict:
    """The --loss's hyperparameters from the flags (losses.LOSSES names them; --beta < 0 keeps the loss's own)."""
    flags = dict(beta=None if cfg.beta < 0 else cfg.beta, gamma_beta_ratio=cfg.gamma_beta_ratio, lam=cfg.orpo_lambda)
    return {k: v for k, v in flags.items() if k in losses.LOSSES[cfg.loss].hyper}


def starting_reference(solver, encoded: list[dict], cfg: Config, path: Path, device) -> torch.Tensor | None:
    """reference_logps once per iteration, before the first step, from the starting policy (kept in `path` for a
    resumed phase); None when the loss needs no reference."""
    if not losses.LOSSES[cfg.loss].needs_reference:
        return None
    if path.exists():
        return torch.load(path)
    with trainstate.autocast(device):
        ref = reference_logps(solver, encoded, cfg, device)
    if parallel.is_main():
        files.write_atomic(path, ref)
    return ref


def reference_of(ref: torch.Tensor | None, ids, device) -> tuple[losses.SeqLogps | None, losses.SeqLogps | None]:
    """The reference SeqLogps of chosen and rejected for pairs `ids` (None, None without a reference)."""
    if ref is None:
        return None, None
    r = ref[torch.as_tensor(ids)].to(device)  # [b, 6]
    return losses.SeqLogps(*r[:, 0:3].T), losses.SeqLogps(*r[:, 3:6].T)


def batch_ids(step: int, n_pairs: int, cfg: Config, t: int) -> np.ndarray:
    """This rank's pair indices at optimizer step `step`. The data order of every epoch is fixed by the seed, so a
    resumed run sees the same batches; the last batch of an epoch wraps around to stay full."""
    steps_per_epoch = math.ceil(n_pairs / cfg.batch_size)
    epoch, k = divmod(step, steps_per_epoch)
    order = np.random.default_rng(parallel.stable_seed(cfg.seed, t, "order", epoch)).permutation(n_pairs)
    ids = np.resize(order, steps_per_epoch * cfg.batch_size)[k * cfg.batch_size:(k + 1) * cfg.batch_size]
    per_rank = cfg.batch_size // parallel.world_size()
    return ids[parallel.rank() * per_rank:(parallel.rank() + 1) * per_rank]


def step_record(t: int, step: int, step_loss: list, step_chosen: list, step_rejected: list, grad_norm,
                scheduler) -> dict:
    """The metrics.jsonl line of one optimizer step, over the global batch (collective under torchrun)."""
    world = parallel.world_size()
    if world > 1:  # log the global batch, not rank 0's share of it
        parts = parallel.sharded(lambda mine: [(step_loss, step_chosen, step_rejected) for _ in mine],
                                 list(range(world)), desc="step stats")
        step_loss, step_chosen, step_rejected = ([x for part in parts for x in part[k]] for k in range(3))
    margins = np.array(step_chosen) - np.array(step_rejected)
    return dict(iteration=t, step=step, loss=float(np.mean(step_loss)), margin=float(margins.mean()),
                accuracy=float((margins > 0).mean()), grad_norm=float(grad_norm), lr=scheduler.get_last_lr()[0])


# ------------------------------------------------------------------------------------------------- checkpoints
def resume(folder: Path, trained, optimizer, scheduler, cfg: Config, t: int, total_steps: int) -> int:
    """The step to resume the phase at: that of train_state.pt, loaded into the weights, optimizer, scheduler and
    RNG (trainstate.restore_checkpoint), or 0. --fsdp writes no mid-phase checkpoint: a killed phase starts over."""
    if trainstate.uses_fsdp(cfg):
        return 0
    state = trainstate.restore_checkpoint(folder / "train_state.pt", trained, optimizer, scheduler,
                                          f"[iter {t}] train")
    if state is None:
        return 0
    print0(f"[iter {t}] train: resuming at step {state['step']}/{total_steps}")
    return state["step"]


def drop_checkpoint(folder: Path) -> None:
    """The phase is done: its checkpoint (weights and optimizer state) only takes space."""
    if parallel.is_main():
        for name in ("train_state.pt", "train_state.pt.tmp"):  # .tmp: a write a kill interrupted
            (folder / name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- non-finite stops
def stop_if_nonfinite(value: torch.Tensor, what: str, ids, pairs: list[dict], folder: Path, t: int, step: int) -> None:
    """Decided together (one all-reduce of a flag), so no rank waits for another that stopped."""
    nonfinite = not torch.isfinite(value).all()
    if parallel.any_rank(nonfinite):
        stop_nonfinite(folder, t, step, what, ids if nonfinite else [], pairs)


def stop_nonfinite(folder: Path, t: int, step: int, what: str, pair_ids, pairs: list[dict]) -> None:
    """Write the offending batch and stop the run: a NaN or inf never reaches the weights or a checkpoint.

    Collective: every rank calls it once any rank found a non-finite value (parallel.any_rank), with the pairs it
    found it in (none on a rank whose values were finite), and every rank stops with the same message."""
    found = parallel.sharded(lambda mine: [[int(i) for i in pair_ids] for _ in mine],
                             list(range(parallel.world_size())), desc="non-finite pairs")  # [rank][pair]
    indices = [i for ids in found for i in ids]
    bad = dict(iteration=t, step=step, ranks=[r for r, ids in enumerate(found) if ids], what=what,
               pair_indices=indices, prompt_ids=[pairs[i]["prompt_id"] for i in indices])
    path, ckpt_path = folder / "nonfinite_batch.json", folder / "train_state.pt"
    if parallel.is_main():
        files.write_atomic(path, json.dumps(bad) + "\n")
    kept = (f"the last good checkpoint ({ckpt_path}) is kept and a rerun resumes from it" if ckpt_path.exists() else
            "no checkpoint yet: a rerun restarts the phase from the iteration's starting solver")
    ids = ", ".join(bad["prompt_ids"][:8]) + (" ..." if len(bad["prompt_ids"]) > 8 else "")
    raise SystemExit(f"error: iteration {t} step {step}: {what} is not finite (pairs of prompts {ids}); no update "
                     f"made; {kept}; the batch is in {path}")
