"""--report_to: every metrics.jsonl record also goes to TensorBoard, wandb and/or trackio, on rank 0.

    python train_eva.py --preset smoke --run_dir runs/smoke --report_to tensorboard   # tensorboard --logdir runs
    python train_eva.py --report_to tensorboard,wandb,trackio                         # several at once

rundir.open_run starts the trackers, rundir.Run.log hands each record to `log`, Run.close finishes them. A record
becomes scalars named <phase>/<field> (a phase summary: estimate/mean_reward, train/last_loss, evolve/rejected/<why>)
or step/<field> (one optimizer step: step/loss, step/reward, step/kl); strings and nulls are left out, and so are
`iteration` and `step`, which place the record on the x-axis: the optimizer steps taken since the run began (see
global_step). Nothing leaves the machine unless asked: TensorBoard writes <run_dir>/tensorboard; wandb follows
WANDB_MODE when it is set, else syncs online when an API key is configured (WANDB_API_KEY or `wandb login`) and
writes offline otherwise (<run_dir>/wandb, or WANDB_DIR; `wandb sync` uploads it later); trackio writes its local
database (TRACKIO_DIR, default ~/.cache/huggingface/trackio; `trackio show` opens it). The wandb and trackio run is
named after the run folder, in project "eva" (WANDB_PROJECT wins for wandb), with the whole config; a resumed run
folder continues the same wandb run (its id is kept in <run_dir>/wandb_id) and the same trackio run.
"""
import importlib.util
import json
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

import files
import parallel

CHOICES = ("none", "tensorboard", "wandb", "trackio")
PROJECT = "eva"


def names(report_to: str) -> list[str]:
    """The trackers asked for by --report_to ("none" and repeats dropped)."""
    return [n for n in dict.fromkeys(n.strip() for n in report_to.split(",")) if n != "none"]


def check(report_to: str) -> None:
    """One line for an unknown tracker or a missing package; looks the package up without importing it."""
    for name in (n.strip() for n in report_to.split(",")):
        if name not in CHOICES:
            raise ValueError(f"--report_to {name}: choose from {', '.join(CHOICES)} (several: comma-separated)")
        if name != "none" and importlib.util.find_spec(name) is None:
            raise ValueError(f"--report_to {name}: pip install {name}")


def start(report_to: str, folder: Path, config: dict) -> dict:
    """{name: writer or run} on rank 0 ({} elsewhere, and for "none"); each library imported only when asked."""
    if not parallel.is_main():
        return {}
    trackers, run_name = {}, folder.resolve().name
    resumed = (folder / "metrics.jsonl").exists()  # the folder has logged before: continue its runs
    for name in names(report_to):
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            trackers[name] = SummaryWriter(log_dir=str(folder / "tensorboard"))
        elif name == "wandb":
            import wandb
            id_path = folder / "wandb_id"  # a new run's id, given by wandb, kept for the resumed runs
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, config=config,
                             id=id_path.read_text().strip() if id_path.exists() else None, resume="allow",
                             mode=wandb_mode(), dir=os.environ.get("WANDB_DIR", str(folder)))
            files.write_atomic(id_path, run.id + "\n")
            trackers[name] = run
        elif name == "trackio":
            import trackio
            trackers[name] = trackio.init(project=PROJECT, name=run_name, config=config,
                                          resume="allow" if resumed else "never")
    return trackers


def wandb_mode() -> str | None:
    """None (wandb reads WANDB_MODE itself) when WANDB_MODE is set; else online with an API key, else offline."""
    if os.environ.get("WANDB_MODE"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:  # `wandb login` keeps the key in ~/.netrc (or where NETRC points)
        logged_in = netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


def log(trackers: dict, record: dict, folder: Path) -> None:
    """One metrics.jsonl record to every tracker, as scalars at the record's global step."""
    if not trackers:
        return
    values = scalars(record)
    if not values:
        return
    step = global_step(record, folder)
    for name, tracker in trackers.items():
        if name == "tensorboard":
            for key, value in values.items():
                tracker.add_scalar(key, value, step)
            tracker.flush()  # a crashed run keeps what it logged, and the dashboard is never behind
        else:  # wandb and trackio runs share log(dict, step=)
            tracker.log(values, step=step)


def scalars(record: dict, prefix: str | None = None) -> dict[str, float]:
    """The record's numbers as {"<phase>/<field>": value} ("step/<field>" without a phase); nested dicts nest."""
    prefix = prefix or record.get("phase", "step")
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}/{key}"))
        elif isinstance(value, (int, float)) and key not in ("iteration", "step"):
            out[f"{prefix}/{key}"] = float(value)
    return out


def global_step(record: dict, folder: Path) -> int:
    """Optimizer steps since the run began. Online: the record's own step. Offline, where steps restart each
    iteration: the steps of the iterations before (their done_train markers) plus those of this one so far (its
    phases before training: 0; its train summary: all of them). Nothing is counted in memory, so a resumed run
    continues where it stopped."""
    if "iteration" not in record:
        return int(record.get("step", 0))
    t = record["iteration"]
    before = sum(json.loads((folder / f"iter_{i}" / "done_train").read_text())["steps"] for i in range(t))
    return before + (record["steps"] if record.get("phase") == "train" else record.get("step", 0))


def finish(trackers: dict) -> None:
    """Flush and close every tracker (the end of the run)."""
    for name, tracker in trackers.items():
        if name == "tensorboard":
            tracker.close()
        else:
            tracker.finish()
