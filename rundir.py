"""The run folder of train_eva.py: config.json, iter_<t>/ with each phase's outputs and its `done_<phase>` marker,
metrics.jsonl. open_run creates it or resumes it; Run answers "is this phase done?" and writes on rank 0.
Run.log also hands each metrics.jsonl record to the trackers of --report_to (tracking.py); Run.close ends them.

    run = rundir.open_run(cfg)       # refuses a folder started with another config
    if not run.done(t, "estimate"): ...; run.write_jsonl(path, records); run.mark(t, "estimate", summary)
    run.close()                      # at the end of the run: the trackers flushed and finished
"""
import dataclasses
import json
from pathlib import Path

import files
import parallel
import tracking
from parallel import print0


class Run:
    """The run folder: iter_<t>/ subfolders, phase markers, metrics.jsonl (and its trackers, tracking.start's)."""

    def __init__(self, folder: Path, trackers: dict | None = None):
        self.folder = folder
        self.trackers = trackers or {}

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
        fault(phase, t)  # test hook: outputs written, marker not yet
        self.write(self.iter_dir(t) / f"done_{phase}", json.dumps(summary) + "\n")
        self.log({"iteration": t, "phase": phase, **summary})
        parallel.barrier()

    def log(self, record: dict) -> None:
        if parallel.is_main():
            with open(self.folder / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            tracking.log(self.trackers, record, self.folder)

    def forget(self, stale) -> None:
        """Drop the metrics.jsonl records for which stale(record) is true, and any line a kill tore: on a resume,
        those the killed run logged after the checkpoint it resumes from, which the resumed run logs again. (A
        tracker keeps what it was sent.)"""
        path = self.folder / "metrics.jsonl"
        if not parallel.is_main() or not path.exists():
            return
        lines, kept = path.read_text().splitlines(), []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # a line a kill tore
                continue
            if not stale(record):
                kept.append(line)
        if len(kept) < len(lines):
            files.write_atomic(path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        """The end of the run: every tracker flushed and finished."""
        tracking.finish(self.trackers)
        self.trackers = {}

    def write(self, path: Path, content) -> None:
        """files.write_atomic on rank 0 (every rank holds the same content)."""
        if parallel.is_main():
            files.write_atomic(path, content)

    def write_jsonl(self, path: Path, records: list[dict]) -> None:
        if parallel.is_main():
            files.write_jsonl(path, records)


def open_run(cfg) -> Run:
    """Create the run folder, or resume it when the config (a dataclass) matches the saved one."""
    folder = Path(cfg.run_dir)
    saved_path = folder / "config.json"
    current = dataclasses.asdict(cfg)
    started = any(folder.glob("iter_*/done_*")) or (folder / "eval_start.json").exists()
    if saved_path.is_file() and started:  # before any finished work, a corrected command simply starts over
        saved = json.loads(saved_path.read_text())
        ignore = {"allow_config_change", "run_dir", "report_to"}  # where the folder lives, who watches: no settings
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
    run = Run(folder, tracking.start(cfg.report_to, folder, current))
    run.write(saved_path, json.dumps(current, indent=1) + "\n")
    return run


# Tests only: tests/faulty_run.py installs a callable point(name, t, step) -> None or an action, to kill a run or
# poison a loss at a named point; None in every real run, where fault() does nothing.
FAULT = None


def fault(name: str, t: int, step: int | None = None) -> str | None:
    """A point where a test may inject a fault: Run.mark calls it with the phase's name after its outputs are written
    and before its marker; solver.train ("train") and online.train ("online", t = 0) after each checkpoint, with its
    step; solver.train at each micro batch's loss ("loss": the action "nan" makes that loss NaN)."""
    return FAULT(name, t, step) if FAULT is not None else None
