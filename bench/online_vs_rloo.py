"""Online eva against plain online RLOO on the fixed seed pool: the same rollouts and updates, several seeds.

    python bench/online_vs_rloo.py --out runs/online_compare --ifeval ../shared/data/ifeval_input_data.jsonl
    python bench/online_vs_rloo.py --out /tmp/o --seeds 0 --train_args --preset smoke --model <tiny folder>

For each seed, two train_eva.py --online runs from the bundled model with the online preset (unless --train_args
says otherwise), differing only in the creator:
  rloo  --evolve_every 0: every step draws from the seed prompts (untried first, then by their info)
  eva   the creator evolves the most informative recent prompts every evolve_every steps; 80% of a step's prompts
        come from the evolved ones once there are any
  eva_learns   (with --learning_creator) eva whose creator learns (--creator_learns: creator_rl.py)
Both take online_steps steps of online_prompts prompts x k responses. Each final solver answers the held-out prompts
(greedy, --eval_max_new_tokens) and, with --ifeval, that IFEval-format file (every prompt the rules can score,
greedy), as does the starting model once. The table has each arm's mean ± sd over seeds and the per-seed
eva-minus-rloo difference with a 95% t interval; a second table sets each creator round's children against their
parents; the plot the reward curves and the final scores. Resumable like
bench/eva_vs_baseline.py; writes <out>/results.json, results.md and results.png.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import cleaning  # noqa: E402
import constraints  # noqa: E402
import eva_vs_baseline as compare  # noqa: E402  (its job runner, IFEval job and interval)
import files  # noqa: E402
import reward  # noqa: E402
from eval.winrate import win_rate  # noqa: E402

ARMS = ("rloo", "eva", "eva_learns")  # eva_learns only with --learning_creator
ARM_FLAGS = {"rloo": ["--evolve_every", "0"], "eva": [], "eva_learns": ["--creator_learns"]}
DIFFERENCES = (("eva", "rloo"), ("eva_learns", "eva"), ("eva_learns", "rloo"))  # per-seed a - b rows


def run_arm(out: Path, seed: int, arm: str, opts, threads: int) -> Path:
    """One online run (resumed if it stopped), then its IFEval."""
    folder = out / f"seed{seed}" / arm
    if not (folder / "eval_end.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        compare.train_eva(["--preset", "online", "--online", "--run_dir", str(folder), "--seed", str(seed),
                           "--max_heldout_prompts", "0", "--eval_max_new_tokens", str(opts.eval_max_new_tokens),
                           *opts.train_args, *ARM_FLAGS[arm]], folder.with_suffix(".log"), threads)
    if opts.ifeval:
        compare.official_ifeval(folder / "adapter", folder / "ifeval.json", opts, threads)
    return folder


def row_of(folder: Path, heldout: dict, start_rewards: list[float] | None, opts) -> dict:
    result = json.loads((folder / "eval_end.json").read_text())
    rewards = [reward.rules_reward(heldout[a["prompt_id"]], a["answer"]) for a in result["answers"]]
    steps = {m["step"]: m for m in files.read_jsonl(folder / "metrics.jsonl") if "reward" in m}
    row = dict(instruction_level=result["instruction_level"], prompt_level=result["prompt_level"],
               rewards=[steps[s]["reward"] for s in sorted(steps)],
               evolved_drawn=sum(m["evolved"] for m in steps.values()), pool=steps[max(steps)]["pool"])
    if start_rewards is not None:
        row["win_rate_vs_start"] = win_rate(rewards, start_rewards, n_boot=1000, seed=0)["win_rate"]
    row["rounds"] = children_vs_parents(folder)
    if opts.ifeval:
        official = json.loads((folder / "ifeval.json").read_text())
        row.update(ifeval_prompt_level=official["prompt_level"], ifeval_instruction_level=official["instruction_level"],
                   ifeval_average=(official["prompt_level"] + official["instruction_level"]) / 2)
    return row


def children_vs_parents(folder: Path) -> dict:
    """{round: numbers} from the final pool.jsonl: is the pool getting more informative? A child's and a parent's info
    is that of their last draw (a child never drawn has none), the seed prompts' is the baseline; near-copies are
    rewritten tasks at 3-gram Jaccard >= 0.6 to their parent's (creator_rl's copy_threshold; constraint-only
    children keep the task by design and are not counted). With --creator_learns, the creator's own mean reward."""
    pool = files.read_jsonl(folder / "pool.jsonl")
    by_id = {r["id"]: r for r in pool}
    learned = {m["round"]: m["creator"] for m in files.read_jsonl(folder / "metrics.jsonl") if m.get("creator")}

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None
    seed_info = mean([r["info"] for r in pool if r.get("parent") is None])
    rounds = {}
    for t in sorted({r["iteration"] for r in pool if r.get("parent") is not None}):
        children = [r for r in pool if r.get("parent") is not None and r["iteration"] == t]
        parents = {r["parent"]: by_id[r["parent"]] for r in children if r["parent"] in by_id}
        task = lambda r: constraints.split_task(r) or r["prompt"]  # noqa: E731
        copies = [cleaning.similarity(task(parents[r["parent"]]), task(r)) >= 0.6 for r in children
                  if r.get("method") != "add_constraints" and r["parent"] in parents]
        rounds[t] = dict(children=len(children), drawn=sum(r.get("last_step") is not None for r in children),
                         child_info=mean([r["info"] for r in children]),
                         parent_info=mean([r["info"] for r in parents.values()]), seed_info=seed_info,
                         near_copy=mean([float(c) for c in copies]),
                         creator_reward=learned.get(t, {}).get("creator_reward"))
    return rounds


