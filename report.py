"""The end-of-run report: a table per iteration, held-out accuracy at the start and end, a plot, example chains.

    python report.py runs/demo             # (re)writes runs/demo/report.md and runs/demo/report.png
    python report.py runs/demo --lineage   # prints how the pool grew (report_lineage) as JSON

It only reads what train_eva.py wrote to the run folder (metrics.jsonl, iter_<t>/*.jsonl, eval_*.json).
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

import creator
import files


def _jsonl(path: Path) -> list[dict]:
    return files.read_jsonl(path) if path.exists() else []


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


def summarize_info(info) -> dict:
    """The distribution of a pool's informativeness for the report: count, share informative, mean and quantiles."""
    info = np.asarray(list(info), dtype=np.float64)  # [P]
    finite = info[np.isfinite(info)]
    positive = finite[finite > 0]
    quantiles = np.quantile(finite, [0.1, 0.25, 0.5, 0.75, 0.9]).tolist() if finite.size else [None] * 5
    return dict(n=int(info.size), informative=int(positive.size),
                informative_share=float(positive.size / info.size) if info.size else 0.0,
                mean=float(finite.mean()) if finite.size else None,
                p10=quantiles[0], p25=quantiles[1], median=quantiles[2], p75=quantiles[3], p90=quantiles[4],
                max=float(finite.max()) if finite.size else None)


def report_lineage(pool: list[dict], *, examples: int = 3) -> dict:
    """How a pool grew: evolved prompts per method, per kind, per iteration (and method), fallbacks, and a few of
    the longest chains, root first (each link: id, iteration, method, prompt)."""
    by_id = {r["id"]: r for r in pool}
    evolved = [r for r in pool if r.get("parent") is not None]
    per_iteration: dict[int, Counter] = {}
    for r in evolved:
        per_iteration.setdefault(int(r.get("iteration", 0)), Counter())[r.get("method")] += 1

    def chain(r: dict) -> list[dict]:
        links, seen = [r], {r["id"]}
        while links[-1].get("parent") in by_id and links[-1]["parent"] not in seen:
            links.append(by_id[links[-1]["parent"]])
            seen.add(links[-1]["id"])
        return links[::-1]

    parents = {r.get("parent") for r in evolved}
    leaves = sorted((r for r in evolved if r["id"] not in parents), key=lambda r: (-len(chain(r)), str(r["id"])))
    chosen_roots, shown = set(), []
    for leaf in leaves:  # one chain per root, so the examples show different seeds
        links = chain(leaf)
        if links[0]["id"] in chosen_roots:
            continue
        chosen_roots.add(links[0]["id"])
        shown.append([dict(id=x["id"], iteration=x.get("iteration", 0), method=x.get("method"),
                           prompt=x["prompt"]) for x in links])
        if len(shown) == examples:
            break
    per_method = Counter(r.get("method") for r in evolved)
    return dict(
        pool=len(pool), original=len(pool) - len(evolved), evolved=len(evolved),
        per_method=dict(per_method),
        per_kind=dict(Counter(creator.EVOLVE_METHODS[m].kind for m in per_method.elements()
                              if m in creator.EVOLVE_METHODS)),
        per_iteration={t: sum(c.values()) for t, c in sorted(per_iteration.items())},
        per_iteration_method={t: dict(c) for t, c in sorted(per_iteration.items())},
        fallbacks=sum(1 for r in evolved if r.get("fallback_from")),
        roots=len({chain(r)[0]["id"] for r in evolved}),
        examples=shown)


