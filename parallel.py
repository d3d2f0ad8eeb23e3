"""torch.distributed for eva: who am I, how many are we, split-a-list-then-gather-it, FSDP2 shard/gather, and a
batch retried at half size after out-of-memory (each rank on its own).

Every phase of eva (sampling, reward scoring, the creator's rewrites) is "do something to each item of a list".
Under torchrun each rank takes the strided shard items[rank::world], and the results are gathered back to every
rank in the original order, so the code after a sharded call is the same on all ranks. Without torchrun
(plain `python`), world size is 1 and everything here is a no-op.

    import parallel
    parallel.init()                                  # reads torchrun's environment; gloo on CPU, nccl on GPU
    rewards = parallel.sharded(score_fn, responses)  # every rank gets the full list back
"""
import os
import sys
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


def init() -> torch.device:
    """Join the process group when launched by torchrun; return this process's device."""
    use_cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        # Generation can keep a rank busy for a long time between collectives: be patient.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=2))
    if use_cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def stable_seed(*parts) -> int:
    """A seed from any parts (seed, iteration, phase, prompt id) that is the same on every rank and every run."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj):
    """Rank 0's copy of a picklable object, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank: one all-reduce of one number."""
    if not dist.is_initialized():
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    box = torch.tensor([float(bool(flag))], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def sharded(fn, items: list, desc: str | None = None) -> list:
    """fn(items[rank::world]) on each rank, results gathered to every rank in the original order.

    fn takes a list and returns one result per item. `desc` only labels the log line.
    """
    items = list(items)
    world, me = world_size(), rank()
    local = items[me::world]
    local_out = list(fn(local)) if local else []
    assert len(local_out) == len(local), f"{desc or fn}: returned {len(local_out)} results for {len(local)} items"
    if world == 1:
        return local_out
    gathered = [None] * world
    dist.all_gather_object(gathered, local_out)
    out = [None] * len(items)
    for r, part in enumerate(gathered):
        out[r::world] = part
    return out


def progress(iterable=None, **kwargs):
    """tqdm on rank 0 only, so eight ranks do not draw eight bars."""
    return tqdm(iterable, disable=not is_main() or kwargs.pop("disable", False), dynamic_ncols=True, **kwargs)


def fsdp_shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard `model` in place over the ranks with FSDP2 (each decoder layer, then the root) and return it; on a GPU
    it computes in bf16 and reduces gradients in fp32. `model` is made on the meta device (model.empty_model): the
    caller then materialises the shards (`to_empty`) and fills them (fsdp_fill). Hugging Face models name their
    decoder layer class in `_no_split_modules`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    assert dist.is_initialized(), "fsdp_shard needs torchrun (a process group)"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_names]
    assert layers, f"fsdp_shard: no decoder layers ({sorted(layer_names)}) found in {type(model).__name__}"
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 shards `model`'s parameters (DTensors)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def fsdp_fill(sharded: torch.nn.Module, full: torch.nn.Module | None) -> None:
    """Fill an FSDP2-sharded model (made on the meta device, then `to_empty`) from `full`, which rank 0 alone holds
    (None elsewhere): each parameter is scattered from rank 0 one at a time, each buffer broadcast. Collective."""
    from torch.distributed.tensor import distribute_tensor
    params = dict(full.named_parameters()) if is_main() else {}
    for name, param in sharded.named_parameters():
        value = params[name].detach().to(param.device, param.dtype) if is_main() else \
            torch.empty(param.shape, dtype=param.dtype, device=param.device)
        shard = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=0)  # scattered from 0
        param.to_local().copy_(shard.to_local())
    buffers = dict(full.named_buffers()) if is_main() else {}
    for name, buffer in sharded.named_buffers():  # rotary tables and the like: not in a checkpoint, not on meta
        if is_main():
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)


@torch.no_grad()
def full_parameters(model: torch.nn.Module):
    """(name, whole tensor) of a model's parameters; those FSDP2 shards are all-gathered one at a time on every rank,
    so the whole model never exists twice (collective then: every rank runs the generator to its end)."""
    from torch.distributed.tensor import DTensor
    for name, param in model.named_parameters():
        yield name, param.full_tensor() if isinstance(param, DTensor) else param


def is_out_of_memory(err: BaseException) -> bool:
    """An accelerator out-of-memory error, whichever class the backend raised it as."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                             and "out of memory" in str(err).lower())


def halve_on_oom(fn, batch_size: int, what: str):
    """fn(batch_size); after an out-of-memory error, free the cache and retry with half the batch, down to 1.

    Only for work whose results do not depend on the batch size (sample() seeds every prompt on its own), so
    a retry changes the speed and nothing else. Out of memory with a batch of 1 stops the run with one line. Local
    to this rank: the collectives of sharded() come after fn, so the other ranks simply wait.
    """
    while True:
        try:
            return fn(batch_size)
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            message = (str(err).strip().splitlines() or [type(err).__name__])[0]
        # Out of the except block, so the traceback's frames (and the tensors they hold) are freed first.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if batch_size <= 1:
            raise SystemExit(f"error: {what}: out of memory even with a batch of 1 ({message}); lower "
                             f"--max_new_tokens or --max_prompt_tokens, or use a larger device")
        batch_size //= 2
        print(f"[rank {rank()}] {what}: out of memory ({message}); retrying with batch size {batch_size}",
              file=sys.stderr, flush=True)
