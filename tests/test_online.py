"""Online eva (online.py) on a tiny random Llama with the rules reward: the loop runs and writes its files, a creator
round adds children to the pool, a run killed after a checkpoint resumes to the uninterrupted result, and 2 gloo
ranks reproduce 1 process. Bad online flags are refused before anything loads.

    python -m pytest tests/test_online.py -q       # about two minutes on 2 free CPU cores
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_train_eva import TINY_PROMPTS, write_prompts

import config
import model
import online
import solver as solver_lib
import train_eva

# 4 steps of 4 prompts x 2 samples of 16 tokens (shorter ones all tie under TINY_PROMPTS); a creator round after
# step 2 (one child per parent); LoRA dropout, so that a resumed run needs the checkpoint's RNG state to land on the
# same weights.
ARGS = ["--online", "--preset", "smoke", "--online_steps", "4", "--online_prompts", "4", "--micro_batch_size", "2",
        "--evolve_every", "2", "--evolve_depth", "1", "--creator_max_new_tokens", "16",
        "--lr", "1e-3", "--lora_dropout", "0.1", "--heldout_prompts", ""]


def args_for(tmp_path: Path, model: Path, *extra: str) -> list[str]:
    prompts = write_prompts(tmp_path / "prompts.jsonl", TINY_PROMPTS)
    return [*ARGS, "--model", str(model), "--seed_prompts", prompts, *extra]


def steps(run: Path) -> list[dict]:
    return [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward" in m]


def test_loop_runs_evolves_and_writes_its_files(tmp_path, tiny_llama_dir):
    heldout = write_prompts(tmp_path / "heldout.jsonl", TINY_PROMPTS[:2])
    run = tmp_path / "run"
    train_eva.main(args_for(tmp_path, tiny_llama_dir, "--heldout_prompts", heldout, "--run_dir", str(run),
                            "--online_algo", "grpo", "--online_kl", "0.04", "--creator_learns"))
    for name in ["config.json", "metrics.jsonl", "online_state.pt", "pool.jsonl", "eval_start.json", "eval_end.json",
                 "report.md", "report.png", "adapter/adapter_config.json"]:
        assert (run / name).is_file(), f"missing {name}"
    records = steps(run)
    assert [m["step"] for m in records] == [1, 2, 3, 4]
    for m in records:
        assert 0 <= m["reward"] <= 1 and m["info"] >= 0 and m["gen_seconds"] > 0 and m["update_seconds"] > 0
        assert np.isfinite(m["kl"]) and np.isfinite(m["loss"])  # kl: a sample mean of log pi - log ref, any sign
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5), "step 1's policy is the reference"
    rounds = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if m.get("phase")]
    assert len(rounds) == 1 and rounds[0]["step"] == 2, "one creator round, after step 2 (none after the last)"
    learned = rounds[0]["creator"]  # --creator_learns: the creator's own round came first, on the same parents
    assert learned["rewrites"] == config.Config().creator_group * rounds[0]["parents"] and -1 <= learned["creator_reward"] <= 1
    pool = [json.loads(line) for line in (run / "pool.jsonl").read_text().splitlines()]
    children = [r for r in pool if r.get("parent") is not None]
    assert children and len(pool) == len(TINY_PROMPTS) + len(children) == rounds[0]["pool"]
    assert all(c["iteration"] == 1 and c["parent"] in {r["id"] for r in pool} for c in children)
    # the untried children are drawn first: step 3 takes round(4 * 0.8) = 3 evolved prompts
    assert records[2]["evolved"] == min(3, len(children)) and records[1]["evolved"] == 0
    assert records[2]["pool"] == len(pool)
    # every prompt drawn has its latest max - mean recorded
    assert sum(r["info"] is not None for r in pool) >= 8
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "the adapter never moved"
    assert "held-out" in (run / "report.md").read_text()
    assert "| 1 (step 2) | 16 |" in (run / "report.md").read_text(), "the learning creator's round, reported"


def test_draw_batch_takes_untried_first_then_by_info():
    pool = [{"id": f"o{i}", "parent": None} for i in range(6)] + [{"id": f"e{i}", "parent": "o0"} for i in range(4)]
    info = {"o0": 0.5, "o1": 0.0, "o2": 0.9, "o3": 0.1, "o4": 0.2, "e0": 0.3, "e1": 0.0}
    chosen = online.draw_batch(pool, info, 5, 0.8, seed=0)
    ids = [pool[i]["id"] for i in chosen]
    assert len(ids) == 5 and sum(i.startswith("e") for i in ids) == 4
    assert set(ids[:2]) == {"e2", "e3"}, "never-tried evolved prompts come first"
    assert ids[2] == "e0" and ids[3] == "e1", "then by info; info 0 last"
    assert ids[4] == "o5", "the one never-tried original prompt"
    assert online.draw_batch(pool, info, 5, 0.8, seed=0) == chosen, "seeded"
    # over many seeds the higher-info original prompt is drawn more often
    counts = {k: 0 for k in ("o2", "o3")}
    for seed in range(300):
        first = pool[online.draw_batch(pool, {**info, "o5": 0.0}, 2, 0.5, seed)[-1]]["id"]
        counts[first] = counts.get(first, 0) + 1
    assert counts["o2"] > counts["o3"] > 0


def run_cli(cwd: Path, args: list[str], kill_at: str | None = None, ranks: int = 1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # the same float sums every time
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    # tests/faulty_run.py: train_eva.py with a hook that SIGKILLs the process at rundir.fault's point `kill_at`
    script = [str(ROOT / "train_eva.py")]
    if kill_at:
        script = [str(ROOT / "tests" / "faulty_run.py"), "--kill_at", kill_at, "--"]
    cwd.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, *launcher, *script, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, code: int = 0) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}:\n{out[-2000:]}\n{err[-4000:]}"


def test_resume_after_kill_equals_uninterrupted(tmp_path, tiny_llama_dir):
    # the learning creator on a base of its own (--creator <folder>): its adapter and optimizer resume too
    args = args_for(tmp_path, tiny_llama_dir, "--save_every", "1", "--creator_learns", "--creator", str(tiny_llama_dir))
    whole = run_cli(tmp_path / "whole", [*args, "--run_dir", "run"])
    killed = run_cli(tmp_path / "killed", [*args, "--run_dir", "run"], kill_at="0:online:3")
    finish(killed, -9)  # SIGKILL right after the step-3 checkpoint, the creator round of step 2 inside it
    state = torch.load(tmp_path / "killed" / "run" / "online_state.pt", weights_only=False)
    assert state["step"] == 3 and len(state["pool"]) > len(TINY_PROMPTS)
    assert state["creator"]["at"] == 1 and state["creator"]["weights"], "the learning creator's state is saved too"
    # as if the kill had come later, after step 4 and a creator round were logged but before their checkpoint, and
    # had torn its last line: the resume must drop them, not log step 4 twice
    with open(tmp_path / "killed" / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward": 99.0}\n{"step": 4, "phase": "creator", "round": 9}\n{"step": 5, "rew')
    finish(run_cli(tmp_path / "killed", [*args, "--run_dir", "run"]))
    finish(whole)
    a, b = tmp_path / "whole" / "run", tmp_path / "killed" / "run"
    records = lambda run: [(m.get("step"), m.get("phase")) for m in map(json.loads, (run / "metrics.jsonl").open())]
    assert records(b) == records(a), "each step and creator round logged once, as in the uninterrupted run"
    assert (a / "pool.jsonl").read_text() == (b / "pool.jsonl").read_text()
    wa, wb = (load_file(x / "adapter" / "adapter_model.safetensors") for x in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    last = lambda run: {m["step"]: m for m in steps(run)}
    for key in ("reward", "loss", "info", "pool", "evolved"):
        assert [m[key] for m in last(a).values()] == [m[key] for m in last(b).values()], key


def test_two_ranks_equal_one(tmp_path, tiny_llama_dir):
    args = args_for(tmp_path, tiny_llama_dir, "--online_steps", "2", "--evolve_every", "1", "--lora_dropout", "0")
    procs = [run_cli(tmp_path / "one", [*args, "--run_dir", "run"]),
             run_cli(tmp_path / "two", [*args, "--run_dir", "run"], ranks=2)]
    for proc in procs:
        finish(proc)
    one, two = steps(tmp_path / "one" / "run"), steps(tmp_path / "two" / "run")
    # step 1: the same samples and rewards (seeded per prompt, sharded), the same loss and KL up to summation order
    assert one[0]["reward"] == two[0]["reward"] and one[0]["info"] == two[0]["info"]
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-5, abs=1e-7)
    assert one[0]["grad_norm"] == pytest.approx(two[0]["grad_norm"], rel=1e-4)
    wa, wb = (load_file(tmp_path / x / "run" / "adapter" / "adapter_model.safetensors") for x in ("one", "two"))
    for k in wa:
        err = ((wa[k].double() - wb[k].double()).norm() / wa[k].double().norm().clamp(min=1e-12)).item()
        assert err <= 1e-3, f"{k} differs by {err:.1e} between 1 and 2 ranks"
    assert one[1]["pool"] == two[1]["pool"] > len(TINY_PROMPTS), "the creator round ran on both"


def test_full_fine_tuning_fsdp_two_ranks_equal_one_and_resume(tmp_path, tiny_llama_dir):
    """Online full fine-tuning sharded with FSDP2 (masters and the reference) on 2 ranks: its first step equals one
    unsharded process, and a run killed after the step-2 checkpoint (each rank's shards of weights and optimizer)
    resumes to the weights of an uninterrupted sharded run."""
    args = args_for(tmp_path, tiny_llama_dir, "--no-lora", "--online_steps", "3", "--save_every", "1", "--lr", "1e-4",
                    "--run_dir", "run")
    procs = [run_cli(tmp_path / "one", args), run_cli(tmp_path / "two", [*args, "--fsdp"], ranks=2),
             run_cli(tmp_path / "killed", [*args, "--fsdp"], kill_at="0:online:2", ranks=2)]
    finish(procs[0]), finish(procs[1])
    out, err = procs[2].communicate(timeout=600)
    assert procs[2].returncode != 0, "the killed run finished"
    state = torch.load(tmp_path / "killed" / "run" / "online_state.pt", weights_only=False)
    assert state["step"] == 2 and state["weights"] is None and (tmp_path / "killed" / "run" / state["shards"]).is_dir()
    finish(run_cli(tmp_path / "killed", [*args, "--fsdp"], ranks=2))
    one, two, resumed = (steps(tmp_path / x / "run") for x in ("one", "two", "killed"))
    assert one[0]["reward"] == two[0]["reward"]
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-5, abs=1e-7)
    assert one[0]["grad_norm"] == pytest.approx(two[0]["grad_norm"], rel=1e-4)
    assert [m["loss"] for m in resumed if m["step"] == 3] == pytest.approx([two[2]["loss"]], rel=1e-5, abs=1e-7)
    start = load_file(tiny_llama_dir / "model.safetensors")
    wa, wb, wc = (load_file(tmp_path / x / "run" / "model" / "model.safetensors") for x in ("one", "two", "killed"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(wb[name], start[name]), "the sharded run did not train"
    err = lambda x, y: ((x.double() - y.double()).norm() / x.double().norm().clamp(min=1e-12)).item()
    for k in wa:  # Adam turns summation-order noise into small step differences: bounded by the steps' own size
        assert err(wa[k], wb[k]) <= min(1e-3, 0.05 * err(wa[k], start[k])), f"{k}: 1 vs 2 ranks {err(wa[k], wb[k]):.1e}"
        assert err(wb[k], wc[k]) <= 1e-6, f"{k}: resumed differs from uninterrupted by {err(wb[k], wc[k]):.1e}"
    assert not list((tmp_path / "killed" / "run").glob("online_state.pt.step[12]")), "old shard folders remain"


def test_off_policy_iterations_need_grpo(tmp_path):
    with pytest.raises(ValueError, match="--online_algo grpo"):
        config.parse_config(["--online", "--grpo_iterations", "2"])


def test_packed_token_logps_equal_a_plain_forward_per_response(tiny_llama_dir):
    policy, _ = model.load_model(str(tiny_llama_dir))
    rows = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14, 15]), ([3], [4])]
    cfg = config.parse_config(["--preset", "smoke", "--vocab_chunk", "7"])
    batch = solver_lib.collate_responses(rows, "cpu")
    assert batch["response_mask"].sum(-1).tolist() == [2, 4, 1]
    with model.packed_training(policy):
        got = solver_lib.response_logps(policy, batch, cfg)  # [3, 4]
        got.sum().backward()
    assert got.shape == (3, 4)
    for b, (prompt, response) in enumerate(rows):
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([prompt + response])).logits[0]  # [T, V]
        want = logits[len(prompt) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        assert torch.allclose(got[b, :len(response)].detach(), want, atol=1e-5), b
        assert torch.all(got[b, len(response):] == 0)
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