def evolution_section(run: Path) -> str:
    """How the pool grew (per method, per iteration), informativeness before and after, a few example chains."""
    final_pool = []
    for t in range(1000):
        folder = run / f"iter_{t}"
        if not folder.is_dir():
            break
        final_pool = _jsonl(folder / "pool_next.jsonl") or _jsonl(folder / "pool.jsonl") + _jsonl(
            folder / "evolved.jsonl")
    lineage = report_lineage(final_pool)
    if not lineage["evolved"]:
        return ""
    text = ["", "## How the pool grew", "",
            f"{lineage['original']} seed prompts + {lineage['evolved']} evolved = {lineage['pool']}.", "",
            "| iteration | " + " | ".join(sorted(lineage["per_method"])) + " |",
            "|---|" + "---|" * len(lineage["per_method"])]
    for t, counts in sorted(lineage["per_iteration_method"].items()):
        text.append(f"| {t} | " + " | ".join(str(counts.get(m, 0)) for m in sorted(lineage["per_method"])) + " |")
    text += ["", f"Informativeness ({info_metric(run)} of the solver's rewards) of the pool the creator read, and of "
             "the prompts it wrote:", "", "| iteration | prompts | informative share | mean info |",
             "|---|---|---|---|"]
    for folder in sorted(run.glob("iter_*"), key=lambda p: int(p.name.split("_")[1])):
        for name, label in (("samples.jsonl", "pool"), ("evolved_samples.jsonl", "evolved")):
            infos = [s["info"] for s in _jsonl(folder / name)]
            if infos and (label == "evolved" or folder.name != "iter_0"):
                summary = summarize_info(infos)
                text.append(f"| {folder.name.split('_')[1]} ({label}) | {summary['n']} | "
                            f"{summary['informative_share']:.2f} | {_fmt(summary['mean'])} |")
    text += ["", "## Example evolved chains (root first)", ""]
    for chain in lineage["examples"]:
        text += [f"{'  ' * k}- [{c.get('method') or 'seed'}] {c['prompt'][:400]!r}" for k, c in enumerate(chain)]
        text.append("")
    return "\n".join(text) + "\n"


def creator_rows(run: Path) -> list[dict]:
    """The learning creator's rounds (--creator_learns: each iteration's done_creator summary), oldest first."""
    return [dict(iteration=int(f.parent.name.split("_")[1]), **json.loads(f.read_text()))
            for f in sorted(run.glob("iter_*/done_creator"), key=lambda f: int(f.parent.name.split("_")[1]))]


def creator_section(rounds: list[dict]) -> str:
    """Is the learning creator writing valid, new children that the solver finds more informative than their
    parents?"""
    if not rounds:
        return ""
    text = ["", "## The learning creator's rounds", "",
            "| iteration | rewrites | creator reward | valid | near-copies | children's reward (parents') | "
            "children's info (parents') |", "|---|---|---|---|---|---|---|"]
    for r in rounds:
        text.append(f"| {r['iteration']} | {r['rewrites']} | {_fmt(r['creator_reward'])} | {_fmt(r['valid'], 2)} | "
                    f"{_fmt(r['near_copy'], 2)} | {_fmt(r['child_reward'])} ({_fmt(r['parent_reward'])}) | "
                    f"{_fmt(r['child_info'])} ({_fmt(r['parent_info'])}) |")
    return "\n".join(text) + "\n"


def info_metric(run: Path) -> str:
    """The run's --info_metric, as its config.json has it."""
    path = Path(run) / "config.json"
    return json.loads(path.read_text()).get("info_metric", "gap") if path.exists() else "gap"


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
    accuracy = accuracy_table(start, end)
    rounds = creator_rows(run)
    md = (f"# eva run report: {run}\n\n{table}\n\n{accuracy}\n\n![report](report.png)\n" + creator_section(rounds)
          + evolution_section(run))
    (run / "report.md").write_text(md)
    plot(run, rows, start, end, rounds)
    return table + ("\n\n" + accuracy if accuracy else "")


def accuracy_table(start: dict | None, end: dict | None) -> str:
    """The held-out start/end table (markdown), or "" when either evaluation is missing."""
    if not (start and end):
        return ""
    return ("| held-out (greedy) | start | end |\n|---|---|---|\n"
            f"| prompt-level accuracy | {start['prompt_level']:.3f} | {end['prompt_level']:.3f} |\n"
            f"| instruction-level accuracy | {start['instruction_level']:.3f} | {end['instruction_level']:.3f} |\n"
            f"\n({start['n_prompts']} held-out prompts)")