def measure(out: Path, heldout: dict, opts) -> dict:
    """results[arm][seed] = row; results["start"] = the starting model's held-out (and IFEval) scores."""
    first = out / f"seed{opts.seeds[0]}" / "eva"
    start = json.loads((first / "eval_start.json").read_text())
    start_rewards = [reward.rules_reward(heldout[a["prompt_id"]], a["answer"]) for a in start["answers"]]
    results = {"start": dict(instruction_level=start["instruction_level"], prompt_level=start["prompt_level"])}
    if opts.ifeval:
        official = json.loads((out / "start_ifeval.json").read_text())
        results["start"].update(ifeval_prompt_level=official["prompt_level"],
                                ifeval_instruction_level=official["instruction_level"],
                                ifeval_average=(official["prompt_level"] + official["instruction_level"]) / 2)
    for arm in compare.arms(opts, ARMS):
        results[arm] = {s: row_of(out / f"seed{s}" / arm, heldout, start_rewards, opts) for s in opts.seeds}
    return results


KEYS = [("instruction_level", "held-out instr."), ("prompt_level", "held-out prompt"),
        ("win_rate_vs_start", "win rate vs start"), ("ifeval_instruction_level", "IFEval instr."),
        ("ifeval_prompt_level", "IFEval prompt"), ("ifeval_average", "IFEval avg")]


def summarize(results: dict) -> str:
    seeds = sorted(results["eva"])
    keys = [(k, label) for k, label in KEYS if k in results["eva"][seeds[0]]]
    lines = ["| arm | seeds | " + " | ".join(label for _, label in keys) + " | evolved prompts drawn | pool |",
             "|---|---|" + "---|" * (len(keys) + 2)]
    lines.append("| start | - | " + " | ".join(f"{results['start'][k]:.3f}" if k in results["start"] else "-"
                                                 for k, _ in keys) + " | - | - |")
    for arm in (a for a in ARMS if a in results):
        rows = [results[arm][s] for s in seeds]
        cells = [f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows], ddof=1) if len(rows) > 1 else 0:.3f}"
                 for k, _ in keys]
        lines.append(f"| {arm} | {len(seeds)} | " + " | ".join(cells) +
                     f" | {np.mean([r['evolved_drawn'] for r in rows]):.0f} | {np.mean([r['pool'] for r in rows]):.0f} |")
    for a, b in (d for d in DIFFERENCES if d[0] in results and d[1] in results):
        diff = [compare.interval([results[a][s][k] - results[b][s][k] for s in seeds]) for k, _ in keys]
        lines.append(f"| **{a} - {b}** | {len(seeds)} | " + " | ".join(diff) + " | | |")
    return "\n".join(lines)


