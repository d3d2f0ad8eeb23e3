"""Smoke version of the eva-vs-baseline benchmark: the arms from one iteration-0 run, several iterations, tiny model."""
import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

from conftest import ROOT
from test_train_eva import TINY_PROMPTS, write_prompts


def load_bench():
    spec = importlib.util.spec_from_file_location("eva_vs_baseline", ROOT / "bench" / "eva_vs_baseline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_arms_share_iteration_zero_train_equally_and_are_scored_every_iteration(tmp_path, tiny_llama_dir):
    prompts = write_prompts(tmp_path / "prompts.jsonl", TINY_PROMPTS)
    heldout = write_prompts(tmp_path / "heldout.jsonl", TINY_PROMPTS[:3])
    out = tmp_path / "compare"
    subprocess.run([sys.executable, str(ROOT / "bench" / "eva_vs_baseline.py"), "--out", str(out), "--seeds", "0", "1",
                    "--iterations", "2", "--workers", "2", "--pairs", "4", "--eval_max_new_tokens", "8",
                    "--ifeval", heldout, "--ifeval_max_new_tokens", "8",
                    "--train_args", "--preset", "smoke", "--model", str(tiny_llama_dir),
                    "--seed_prompts", prompts, "--heldout_prompts", heldout, "--lr", "1e-3"],
                   check=True, cwd=ROOT, timeout=900, capture_output=True)
    results = json.loads((out / "results.json").read_text())
    for k in ("1", "2"):
        for s in ("0", "1"):
            base, eva = results["baseline"][k][s], results["eva"][k][s]
            assert base["pairs"] == eva["pairs"] == 4, "every arm trains on --pairs pairs"
            assert base["evolved_pairs"] == 0
            assert 0 <= eva["win_rate_vs_iter0"] <= 1
    assert "ifeval_prompt_level" in results["eva"]["2"]["0"] and "ifeval_prompt_level" not in results["eva"]["1"]["0"]
    base_adapter = (out / "iter0" / "iter_0" / "adapter" / "adapter_model.safetensors").read_bytes()
    for s in (0, 1):
        for arm in ("baseline", "eva"):
            folder = out / f"seed{s}" / arm
            assert (folder / "iter_0" / "adapter" / "adapter_model.safetensors").read_bytes() == base_adapter
            assert (folder / "eval_iter1.json").exists() and (folder / "eval_iter2.json").exists()
        assert (out / f"seed{s}" / "eva" / "iter_2" / "evolved.jsonl").exists()
        assert not (out / f"seed{s}" / "eva" / "iter_2" / "done_creator").exists()
        assert not (out / f"seed{s}" / "baseline" / "iter_2" / "evolved.jsonl").exists()
    # the seeds really differ: their eva arms evolved different children
    evolved = [(out / f"seed{s}" / "eva" / "iter_1" / "evolved.jsonl").read_text() for s in (0, 1)]
    assert evolved[0] != evolved[1]
    table = (out / "results.md").read_text()
    assert table.count("eva - baseline") == 2 and "eva_learns" not in table and "IFEval avg" in table
    assert "| 2 | eva | 2 |" in table and "children's info" in table
    assert (out / "results.png").stat().st_size > 0


def test_the_learning_creator_is_a_third_arm_on_request():
    """--learning_creator adds eva_learns: eva's flags and --creator_learns (its runs are tests/test_creator_rl's)."""
    bench = load_bench()
    assert bench.arms(SimpleNamespace(learning_creator=False)) == ["baseline", "eva"]
    assert bench.arms(SimpleNamespace(learning_creator=True)) == ["baseline", "eva", "eva_learns"]
    assert bench.ARM_FLAGS["eva_learns"] == [*bench.ARM_FLAGS["eva"], "--creator_learns"]


def test_table_has_the_per_seed_difference_with_a_t_interval():
    bench = load_bench()

    def row(instruction, prompt, win=0.5):
        return dict(instruction_level=instruction, prompt_level=prompt, win_rate_vs_iter0=win)

    results = {"iter0": {0: {0: row(0.4, 0.2), 1: row(0.4, 0.2)}},
               "baseline": {1: {s: row(0.40 + s / 10, 0.2, 0.5) for s in (0, 1)}},
               "eva": {1: {s: row(0.45 + s / 10, 0.1 + s / 10, 0.6 + s / 10) for s in (0, 1)}}}
    table = bench.summarize(results)
    paired = [line for line in table.splitlines() if "eva - baseline" in line]
    assert len(paired) == 1, table
    cells = [c.strip() for c in paired[0].split("|")[1:-1]]
    # instruction level: +0.05 in both seeds (no spread); prompt level: -0.1 and 0.0, sd 0.0707, t(1) 12.706
    assert cells[3] == "+0.050 [+0.050, +0.050]", cells
    assert cells[4] == "-0.050 [-0.685, +0.585]", cells
    assert cells[5] == "+0.150 [-0.485, +0.785]", cells
    # under --summarize a seed not yet finished by every arm is left out of that iteration's rows
    results["eva_learns"] = {1: {0: row(0.5, 0.3)}}
    table = bench.summarize(results)
    assert "| 1 | eva_learns | 1 |" in table and "| 1 | **eva - baseline** | 1 | +0.050 |" in table, table


def test_online_comparison_runs_both_arms_with_equal_rollouts(tmp_path, tiny_llama_dir):
    prompts = write_prompts(tmp_path / "prompts.jsonl", TINY_PROMPTS)
    heldout = write_prompts(tmp_path / "heldout.jsonl", TINY_PROMPTS[:3])
    out = tmp_path / "online"
    subprocess.run([sys.executable, str(ROOT / "bench" / "online_vs_rloo.py"), "--out", str(out), "--seeds", "0", "1",
                    "--workers", "2", "--eval_max_new_tokens", "8", "--ifeval", heldout, "--ifeval_max_new_tokens",
                    "8", "--start_model", str(tiny_llama_dir),
                    "--train_args", "--preset", "smoke", "--model", str(tiny_llama_dir), "--seed_prompts", prompts,
                    "--heldout_prompts", heldout, "--online_steps", "4", "--online_prompts", "4",
                    "--micro_batch_size", "2", "--evolve_every", "2", "--evolve_depth", "1",
                    "--creator_max_new_tokens", "16", "--lr", "1e-3"],
                   check=True, cwd=ROOT, timeout=900, capture_output=True)
    results = json.loads((out / "results.json").read_text())
    for s in ("0", "1"):
        rloo, eva = results["rloo"][s], results["eva"][s]
        assert len(rloo["rewards"]) == len(eva["rewards"]) == 4, "both arms take the same number of steps"
        assert rloo["evolved_drawn"] == 0 and rloo["pool"] == len(TINY_PROMPTS)
        assert eva["pool"] >= len(TINY_PROMPTS)
        assert 0 <= eva["win_rate_vs_start"] <= 1 and "ifeval_average" in eva
    assert "ifeval_average" in results["start"]
    config = json.loads((out / "seed1" / "rloo" / "config.json").read_text())
    assert config["online"] and config["evolve_every"] == 0 and config["seed"] == 1
    for s in ("0", "1"):  # one creator round (at step 2 of 4); its children are the pool's growth
        assert results["rloo"][s]["rounds"] == {}
        assert sum(r["children"] for r in results["eva"][s]["rounds"].values()) == results["eva"][s]["pool"] - len(TINY_PROMPTS)
    table = (out / "results.md").read_text()
    assert "eva - rloo" in table and "| start |" in table and "children's info" in table
    assert (out / "results.png").stat().st_size > 0


def test_online_rounds_set_children_against_their_parents(tmp_path):
    """A hand-made final pool: a near-copy child, a new task, a constraint-step child, a child never drawn."""
    spec = importlib.util.spec_from_file_location("online_vs_rloo", ROOT / "bench" / "online_vs_rloo.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pool = [dict(id="a", prompt="Write a poem about the sea.", parent=None, info=0.8, last_step=6),
            dict(id="b", prompt="Explain how tides work.", parent=None, info=0.4, last_step=5),
            dict(id="c", prompt="List three fruits.", parent=None, info=0.0, last_step=2),
            dict(id="a.1", prompt="Write a poem about the sea!", parent="a", method="deepen", iteration=1,
                 info=0.5, last_step=8),
            dict(id="b.1", prompt="Describe a desert market at dawn.", parent="b", method="shift_in_domain",
                 iteration=1, info=0.1, last_step=9),
            dict(id="b.2", prompt="Explain how tides work. Use no commas.", parent="b", method="add_constraints",
                 iteration=1, info=None, last_step=None),
            dict(id="a.1.1", prompt="Write a sonnet about a storm at sea.", parent="a.1", method="deepen",
                 iteration=2, info=None, last_step=None)]
    bench.files.write_jsonl(tmp_path / "pool.jsonl", pool)
    bench.files.write_jsonl(tmp_path / "metrics.jsonl", [dict(step=6, phase="evolve", round=1, creator=dict(
        creator_reward=0.25)), dict(step=12, phase="evolve", round=2)])
    rounds = bench.children_vs_parents(tmp_path)
    one, two = rounds[1], rounds[2]
    assert one["children"] == 3 and one["drawn"] == 2
    assert abs(one["child_info"] - 0.3) < 1e-9, "the two drawn children; b.2 was never drawn"
    assert abs(one["parent_info"] - 0.6) < 1e-9 and abs(one["seed_info"] - 0.4) < 1e-9
    assert one["near_copy"] == 0.5, "a.1 copies a, b.1 does not; b.2 (constraint step) is not counted"
    assert one["creator_reward"] == 0.25 and two["creator_reward"] is None
    assert two["children"] == 1 and two["drawn"] == 0 and two["child_info"] is None and two["parent_info"] == 0.5
    results = {"rloo": {0: {"rounds": {}}}, "eva": {0: {"rounds": rounds}, 1: {"rounds": {1: dict(one, near_copy=0.0)}}}}
    table = bench.evolution_table(results)
    assert "| 1 | eva | 2 | 3 (2) | 0.300 | 0.600 | 0.400 | 25% | 0.250 |" in table, table
    assert "| 2 | eva | 1 | 1 (0) | - | 0.500 | 0.400 | 0% | - |" in table, table


def test_children_are_set_against_their_parents_and_the_pool(tmp_path):
    """Hand-made iteration: two parents, a near-copy child, a new task, a constraint-step child, a grandchild."""
    bench = load_bench()
    files = bench.files
    parent_a = dict(id="a", prompt="Write a poem about the sea. Use no commas.", task="Write a poem about the sea.")
    parent_b = dict(id="b", prompt="Explain how tides work.", task="Explain how tides work.")
    other = dict(id="c", prompt="List three fruits.")
    children = [dict(id="a.1", parent="a", method="deepen", task="Write a poem about the sea!"),  # near-copy
                dict(id="a.2", parent="a.1", method="shift_in_domain", task="Describe a desert market at dawn."),
                dict(id="b.1", parent="b", method="add_constraints", task="Explain how tides work.")]
    for c in children:
        c["prompt"] = c["task"]
    files.write_jsonl(tmp_path / "selected.jsonl", [parent_a, parent_b])
    files.write_jsonl(tmp_path / "evolved.jsonl", children)
    files.write_jsonl(tmp_path / "samples.jsonl", [
        dict(prompt_id="a", rewards=[0.0, 1.0], info=1.0), dict(prompt_id="b", rewards=[0.5, 1.0], info=0.5),
        dict(prompt_id="c", rewards=[1.0, 1.0], info=0.0)])
    files.write_jsonl(tmp_path / "evolved_samples.jsonl", [
        dict(prompt_id="a.1", rewards=[0.0, 0.5], info=0.5), dict(prompt_id="a.2", rewards=[1.0, 1.0], info=0.0),
        dict(prompt_id="b.1", rewards=[0.0, 0.25], info=0.25)])
    row = bench.children_vs_parents(tmp_path)
    assert row["parent_info"] == 0.75 and row["pool_info"] == 0.5 and row["child_info"] == 0.25
    assert row["parent_reward"] == (0.5 + 0.75) / 2 and row["child_reward"] == (0.25 + 1.0 + 0.125) / 3
    assert row["near_copy"] == 0.5, "of the two rewritten tasks, a.1 copies a; b.1 (constraint step) is not counted"
    results = {"iter0": {0: {0: {}}}, "baseline": {1: {0: {}}}, "eva": {1: {0: row, 1: dict(row, near_copy=0.0)}}}
    table = bench.evolution_table(results)
    assert "| 1 | eva | 2 | 0.250 | 0.750 | 0.500 | 0.458 (0.625) | 25% |" in table, table