def write_online_report(run: Path, windows: int = 8) -> str:
    """report.md and report.png of an online run (online.py): reward, KL and pool size over steps, creator rounds,
    held-out accuracy at the start and end. Returns the tables as text."""
    run = Path(run)
    records = _jsonl(run / "metrics.jsonl")
    # A run killed between checkpoints logs the redone steps twice: keep the last record of each.
    steps = sorted({m["step"]: m for m in records if "reward" in m}.values(), key=lambda m: m["step"])
    rounds = sorted({m["step"]: m for m in records if m.get("phase") == "evolve"}.values(), key=lambda m: m["step"])
    start = json.loads((run / "eval_start.json").read_text()) if (run / "eval_start.json").exists() else None
    end = json.loads((run / "eval_end.json").read_text()) if (run / "eval_end.json").exists() else None
    lines = [f"| steps | mean reward | info ({info_metric(run)}) | KL | evolved prompts drawn | pool |",
             "|---|---|---|---|---|---|"]
    for part in np.array_split(np.arange(len(steps)), min(windows, len(steps))) if steps else []:
        ms = [steps[i] for i in part]
        kls = [m["kl"] for m in ms if m.get("kl") is not None]
        lines.append(f"| {ms[0]['step']}-{ms[-1]['step']} | {np.mean([m['reward'] for m in ms]):.3f} | "
                     f"{np.mean([m['info'] for m in ms]):.3f} | {_fmt(float(np.mean(kls)) if kls else None, 4)} | "
                     f"{sum(m['evolved'] for m in ms)} | {ms[-1]['pool']} |")
    table = "\n".join(lines)
    creator_lines = ["| after step | parents (of recent) | children | pool |", "|---|---|---|---|"] + [
        f"| {r['step']} | {r['parents']} ({r['recent']}) | {r['children']} | {r['pool']} |" for r in rounds]
    gen = sum(m["gen_seconds"] for m in steps)
    upd = sum(m["update_seconds"] for m in steps)
    accuracy = accuracy_table(start, end)
    taught = [r for r in rounds if r.get("creator")]  # --creator_learns: the creator's own round in each
    learned = [dict(iteration=f"{r['round']} (step {r['step']})", **r["creator"]) for r in taught]
    md = (f"# online eva run report: {run}\n\n{table}\n\nSeconds in sampling and scoring {gen:.0f}, in updates "
          f"{upd:.0f}.\n\n## Creator rounds\n\n" + "\n".join(creator_lines) +
          f"\n\n{accuracy}\n\n![report](report.png)\n" + creator_section(learned))
    (run / "report.md").write_text(md)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4 if learned else 3, figsize=(17 if learned else 13, 3.6))
    x = [m["step"] for m in steps]
    axes[0].plot(x, [m["reward"] for m in steps], alpha=0.4, label="per step")
    if steps:
        width = max(1, len(steps) // 10)
        smooth = np.convolve([m["reward"] for m in steps], np.ones(width) / width, mode="valid")
        axes[0].plot(x[width - 1:], smooth, label=f"mean of {width}")
        axes[0].legend()
    axes[0].set(title="mean reward of the step's samples", xlabel="step", ylabel="reward")
    axes[1].plot(x, [m["pool"] for m in steps], drawstyle="steps-post")
    axes[1].set(title="prompt pool size", xlabel="step", ylabel="prompts")
    kl = [(m["step"], m["kl"]) for m in steps if m.get("kl") is not None]
    if kl:
        axes[2].plot(*zip(*kl))
    axes[2].set(title="KL to the starting policy (per response)", xlabel="step")
    if learned:
        creator_panel(axes[3], [r["step"] for r in taught], learned, "step")
    fig.tight_layout()
    fig.savefig(run / "report.png", dpi=110)
    plt.close(fig)
    return table + ("\n\n" + accuracy if accuracy else "")


def creator_panel(ax, x: list, rounds: list[dict], xlabel: str) -> None:
    """The learning creator over its rounds: its reward, its children's informativeness against their parents'."""
    for key, label in (("creator_reward", "creator reward"), ("child_info", "children's info"),
                       ("parent_info", "parents' info"), ("near_copy", "near-copy share")):
        ax.plot(x, [np.nan if r[key] is None else r[key] for r in rounds], "o-", label=label)
    ax.set(title="the learning creator", xlabel=xlabel, xticks=x)
    ax.legend(fontsize=7)


def plot(run: Path, rows: list[dict], start: dict | None, end: dict | None, rounds: list[dict] = ()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # A run killed between checkpoints logs the redone steps twice: keep the last record of each step.
    steps = list({(m["iteration"], m["step"]): m for m in _jsonl(run / "metrics.jsonl")
                  if "step" in m and "loss" in m}.values())
    fig, axes = plt.subplots(1, 4 if rounds else 3, figsize=(17 if rounds else 13, 3.6))
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
    if rounds:
        creator_panel(axes[3], [r["iteration"] for r in rounds], rounds, "iteration")
    fig.tight_layout()
    fig.savefig(run / "report.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder written by train_eva.py")
    parser.add_argument("--lineage", action="store_true", help="print the pool's lineage as JSON instead")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not args.lineage:
        print(write_report(run))
        return
    records = {}
    for path in sorted(run.glob("iter_*/pool.jsonl")) + sorted(run.glob("iter_*/evolved.jsonl")):
        records.update((r["id"], r) for r in files.read_jsonl(path))
    if not records:
        raise FileNotFoundError(f"report: no iter_*/pool.jsonl or evolved.jsonl under {run}")
    print(json.dumps(report_lineage(list(records.values())), indent=1))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