def evolution_table(results: dict) -> str:
    """Per evolving arm and creator round (mean over seeds): the children against their parents and the seed pool."""
    lines = ["| round | arm | seeds | children (drawn) | children's info | parents' info | seed prompts' info | "
             "near-copies | creator's reward |", "|---|---|---|---|---|---|---|---|---|"]

    def mean(rows, key, form):
        values = [r[key] for r in rows if r.get(key) is not None]
        return format(float(np.mean(values)), form) if values else "-"
    for arm in (a for a in ARMS if a in results and a != "rloo"):
        by_round = {}
        for row in results[arm].values():
            for t, numbers in row["rounds"].items():
                by_round.setdefault(int(t), []).append(numbers)
        for t, rows in sorted(by_round.items()):
            lines.append(f"| {t} | {arm} | {len(rows)} | {mean(rows, 'children', '.0f')} ({mean(rows, 'drawn', '.0f')})"
                         f" | {mean(rows, 'child_info', '.3f')} | {mean(rows, 'parent_info', '.3f')} | "
                         f"{mean(rows, 'seed_info', '.3f')} | {mean(rows, 'near_copy', '.0%')} | "
                         f"{mean(rows, 'creator_reward', '.3f')} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seeds = sorted(results["eva"])
    keys = [(k, label) for k, label in KEYS if k in results["eva"][seeds[0]] and k != "win_rate_vs_start"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    for a, arm in enumerate(a for a in ARMS if a in results):
        curves = np.array([results[arm][s]["rewards"] for s in seeds])  # [seeds, steps]
        width = max(1, curves.shape[1] // 6)
        smooth = np.array([np.convolve(c, np.ones(width) / width, mode="valid") for c in curves])
        x = np.arange(width, curves.shape[1] + 1)
        left.plot(x, smooth.mean(0), color=f"C{a}", label=f"{arm} (mean of {len(seeds)} seeds)")
        left.fill_between(x, smooth.min(0), smooth.max(0), color=f"C{a}", alpha=0.2)
        for j, (k, _) in enumerate(keys):
            values = [results[arm][s][k] for s in seeds]
            xb = j * 4 + a
            right.bar(xb, np.mean(values), color=f"C{a}", label=arm if j == 0 else None)
            right.scatter([xb] * len(values), values, color="k", s=10, zorder=3)
    left.set(title=f"training reward (running mean of {width} steps; band: seed range)", xlabel="step",
             ylabel="mean reward of the step's samples")
    left.legend(fontsize=7)
    for j, (k, _) in enumerate(keys):
        if k in results["start"]:
            right.hlines(results["start"][k], j * 4 - 0.4, j * 4 + 2.4, color="gray", ls="--",
                         label="start" if j == 0 else None)
    right.set_xticks([j * 4 + 1 for j in range(len(keys))], [label for _, label in keys], fontsize=7)
    right.set(title="final solvers (dots: seeds)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    compare.add_common_args(parser)
    parser.add_argument("--learning_creator", action="store_true", help="a third arm: online eva with "
                        "--creator_learns (creator flags such as --creator_steps go in --train_args)")
    parser.add_argument("--start_model", default="default", help="the model the runs start from (for its IFEval)")
    opts, out, heldout = compare.parse(parser)
    start, threads = time.time(), max(1, (os.cpu_count() or 1) // opts.workers)
    jobs = [(run_arm, out, s, arm, opts, threads) for s in opts.seeds for arm in compare.arms(opts, ARMS)]
    if opts.ifeval:  # after the first seed's runs
        jobs.insert(2, (compare.official_ifeval, opts.start_model, out / "start_ifeval.json", opts, threads))
    compare.run_jobs(jobs, opts.workers)
    results = measure(out, heldout, opts)
    compare.write_results(out, results, summarize(results) + "\n\n" + evolution_table(results), plot, start)


if __name__ == "__main__":
    main()
