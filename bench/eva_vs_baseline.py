"""The paper's claim in miniature: from the same iteration-0 solver, does one eva iteration beat one ordinary one?

    python bench/eva_vs_baseline.py --out runs/compare                       # 3 seeds, DPO, both arms
    python bench/eva_vs_baseline.py --out runs/compare --losses dpo simpo orpo sppo \
        --ifeval ../shared/data/ifeval_input_data.jsonl                      # + the loss table, + official IFEval
    python bench/eva_vs_baseline.py --out /tmp/c --seeds 0 --train_args --preset smoke --model <tiny folder>

For each seed (and each extra loss, seed 0 only): train_eva.py runs iteration 0 once; its run folder is copied
twice and each copy is resumed for one more iteration:
  baseline  --no-evolve: the pool is re-sampled with the iteration-0 solver, pairs from the seed prompts
  eva       estimate, select, evolve, then pairs from 80% evolved / 20% original prompts
Both arms train on the same number of pairs (--pairs) for the same number of steps with the same settings.
Each arm's final solver answers the held-out prompts greedily (train_eva's eval_end.json); the table reports
held-out accuracy (instruction- and prompt-level), the win rate against the iteration-0 solver's answers under the
rules reward (ties 1/2, bootstrap 95% interval), and, with --ifeval, accuracy on that file. Every step is a
resumable train_eva run, so rerunning the command continues where it stopped. Writes <out>/results.json,
<out>/results.md and <out>/results.png.
"""
import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import files  # noqa: E402
import reward  # noqa: E402
from eval.winrate import win_rate  # noqa: E402


def train_eva(args: list[str]) -> None:
    command = [sys.executable, str(ROOT / "train_eva.py"), *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def run_arms(out: Path, seed: int, loss: str, opts) -> dict:
    """Iteration 0 once, then both arms from copies of it; returns the folders."""
    tag = f"{loss}_seed{seed}"
    common = ["--seed", str(seed), "--loss", loss, "--pairs_per_iteration", str(opts.pairs), *opts.train_args]
    base = out / tag / "iter0"
    if not (base / "eval_end.json").exists():  # a finished run is not reopened (rerunning only re-tabulates)
        train_eva(["--run_dir", str(base), "--eva_iterations", "0", *common])
    folders = {"iter0": base}
    for arm in ("baseline", "eva"):
        folder = out / tag / arm
        if not folder.exists():
            tmp = folder.with_name(arm + ".copying")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(base, tmp)
            for name in ("eval_end.json", "report.md", "report.png"):
                (tmp / name).unlink(missing_ok=True)
            tmp.rename(folder)
        evolve_flag = "--evolve" if arm == "eva" else "--no-evolve"
        if not (folder / "eval_end.json").exists():
            train_eva(["--run_dir", str(folder), "--eva_iterations", "1", evolve_flag, "--allow_config_change",
                       *common])
        folders[arm] = folder
    return folders


def answers_and_records(folder: Path, heldout: dict) -> tuple[list[dict], list[str]]:
    result = json.loads((folder / "eval_end.json").read_text())
    records = [heldout[a["prompt_id"]] for a in result["answers"]]
    return records, [a["answer"] for a in result["answers"]]


def official_ifeval(folder: Path, path: str, opts) -> dict:
    out = folder / "ifeval_official.json"
    if not out.exists():
        adapter = folder / f"iter_{1 if (folder / 'iter_1').exists() else 0}" / "adapter"
        command = [sys.executable, str(ROOT / "eval" / "ifeval.py"), "--model", str(adapter), "--prompts", path,
                   "--out", str(out), "--max_new_tokens", str(opts.ifeval_max_new_tokens)]
        if opts.ifeval_limit:
            command += ["--limit", str(opts.ifeval_limit)]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def measure(folders: dict, heldout: dict, opts) -> dict:
    records, base_answers = answers_and_records(folders["iter0"], heldout)
    base_rewards = [reward.rules_reward(r, a) for r, a in zip(records, base_answers)]
    rows = {}
    for arm in ("iter0", "baseline", "eva"):
        result = json.loads((folders[arm] / "eval_end.json").read_text())
        row = dict(instruction_level=result["instruction_level"], prompt_level=result["prompt_level"])
        if arm != "iter0":
            arm_records, answers = answers_and_records(folders[arm], heldout)
            assert [r["id"] for r in arm_records] == [r["id"] for r in records], "held-out sets differ between arms"
            rewards = [reward.rules_reward(r, a) for r, a in zip(records, answers)]
            row["win_rate_vs_iter0"] = win_rate(rewards, base_rewards, n_boot=1000, seed=0)
            pairs = files.read_jsonl(folders[arm] / "iter_1" / "pairs.jsonl")
            row["pairs"] = len(pairs)
            row["evolved_pairs"] = sum(p["source"] == "evolved" for p in pairs)
        if opts.ifeval:
            official = official_ifeval(folders[arm], opts.ifeval, opts)
            row["ifeval_prompt_level"] = official["prompt_level"]
            row["ifeval_instruction_level"] = official["instruction_level"]
        rows[arm] = row
    return rows


def summarize(results: dict, opts) -> str:
    def mean_sd(values):
        values = np.array(values, dtype=float)
        return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0:.3f}"

    keys = [("instruction_level", "held-out instr."), ("prompt_level", "held-out prompt")]
    if opts.ifeval:
        keys += [("ifeval_instruction_level", "IFEval instr."), ("ifeval_prompt_level", "IFEval prompt")]
    lines = ["| loss | arm | seeds | " + " | ".join(label for _, label in keys) + " | win rate vs iter 0 |",
             "|---|---|---|" + "---|" * len(keys) + "---|"]
    for loss in opts.losses:
        runs = [results[k] for k in results if k.startswith(loss + "_")]
        for arm in ("iter0", "baseline", "eva"):
            cells = [mean_sd([r[arm][k] for r in runs]) for k, _ in keys]
            wins = [r[arm]["win_rate_vs_iter0"]["win_rate"] for r in runs if "win_rate_vs_iter0" in r[arm]]
            win = mean_sd(wins) if wins else "-"
            if len(runs) == 1 and wins:
                w = runs[0][arm]["win_rate_vs_iter0"]
                win = f"{w['win_rate']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"
            lines.append(f"| {loss} | {arm} | {len(runs)} | " + " | ".join(cells) + f" | {win} |")
        if len(runs) > 1:  # seeds share their iteration-0 solver, so the per-seed difference is the sharper test
            cells = [mean_sd([r["eva"][k] - r["baseline"][k] for r in runs]) for k, _ in keys]
            wins = [r["eva"]["win_rate_vs_iter0"]["win_rate"] - r["baseline"]["win_rate_vs_iter0"]["win_rate"]
                    for r in runs]
            lines.append(f"| {loss} | eva - baseline, per seed | {len(runs)} | " + " | ".join(cells) +
                         f" | {mean_sd(wins)} |")
    return "\n".join(lines)


