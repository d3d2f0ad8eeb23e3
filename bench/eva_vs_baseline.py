"""The paper's claim in miniature: from one shared iteration-0 solver, do eva iterations beat ordinary ones?

    python bench/eva_vs_baseline.py --out runs/compare --ifeval ../shared/data/ifeval_input_data.jsonl
    python bench/eva_vs_baseline.py --out /tmp/c --seeds 0 --iterations 1 --train_args --preset smoke --model <tiny>

train_eva.py runs iteration 0 once (seed 0). For each seed its folder is copied twice and each copy is resumed for
--iterations more iterations, one at a time:
  baseline  --no-evolve: the pool is re-sampled with the current solver, pairs from the seed prompts
  eva       estimate, select, evolve, then pairs from 80% evolved / 20% original prompts
  eva_learns   (with --learning_creator) eva whose creator learns (--creator_learns: creator_rl.py)
Both arms train on the same number of pairs (--pairs) for the same number of steps with the same settings; only
--seed differs between seeds. After every iteration the solver answers the held-out prompts greedily (train_eva's
eval_end.json, kept as eval_iter<k>.json); the table reports held-out accuracy and the win rate against the
iteration-0 solver's answers under the rules reward (ties 1/2). With --ifeval, iteration 0 and each arm's last
iteration also answer that IFEval-format file (every prompt the rules can score, greedy). Per iteration the
per-seed eva-minus-baseline difference gets a 95% t interval; a second table sets each evolving arm's children
against their parents (mean solver reward and informativeness, near-copy share). --workers runs that many jobs side
by side, each with its share of the cores. Every job is a resumable run, so rerunning the command continues where
it stopped; --summarize tabulates what has finished without starting a job. Writes
<out>/results.json, <out>/results.md and <out>/results.png.
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cleaning  # noqa: E402
import constraints  # noqa: E402
import files  # noqa: E402
import reward  # noqa: E402
from eval.winrate import win_rate  # noqa: E402

ARMS = ("baseline", "eva", "eva_learns")  # eva_learns only with --learning_creator
ARM_FLAGS = {"baseline": ["--no-evolve"], "eva": ["--evolve"], "eva_learns": ["--evolve", "--creator_learns"]}
DIFFERENCES = (("eva", "baseline"), ("eva_learns", "eva"), ("eva_learns", "baseline"))  # per-seed a - b rows
# Student's t quantile t_{0.975, df} for df = 1..10 (beyond: the normal 1.96 is within 10%).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def run_logged(command: list[str], log: Path, threads: int) -> None:
    """One job as a subprocess, its output appended to log; a failure names the log."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print(f"+ {' '.join(command)}  (log {log})", flush=True)
    with open(log, "a") as f:
        if subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: job failed, see {log}")


def train_eva(args: list[str], log: Path, threads: int) -> None:
    run_logged([sys.executable, str(ROOT / "train_eva.py"), *args], log, threads)


def common_args(opts) -> list[str]:
    return ["--loss", opts.loss, "--pairs_per_iteration", str(opts.pairs), "--eval_max_new_tokens",
            str(opts.eval_max_new_tokens), *opts.train_args]


def iteration_zero(out: Path, opts, threads: int) -> Path:
    folder = out / "iter0"
    if not (folder / "eval_end.json").exists():  # a finished run is not reopened
        folder.mkdir(parents=True, exist_ok=True)
        train_eva(["--run_dir", str(folder), "--seed", "0", "--eva_iterations", "0", *common_args(opts)],
                  out / "iter0.log", threads)
    return folder


