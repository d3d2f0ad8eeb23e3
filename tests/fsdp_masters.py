"""FSDP2 masters loaded and saved under torchrun, for tests/test_distributed.py:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_masters.py MODEL_DIR OUT_DIR

Loads the fp32 masters of MODEL_DIR as `--no-lora --fsdp` does (trainstate.load_masters), counts every
model.load_model call on each rank, compares the gathered masters with MODEL_DIR's weights, adds 1 to every master
weight and saves them (trainstate.save_solver) to OUT_DIR/saved/model in shards of 1 MB. Each rank writes
OUT_DIR/rank<r>.json: its load_model calls, whether the masters equal the checkpoint, their attention kernel.
"""
import functools
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path[0] = str(Path(__file__).resolve().parents[1])
import config  # noqa: E402
import model  # noqa: E402
import parallel  # noqa: E402
import rundir  # noqa: E402
import trainstate  # noqa: E402


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    parallel.init()
    device = torch.device("cpu")
    cfg = config.Config(model=str(source), lora=False, fsdp=True, run_dir=str(out / "run"))
    solver, tokenizer = model.load_model(str(source))  # the sampling copy, as load_solver makes it on every rank
    calls, load = [], model.load_model
    model.load_model = lambda spec, **kw: calls.append(str(spec)) or load(spec, **kw)
    masters = trainstate.load_masters(cfg, rundir.Run(out / "run"), device, solver)
    on_disk = load_file(source / "model.safetensors")
    equal = all(torch.equal(full, on_disk[name]) for name, full in parallel.full_parameters(masters))
    with torch.no_grad():
        for param in masters.parameters():
            param.to_local().add_(1.0)
    model.save_streamed = functools.partial(model.save_streamed, max_shard_bytes=1_000_000)  # several shards
    trainstate.save_solver(solver, masters, tokenizer, cfg, out / "saved", device)
    sampler_moved = all(torch.equal(p, on_disk[n] + 1) for n, p in solver.named_parameters())
    record = dict(calls=calls, equal=equal, sampler_moved=sampler_moved,
                  attention=masters.config._attn_implementation,
                  expected_attention=model.attention_implementation(masters.config, device))
    (out / f"rank{parallel.rank()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
