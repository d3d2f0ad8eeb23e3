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