def plot(results: dict, opts, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6))
    arms = ("iter0", "baseline", "eva")
    for k, loss in enumerate(opts.losses):
        runs = [results[key] for key in results if key.startswith(loss + "_")]
        for a, arm in enumerate(arms):
            values = [r[arm]["instruction_level"] for r in runs]
            x = k * (len(arms) + 1) + a
            ax.bar(x, np.mean(values), color=f"C{a}", label=arm if k == 0 else None)
            ax.scatter([x] * len(values), values, color="k", s=10, zorder=3)
    ax.set_xticks([k * (len(arms) + 1) + 1 for k in range(len(opts.losses))], opts.losses)
    ax.set(ylabel="held-out instruction-level accuracy", title="eva vs ordinary iteration (dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for every run and the results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the DPO comparison")
    parser.add_argument("--losses", nargs="+", default=["dpo"], help="losses (the first with every seed, the others "
                                                                      "with the first seed)")
    parser.add_argument("--pairs", type=int, default=48, help="training pairs per iteration, the same in both arms")
    parser.add_argument("--heldout", default=str(ROOT / "data" / "heldout_prompts.jsonl"))
    parser.add_argument("--ifeval", default="", help="an IFEval-format file to evaluate every final solver on")
    parser.add_argument("--ifeval_limit", type=int, default=0, help="only the first K prompts of --ifeval")
    parser.add_argument("--ifeval_max_new_tokens", type=int, default=128)
    parser.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="passed on to train_eva.py")
    opts = parser.parse_args()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    heldout_path = opts.heldout
    if "--heldout_prompts" in opts.train_args:
        heldout_path = opts.train_args[opts.train_args.index("--heldout_prompts") + 1]
    heldout = {}
    for r in files.read_jsonl(heldout_path):
        r.setdefault("id", r.get("key"))
        heldout[str(r["id"])] = r
    start = time.time()
    results = {}
    jobs = [(opts.losses[0], s) for s in opts.seeds] + [(loss, opts.seeds[0]) for loss in opts.losses[1:]]
    for loss, seed in jobs:
        folders = run_arms(out, seed, loss, opts)
        results[f"{loss}_seed{seed}"] = measure(folders, heldout, opts)
    table = summarize(results, opts)
    minutes = (time.time() - start) / 60
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(f"{table}\n\n(wall time of this invocation: {minutes:.1f} min)\n")
    plot(results, opts, out / "results.png")
    print(table)
    print(f"wall time {minutes:.1f} min; results in {out}/results.md")


if __name__ == "__main__":
    main()
