"""train_eva.py with a fault injected at one of rundir.fault's named points, for the tests that kill a run or poison
a loss (tests/test_resume.py, tests/test_online.py, tests/test_distributed.py):

    python tests/faulty_run.py --kill_at T:POINT[:STEP] -- <train_eva.py flags>     # also under torchrun
    python tests/faulty_run.py --nan_at RANK:T:STEP -- <train_eva.py flags>

--kill_at: the process SIGKILLs itself at the first point named POINT in iteration T (a phase after its outputs and
before its marker; "train" or "online" after a checkpoint, at STEP when given). --nan_at: that rank's loss is NaN at
training step STEP of iteration T. It installs the hook (rundir.FAULT) and then runs train_eva.py as its own command
line does, error lines and exit codes included.
"""
import argparse
import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # as if train_eva.py were the script
import parallel  # noqa: E402
import rundir  # noqa: E402


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kill_at", default="", metavar="T:POINT[:STEP]")
    parser.add_argument("--nan_at", default="", metavar="RANK:T:STEP")
    args = parser.parse_args(argv[:cut])
    kill = args.kill_at.split(":") if args.kill_at else None
    nan = [int(x) for x in args.nan_at.split(":")] if args.nan_at else None

    def point(name: str, t: int, step: int | None) -> str | None:
        if kill and [kill[0], kill[1]] == [str(t), name] and (len(kill) == 2 or int(kill[2]) == step):
            os.kill(os.getpid(), signal.SIGKILL)
        if nan and name == "loss" and [parallel.rank(), t, step] == nan:
            return "nan"
        return None

    rundir.FAULT = point
    sys.argv = [str(ROOT / "train_eva.py"), *argv[cut + 1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
