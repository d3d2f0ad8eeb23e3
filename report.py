"""The end-of-run report: a table per iteration, held-out accuracy at the start and end, a plot, example chains.

    python report.py runs/demo          # (re)writes runs/demo/report.md and runs/demo/report.png

It only reads what train_eva.py wrote to the run folder (metrics.jsonl, iter_<t>/*.jsonl, eval_*.json).
"""
import json
import sys
from pathlib import Path

import numpy as np


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _phase(folder: Path, phase: str) -> dict:
    marker = folder / f"done_{phase}"
    return json.loads(marker.read_text()) if marker.exists() else {}


def iteration_rows(run: Path) -> list[dict]:
    rows = []
    for t in range(1000):
        folder = run / f"iter_{t}"
        if not folder.is_dir():
            break
        estimate, train, pairs = _phase(folder, "estimate"), _phase(folder, "train"), _phase(folder, "pairs")
        evolve = _phase(folder, "evolve")
        rows.append(dict(iteration=t, pool=len(_jsonl(folder / "pool.jsonl")), mean_reward=estimate.get("mean_reward"),
                         informative=estimate.get("informative"), evolved=evolve.get("children", 0),
                         pairs=pairs.get("pairs"), evolved_pairs=pairs.get("evolved"),
                         first_loss=train.get("first_loss"), last_loss=train.get("last_loss")))
    return rows


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def evolution_section(run: Path) -> str:
    """How the pool grew (per method, per iteration), informativeness before and after, a few example chains."""
    import creator
    final_pool = []
    for t in range(1000):
        folder = run / f"iter_{t}"
        if not folder.is_dir():
            break
        final_pool = _jsonl(folder / "pool_next.jsonl") or _jsonl(folder / "pool.jsonl") + _jsonl(
            folder / "evolved.jsonl")
    lineage = creator.report_lineage(final_pool)
    if not lineage["evolved"]:
        return ""
    text = ["", "## How the pool grew", "",
            f"{lineage['original']} seed prompts + {lineage['evolved']} evolved = {lineage['pool']}.", "",
            "| iteration | " + " | ".join(sorted(lineage["per_method"])) + " |",
            "|---|" + "---|" * len(lineage["per_method"])]
    for t, counts in sorted(lineage["per_iteration_method"].items()):
        text.append(f"| {t} | " + " | ".join(str(counts.get(m, 0)) for m in sorted(lineage["per_method"])) + " |")
    text += ["", "Informativeness (reward gap of the solver's samples) of the pool the creator read, and of the "
             "prompts it wrote:", "", "| iteration | prompts | informative share | mean gap |", "|---|---|---|---|"]
    for folder in sorted(run.glob("iter_*"), key=lambda p: int(p.name.split("_")[1])):
        for name, label in (("samples.jsonl", "pool"), ("evolved_samples.jsonl", "evolved")):
            infos = [s["info"] for s in _jsonl(folder / name)]
            if infos and (label == "evolved" or folder.name != "iter_0"):
                summary = creator.summarize_info(infos)
                text.append(f"| {folder.name.split('_')[1]} ({label}) | {summary['n']} | "
                            f"{summary['informative_share']:.2f} | {_fmt(summary['mean'])} |")
    text += ["", "## Example evolved chains (root first)", ""]
    for chain in lineage["examples"]:
        text += [f"{'  ' * k}- [{c.get('method') or 'seed'}] {c['prompt'][:400]!r}" for k, c in enumerate(chain)]
        text.append("")
    return "\n".join(text) + "\n"


def write_report(run: Path, eva_iterations: int | None = None) -> str:
    """Write report.md and report.png into the run folder; return the table as text."""
    run = Path(run)
    rows = iteration_rows(run)
    start = json.loads((run / "eval_start.json").read_text()) if (run / "eval_start.json").exists() else None
    end = json.loads((run / "eval_end.json").read_text()) if (run / "eval_end.json").exists() else None
    lines = ["| iteration | pool | mean reward | informative | evolved | pairs (evolved) | loss first -> last |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['iteration']} | {r['pool']} | {_fmt(r['mean_reward'])} | {_fmt(r['informative'])} | "
                     f"{r['evolved']} | {_fmt(r['pairs'])} ({_fmt(r['evolved_pairs'])}) | "
                     f"{_fmt(r['first_loss'], 4)} -> {_fmt(r['last_loss'], 4)} |")
    table = "\n".join(lines)
    accuracy = ""
    if start and end:
        accuracy = ("| held-out (greedy) | start | end |\n|---|---|---|\n"
                    f"| prompt-level accuracy | {start['prompt_level']:.3f} | {end['prompt_level']:.3f} |\n"
                    f"| instruction-level accuracy | {start['instruction_level']:.3f} | "
                    f"{end['instruction_level']:.3f} |\n"
                    f"\n({start['n_prompts']} held-out prompts)")
    md = f"# eva run report: {run}\n\n{table}\n\n{accuracy}\n\n![report](report.png)\n" + evolution_section(run)
    (run / "report.md").write_text(md)
    plot(run, rows, start, end)
    return table + ("\n\n" + accuracy if accuracy else "")


def plot(run: Path, rows: list[dict], start: dict | None, end: dict | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # A run killed between checkpoints logs the redone steps twice: keep the last record of each step.
    steps = list({(m["iteration"], m["step"]): m for m in _jsonl(run / "metrics.jsonl")
                  if "step" in m and "loss" in m}.values())
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    for t in sorted({m["iteration"] for m in steps}):
        ms = [m for m in steps if m["iteration"] == t]
        ax.plot([m["step"] for m in ms], [m["loss"] for m in ms], label=f"iteration {t}")
    ax.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    if steps:
        ax.legend()
    ax = axes[1]
    its = [r["iteration"] for r in rows if r["mean_reward"] is not None]
    ax.plot(its, [r["mean_reward"] for r in rows if r["mean_reward"] is not None], "o-")
    ax.set(title="mean reward of sampled responses", xlabel="iteration", ylabel="reward", xticks=its)
    ax = axes[2]
    if start and end:
        x = np.arange(2)
        ax.bar(x - 0.18, [start["prompt_level"], start["instruction_level"]], 0.36, label="start")
        ax.bar(x + 0.18, [end["prompt_level"], end["instruction_level"]], 0.36, label="end")
        ax.set_xticks(x, ["prompt-level", "instruction-level"])
        ax.legend()
    ax.set(title="held-out constraint accuracy", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(run / "report.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python report.py <run folder>")
    print(write_report(Path(sys.argv[1])))