def run_arm(out: Path, seed: int, arm: str, opts, threads: int) -> Path:
    """A copy of iteration 0 resumed one iteration at a time; eval_iter<k>.json after each."""
    folder = out / f"seed{seed}" / arm
    if not folder.exists():
        tmp = folder.with_name(arm + ".copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out / "iter0", tmp)
        for name in ("eval_end.json", "report.md", "report.png"):
            (tmp / name).unlink(missing_ok=True)
        tmp.rename(folder)
    for k in range(1, opts.iterations + 1):
        if (folder / f"eval_iter{k}.json").exists():
            continue
        train_eva(["--run_dir", str(folder), "--seed", str(seed), "--eva_iterations", str(k), *ARM_FLAGS[arm],
                   "--allow_config_change", *common_args(opts)], folder.with_suffix(".log"), threads)
        (folder / "eval_end.json").rename(folder / f"eval_iter{k}.json")  # the next resume evaluates afresh
    if opts.ifeval:
        arm_ifeval(folder, opts.iterations, opts, threads)
    return folder


def official_ifeval(model_dir: Path, path: Path, opts, threads: int) -> dict:
    """The IFEval file's accuracies of the model in model_dir, cached in path (its log beside it)."""
    if not path.exists():
        command = [sys.executable, str(ROOT / "eval" / "ifeval.py"), "--model", str(model_dir), "--prompts", opts.ifeval,
                   "--out", str(path), "--max_new_tokens", str(opts.ifeval_max_new_tokens),
                   "--batch_size", str(opts.ifeval_batch_size)]
        run_logged(command, path.with_suffix(".log"), threads)
    return json.loads(path.read_text())


def arm_ifeval(folder: Path, k: int, opts, threads: int) -> dict:
    """official_ifeval of the solver after iteration k of a run folder."""
    return official_ifeval(folder / f"iter_{k}" / "adapter", folder / f"ifeval_iter{k}.json", opts, threads)


def held_out(folder: Path, name: str, heldout: dict) -> tuple[dict, list[float]]:
    """Accuracies of eval file `name` in folder and the rules reward of each held-out answer."""
    result = json.loads((folder / name).read_text())
    rewards = [reward.rules_reward(heldout[a["prompt_id"]], a["answer"]) for a in result["answers"]]
    return dict(instruction_level=result["instruction_level"], prompt_level=result["prompt_level"]), rewards


def measure(out: Path, seeds: list[int], heldout: dict, opts) -> dict:
    """results[arm][k][seed] = row of metrics (iteration 0 is arm "iter0", k 0, under every seed). A run not yet
    evaluated after iteration k is left out (--summarize reads a command still under way); IFEval is scored
    where missing unless --summarize."""
    row0, rewards0 = held_out(out / "iter0", "eval_end.json", heldout)
    if opts.ifeval:
        row0.update(ifeval(out / "iter0", 0, opts))
    results = {"iter0": {0: {s: row0 for s in seeds}}}
    for arm in arms(opts):
        results[arm] = {}
        for k in range(1, opts.iterations + 1):
            results[arm][k] = {}
            for s in seeds:
                folder = out / f"seed{s}" / arm
                if not (folder / f"eval_iter{k}.json").exists():
                    continue
                row, rewards = held_out(folder, f"eval_iter{k}.json", heldout)
                row["win_rate_vs_iter0"] = win_rate(rewards, rewards0, n_boot=1000, seed=0)["win_rate"]
                pairs = files.read_jsonl(folder / f"iter_{k}" / "pairs.jsonl")
                row.update(pairs=len(pairs), evolved_pairs=sum(p["source"] == "evolved" for p in pairs))
                if arm != "baseline":
                    row.update(children_vs_parents(folder / f"iter_{k}"))
                if opts.ifeval and k == opts.iterations:
                    row.update(ifeval(folder, k, opts))
                results[arm][k][s] = row
    return results


def ifeval(folder: Path, k: int, opts) -> dict:
    """The IFEval accuracies of a run folder's solver after iteration k ({} under --summarize when not scored)."""
    if opts.summarize and not (folder / f"ifeval_iter{k}.json").exists():
        return {}
    official = arm_ifeval(folder, k, opts, os.cpu_count() or 1)
    return dict(ifeval_prompt_level=official["prompt_level"], ifeval_instruction_level=official["instruction_level"])


def children_vs_parents(iter_dir: Path) -> dict:
    """Is the pool getting harder and more informative? The evolved children's mean solver reward and info (scored
    in the generate phase) against their selected parents' (the estimate phase; selected for high info on those
    same samples, so biased upward) and the whole pool's, and the share of rewritten tasks that are near-copies of
    their parent's task (3-gram Jaccard >= 0.6, creator_rl's default copy_threshold; children from the constraint
    step keep the task by design and are not counted)."""
    estimate = files.read_jsonl(iter_dir / "samples.jsonl")
    scored = {r["prompt_id"]: r for r in estimate + files.read_jsonl(iter_dir / "evolved_samples.jsonl")}
    parents, children = files.read_jsonl(iter_dir / "selected.jsonl"), files.read_jsonl(iter_dir / "evolved.jsonl")
    tasks = {r["id"]: constraints.split_task(r) or r["prompt"] for r in parents + children}

    def mean(records, key):
        values = [float(np.mean(scored[r["id"]]["rewards"]) if key == "rewards" else scored[r["id"]][key])
                  for r in records if r["id"] in scored]
        return float(np.mean(values)) if values else None

    rewritten = [r for r in children if r["method"] != "add_constraints" and r["parent"] in tasks]
    copies = [cleaning.similarity(tasks[r["parent"]], tasks[r["id"]]) >= 0.6 for r in rewritten]
    return dict(child_info=mean(children, "info"), parent_info=mean(parents, "info"),
                pool_info=float(np.mean([r["info"] for r in estimate])),
                child_reward=mean(children, "rewards"), parent_reward=mean(parents, "rewards"),
                near_copy=float(np.mean(copies)) if copies else None)


def metrics(results: dict) -> list[tuple[str, str]]:
    keys = [("instruction_level", "held-out instr."), ("prompt_level", "held-out prompt"),
            ("win_rate_vs_iter0", "win rate vs iter 0")]
    if "ifeval_prompt_level" in next(iter(results["iter0"][0].values())):
        keys += [("ifeval_instruction_level", "IFEval instr."), ("ifeval_prompt_level", "IFEval prompt"),
                 ("ifeval_average", "IFEval avg")]
    return keys


def value(row: dict, key: str) -> float | None:
    if key == "ifeval_average" and "ifeval_prompt_level" in row:  # the leaderboards' IFEval: mean of the two
        return (row["ifeval_prompt_level"] + row["ifeval_instruction_level"]) / 2
    return row.get(key)


def interval(diffs: list[float]) -> str:
    """mean [95% t interval] of per-seed differences."""
    d = np.array(diffs, dtype=float)
    if len(d) < 2:
        return f"{d.mean():+.3f}"
    half = T975.get(len(d) - 1, 1.96) * d.std(ddof=1) / np.sqrt(len(d))
    return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"


def summarize(results: dict) -> str:
    """One row per arm and iteration (mean ± sd over seeds) and one per iteration of the per-seed difference."""
    keys = metrics(results)
    lines = ["| iteration | arm | seeds | " + " | ".join(label for _, label in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]

    def cells(rows: list[dict]) -> list[str]:
        out = []
        for key, _ in keys:
            values = [v for v in (value(r, key) for r in rows) if v is not None]
            sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
            out.append(f"{np.mean(values):.3f} ± {sd:.3f}" if values else "-")
        return out

    rows0 = list(results["iter0"][0].values())
    lines.append("| 0 | shared | 1 | " + " | ".join(cells(rows0[:1])) + " |")
    present = [a for a in ARMS if a in results]
    for k in sorted(results["eva"]):
        seeds = sorted(set.intersection(*(set(results[a][k]) for a in present)))  # under --summarize: the finished
        if not seeds:
            continue
        for arm in present:
            lines.append(f"| {k} | {arm} | {len(seeds)} | " + " | ".join(cells([results[arm][k][s] for s in seeds]))
                         + " |")
        for a, b in (d for d in DIFFERENCES if d[0] in results and d[1] in results):
            diff = []
            for key, _ in keys:
                pairs = [(value(results[a][k][s], key), value(results[b][k][s], key)) for s in seeds]
                diff.append(interval([x - y for x, y in pairs]) if all(x is not None for x, _ in pairs) else "-")
            lines.append(f"| {k} | **{a} - {b}** | {len(seeds)} | " + " | ".join(diff) + " |")
    return "\n".join(lines)


def evolution_table(results: dict) -> str:
    """Per evolving arm and iteration (mean over seeds): the children against their parents (children_vs_parents)."""
    lines = ["| iteration | arm | seeds | children's info | parents' info | pool's info | children's reward "
             "(parents') | near-copies |", "|---|---|---|---|---|---|---|---|"]
    for arm in (a for a in ARMS if a in results and a != "baseline"):
        for k, rows in sorted(results[arm].items()):
            rows = [r for r in rows.values() if r.get("child_info") is not None]
            if rows:
                m = {key: np.mean([r[key] for r in rows if r.get(key) is not None] or [np.nan])
                     for key in ("child_info", "parent_info", "pool_info", "child_reward", "parent_reward",
                                 "near_copy")}
                lines.append(f"| {k} | {arm} | {len(rows)} | {m['child_info']:.3f} | {m['parent_info']:.3f} | "
                             f"{m['pool_info']:.3f} | "
                             f"{m['child_reward']:.3f} ({m['parent_reward']:.3f}) | {m['near_copy']:.0%} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("instruction_level", "held-out instruction-level"), ("win_rate_vs_iter0", "win rate vs iteration 0")]
    if "ifeval_average" in dict(metrics(results)):
        panels.append(("ifeval_average", "IFEval (prompt + instr.) / 2"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    row0 = next(iter(results["iter0"][0].values()))
    for ax, (key, title) in zip(axes, panels):
        for a, arm in enumerate(a for a in ARMS if a in results):
            ks, means = [], []
            for k in sorted(results[arm]):
                ys = [y for y in (value(r, key) for r in results[arm][k].values()) if y is not None]
                if ys:
                    ks.append(k), means.append(np.mean(ys))
                    ax.scatter([k] * len(ys), ys, color=f"C{a}", s=10, alpha=0.5)
            x0 = [0] if value(row0, key) is not None else []
            y0 = [value(row0, key)] if x0 else []
            if ks:
                ax.plot(x0 + ks, y0 + means, "-o", color=f"C{a}", label=arm)
        if key == "ifeval_average":
            ax.axhline(0.299, color="gray", ls="--", lw=1, label="published SmolLM2-135M-Instruct")
        ax.set(title=title, xlabel="iteration")
        ax.legend(fontsize=7)
    fig.suptitle("eva vs ordinary iterations (lines: mean over seeds, dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def arms(opts, names=ARMS) -> list[str]:
    """The arms to run: all of them with --learning_creator, else those without "eva_learns"."""
    return [a for a in names if opts.learning_creator or a != "eva_learns"]


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags both comparisons (this file, online_vs_rloo.py) share; --train_args must come last."""
    parser.add_argument("--out", required=True, help="folder for every run and the results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run per arm each")
    parser.add_argument("--eval_max_new_tokens", type=int, default=256, help="held-out answer budget (greedy)")
    parser.add_argument("--heldout", default=str(ROOT / "data" / "heldout_prompts.jsonl"))
    parser.add_argument("--ifeval", default="", help="an IFEval-format file to score the start and final solvers on")
    parser.add_argument("--ifeval_max_new_tokens", type=int, default=512)
    parser.add_argument("--ifeval_batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="jobs side by side (each gets cores / workers)")
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="passed on to train_eva.py")


def parse(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, Path, dict]:
    """(options, output folder, held-out records by id); a missing --ifeval file is named before any work."""
    opts = parser.parse_args()
    if opts.ifeval and not Path(opts.ifeval).is_file():
        parser.error(f"--ifeval {opts.ifeval}: no such file")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    path = opts.heldout
    if "--heldout_prompts" in opts.train_args:
        path = opts.train_args[opts.train_args.index("--heldout_prompts") + 1]
    return opts, out, {str(r.get("id", r.get("key"))): r for r in files.read_jsonl(path)}


def run_jobs(jobs: list[tuple], workers: int) -> None:
    """(function, *args) jobs, `workers` at a time, started in list order; the first failure stops the command."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for job in concurrent.futures.as_completed([pool.submit(*job) for job in jobs]):
            job.result()


def write_results(out: Path, results: dict, table: str, plot_results, start: float) -> None:
    minutes = (time.time() - start) / 60
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(f"{table}\n\n(wall time of this invocation: {minutes:.1f} min)\n")
    plot_results(results, out / "results.png")
    print(table)
    print(f"wall time {minutes:.1f} min; results in {out}/results.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--iterations", type=int, default=3, help="iterations after the shared iteration 0")
    parser.add_argument("--loss", default="dpo", help="the preference loss of both arms")
    parser.add_argument("--pairs", type=int, default=48, help="training pairs per iteration, the same in both arms")
    parser.add_argument("--learning_creator", action="store_true", help="a third arm: eva with --creator_learns "
                        "(creator flags such as --creator_steps go in --train_args; the other arms ignore them)")
    parser.add_argument("--summarize", action="store_true", help="start no job: tabulate what has finished so far "
                        "(a command still under way, or one stopped between sessions)")
    opts, out, heldout = parse(parser)
    start, cores = time.time(), os.cpu_count() or 1
    if not opts.summarize:
        iteration_zero(out, opts, cores)
    threads = max(1, cores // opts.workers)
    jobs = [(run_arm, out, s, arm, opts, threads) for s in opts.seeds for arm in arms(opts)]
    if opts.ifeval:  # after seed 0's arms: the first seed is complete first
        jobs.insert(2, (arm_ifeval, out / "iter0", 0, opts, threads))
    if not opts.summarize:
        run_jobs(jobs, opts.workers)
    results = measure(out, opts.seeds, heldout, opts)
    write_results(out, results, summarize(results) + "\n\n" + evolution_table(results), plot, start)


if __name__ == "__main__":
    main()
