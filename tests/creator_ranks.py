"""Two RLOO steps of the learning creator, under torchrun or alone, for tests/test_creator_rl.py:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/creator_ranks.py MODEL_DIR OUT_FILE

Builds test_creator_rl's solver and creator on MODEL_DIR, takes two creator_rl._update steps (SGD) on its hand-made
rollouts and rewards (each rank its share of the messages) and writes the creator's weights to OUT_FILE (rank 0).
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path[0] = str(Path(__file__).resolve().parents[1])
sys.path.append(str(Path(__file__).resolve().parent))
import creator_rl  # noqa: E402
import parallel  # noqa: E402
import test_creator_rl as cases  # noqa: E402


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    parallel.init()
    cfg, m, tokenizer, learner = cases.creator_setup(source)
    with creator_rl.speaking(learner):  # SGD: the weights move by the summed gradient itself (Adam's first step is its sign)
        learner["optimizer"] = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
    learner["scheduler"] = torch.optim.lr_scheduler.LambdaLR(learner["optimizer"], lambda step: 1.0)
    for rewards in (cases.REWARDS, cases.REWARDS.flip(-1)):
        creator_rl._update(learner, cases.ASKED, cases.rollouts(tokenizer), rewards, cfg)
    if parallel.is_main():
        save_file({n: w.contiguous() for n, w in cases.weights(m, creator_rl.ADAPTER).items()}, out)
    parallel.barrier()


if __name__ == "__main__":
    main()
