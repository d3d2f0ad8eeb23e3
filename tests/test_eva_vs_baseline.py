"""Smoke version of the eva-vs-baseline benchmark (issue 10): both arms from one iteration-0 run, on a tiny model."""
import json
import subprocess
import sys

from conftest import ROOT
from test_train_eva import TINY_PROMPTS, write_prompts


def test_both_arms_share_iteration_zero_and_train_equally(tmp_path, tiny_llama_dir):
    prompts = write_prompts(tmp_path / "prompts.jsonl", TINY_PROMPTS)
    heldout = write_prompts(tmp_path / "heldout.jsonl", TINY_PROMPTS[:3])
    out = tmp_path / "compare"
    subprocess.run([sys.executable, str(ROOT / "bench" / "eva_vs_baseline.py"), "--out", str(out), "--seeds", "0",
                    "--pairs", "4", "--train_args", "--preset", "smoke", "--model", str(tiny_llama_dir),
                    "--seed_prompts", prompts, "--heldout_prompts", heldout, "--lr", "1e-3"],
                   check=True, cwd=ROOT, timeout=600, capture_output=True)
    results = json.loads((out / "results.json").read_text())["dpo_seed0"]
    assert results["baseline"]["pairs"] == results["eva"]["pairs"] == 4, "both arms train on --pairs pairs"
    assert results["baseline"]["evolved_pairs"] == 0
    for arm in ("baseline", "eva"):
        w = results[arm]["win_rate_vs_iter0"]
        assert 0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1
        # both arms start from the very same iteration-0 adapter
        assert (out / "dpo_seed0" / arm / "iter_0" / "adapter").is_dir()
    base_adapter = (out / "dpo_seed0" / "iter0" / "iter_0" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (out / "dpo_seed0" / "eva" / "iter_0" / "adapter" / "adapter_model.safetensors").read_bytes() == base_adapter
    assert (out / "dpo_seed0" / "eva" / "iter_1" / "evolved.jsonl").exists()
    assert not (out / "dpo_seed0" / "baseline" / "iter_1" / "evolved.jsonl").exists()
    assert (out / "results.md").read_text().count("| dpo |") == 3
    assert (out / "results.png").stat().st_size > 0


def test_table_has_the_per_seed_difference_of_the_arms():
    import argparse
    import importlib.util
    spec = importlib.util.spec_from_file_location("eva_vs_baseline", ROOT / "bench" / "eva_vs_baseline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def arm(instruction, prompt, win=None):
        row = dict(instruction_level=instruction, prompt_level=prompt)
        if win is not None:
            row["win_rate_vs_iter0"] = dict(win_rate=win, ci_low=0.0, ci_high=1.0)
        return row

    results = {f"dpo_seed{s}": dict(iter0=arm(0.4, 0.2), baseline=arm(0.40 + s / 10, 0.2, 0.5),
                                    eva=arm(0.45 + s / 10, 0.1 + s / 10, 0.6 + s / 10)) for s in (0, 1)}
    table = bench.summarize(results, argparse.Namespace(losses=["dpo"], ifeval=""))
    paired = [line for line in table.splitlines() if "eva - baseline" in line]
    assert len(paired) == 1, table
    cells = [c.strip() for c in paired[0].split("|")[1:-1]]
    # instruction level: +0.05 in both seeds; prompt level: -0.1 and 0.0; win rate: +0.1 and +0.2
    assert cells[3] == "0.050 ± 0.000" and cells[4] == "-0.050 ± 0.071" and cells[5] == "0.150 ± 0.071", cells
