"""The learning creator (creator_rl.py): its reward on hand-made children, an RLOO step that moves only the creator's
adapter, and its state resuming to the same next step. The killed-and-resumed loop with --creator_learns is in
tests/test_resume.py.

    python -m pytest tests/test_creator_rl.py -q
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import config
import creator_rl
import files
import model
import rundir
from conftest import ROOT

PARENT = "Write a short poem about the sea at night."


def reward_of(valid=True, rewards=(0.0, 1.0, 0.0, 1.0), child="Explain why the tides rise twice a day, for a child.",
              **kw):
    return creator_rl.creator_reward(valid, list(rewards), PARENT, child, **{"lo": 0.0, "hi": 1.0, **kw})


def test_creator_reward_on_hand_made_children():
    informative = reward_of()
    assert informative["reward"] == pytest.approx(1.0) and not informative["near_copy"]  # gap 1, solved half the time
    invalid = reward_of(valid=False)
    assert invalid["reward"] == -1.0 and invalid["info"] is None
    assert reward_of(rewards=(1, 1, 1, 1))["reward"] == 0.0  # all solved: nothing to learn
    assert reward_of(rewards=(0, 0, 0, 0))["reward"] == 0.0  # never solved: nothing to learn either
    near = reward_of(child=PARENT.replace("short ", ""))  # an informative near-copy of its parent
    assert near["near_copy"] and near["similarity"] >= 0.6
    assert near["reward"] == pytest.approx(1.0 - 1.0)  # i * u minus the copy penalty
    mostly = reward_of(rewards=(1, 1, 1, 0))  # solved 3 times in 4: informative but too easy to be ideal
    assert 0 < mostly["reward"] < informative["reward"]
    assert mostly["uncertainty"] == pytest.approx(0.5) and mostly["success"] == pytest.approx(0.75)
    assert invalid["reward"] < near["reward"] <= reward_of(rewards=(1, 1, 1, 1))["reward"] < informative["reward"]


def test_creator_reward_scales_a_reward_model_range_and_skips_missing_rewards():
    # a reward model's scores in [-4, 4]: a gap of 4 is half the range, a mean of 0 is success 1/2
    r = reward_of(rewards=(-2.0, 2.0, float("nan")), lo=-4.0, hi=4.0)
    assert r["info"] == pytest.approx(0.5) and r["success"] == pytest.approx(0.5)
    assert r["reward"] == pytest.approx(0.5)
    assert reward_of(rewards=(float("nan"), 1.0))["reward"] == 0.0  # one reward: no gap to credit
    assert reward_of(rewards=(0, 1), copy_penalty=0.25, child=PARENT)["reward"] == pytest.approx(0.75)


def creator_setup(tiny_llama_dir, seed: int = 0, own_base: bool = False):
    """(cfg, solver with a non-zero adapter, tokenizer, learner): the creator's adapter on the solver's base, or on a
    model of its own (own_base: a second copy of the tiny model, as --creator <folder> loads it)."""
    cfg = config.parse_config(["--preset", "smoke", "--creator_learns", "--lora_r", "4", "--creator_lr", "1e-2",
                               "--seed", str(seed)])
    m, tokenizer = model.load_model(str(tiny_llama_dir))
    torch.manual_seed(0)
    m = model.add_lora(m, r=4)
    with torch.no_grad():  # a solver adapter that is not zero, so that leaving it alone is visible
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    m.eval()
    creator_lm = model.load_model(str(tiny_llama_dir)) if own_base else (None, None)
    return cfg, m, tokenizer, creator_rl.attach(m, tokenizer, cfg, *creator_lm)


ASKED = [(None, "concretise", "Request: write a poem\nNew request:"), (None, "reasoning", "Request: add 2 and 3\nNew "
                                                                                         "request:")]
REWARDS = torch.tensor([[1.0, -1.0, 0.0, 0.5], [0.0, 0.0, 1.0, -1.0]])  # [P, k]


def rollouts(tokenizer):
    """Four rewrites per message, as token ids (different lengths)."""
    return [[tokenizer(" " + "x y z" * (j + 1)).input_ids[:2 + j] for j in range(4)] for _ in ASKED]


def weights(m, adapter: str | None) -> dict[str, torch.Tensor]:
    """The LoRA weights of one adapter (None: the base's own weights)."""
    if adapter is None:
        return {n: p.detach().clone() for n, p in m.named_parameters() if "lora_" not in n}
    return {n: p.detach().clone() for n, p in m.named_parameters() if f".{adapter}." in n}


def test_creator_update_moves_only_the_creator_adapter(tiny_llama_dir, tmp_path):
    cfg, m, tokenizer, learner = creator_setup(tiny_llama_dir)
    before = {a: weights(m, a) for a in ("default", "creator", None)}
    ids = tokenizer("Name three rivers.", return_tensors="pt").input_ids
    with torch.no_grad():
        solver_logits = m(ids).logits
    stats = creator_rl._update(learner, ASKED, rollouts(tokenizer), REWARDS, cfg)
    assert math.isfinite(stats["creator_loss"]) and stats["creator_grad_norm"] > 0
    after = {a: weights(m, a) for a in ("default", "creator", None)}
    assert any(not torch.equal(before["creator"][n], after["creator"][n]) for n in after["creator"])
    for adapter in ("default", None):
        assert all(torch.equal(before[adapter][n], after[adapter][n]) for n in after[adapter]), adapter
    assert m.active_adapters == ["default"] and all(  # back to the solver, which answers as before
        p.requires_grad == (".default." in n) for n, p in m.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, solver_logits, atol=0, rtol=0)
    model.save_adapter(m, tmp_path / "adapter", "base")  # the solver's adapter folder holds the solver's only
    saved = tmp_path / "adapter"
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "creator").exists()


def test_a_creator_of_its_own_base_learns_apart_from_the_solver(tiny_llama_dir, tmp_path):
    """--creator <model> --creator_learns: the adapter sits on the creator's own base; an update moves that adapter
    only (the solver and the creator's base as they were), the creator model itself now speaks through it, and its
    state comes back into a fresh learner."""
    assert config.parse_config(["--creator_learns", "--creator", str(tiny_llama_dir), "--no-lora"]).creator_learns
    cfg, m, tokenizer, learner = creator_setup(tiny_llama_dir, own_base=True)
    own = learner["model"]
    assert own is not m and not learner["shared"] and "creator" not in m.peft_config
    solver_before, base_before = weights(m, None) | weights(m, "default"), weights(own, None)
    ids = tokenizer("Name three rivers.", return_tensors="pt").input_ids
    with torch.no_grad():
        creator_logits = own(ids).logits
    creator_rl._update(learner, ASKED, rollouts(tokenizer), REWARDS, cfg)
    assert all(torch.equal(solver_before[n], p) for n, p in (weights(m, None) | weights(m, "default")).items())
    assert all(torch.equal(base_before[n], p) for n, p in weights(own, None).items())
    with torch.no_grad():  # the base model object answers through the trained adapter (what evolve's completer calls)
        assert not torch.equal(own.get_base_model()(ids).logits, creator_logits)
    state = creator_rl.state_dict(learner)
    assert state["weights"] and all(".creator." in n for n in state["weights"])
    _, _, _, fresh = creator_setup(tiny_llama_dir, seed=1, own_base=True)
    creator_rl.load_state_dict(fresh, state)
    for n, w in weights(fresh["model"], "creator").items():
        torch.testing.assert_close(w, weights(own, "creator")[n], atol=0, rtol=0)


def test_creator_state_resumes_to_the_same_next_step(tiny_llama_dir, tmp_path):
    """A creator updated once, saved, and restored into a fresh process's model takes the same second step as the
    one that never stopped (adapter weights and AdamW's moments both come back)."""
    run = rundir.Run(tmp_path / "run")
    cfg, m, tokenizer, learner = creator_setup(tiny_llama_dir)
    creator_rl._update(learner, ASKED, rollouts(tokenizer), REWARDS, cfg)
    learner["at"] = 1
    files.write_atomic(run.iter_dir(1) / creator_rl.STATE_FILE, creator_rl.state_dict(learner))
    run.mark(1, "creator", {})
    creator_rl._update(learner, ASKED, rollouts(tokenizer), REWARDS.flip(-1), cfg)

    _, fresh, _, fresh_learner = creator_setup(tiny_llama_dir, seed=1)  # another seed: another random creator A
    creator_rl.load(fresh_learner, run, 1)
    assert fresh_learner["at"] == 1 and fresh.active_adapters == ["default"]
    creator_rl._update(fresh_learner, ASKED, rollouts(tokenizer), REWARDS.flip(-1), cfg)
    uninterrupted, resumed = weights(m, "creator"), weights(fresh, "creator")
    for n in uninterrupted:
        torch.testing.assert_close(resumed[n], uninterrupted[n])
    run.close()


@pytest.mark.parametrize("flags, names", [
    (["--no-lora"], "needs --lora"), (["--creator", "endpoint:http://x#m"], "not an endpoint"),
    (["--sampler", "vllm"], "--sampler eva only"), (["--creator_group", "1"], "--creator_group 1"),
    (["--copy_threshold", "0"], "--copy_threshold 0")])
def test_bad_creator_learns_settings_get_one_line(flags, names):
    with pytest.raises(ValueError, match=names):
        config.parse_config(["--creator_learns", *flags])


def test_two_ranks_take_the_creator_step_of_one(tmp_path, tiny_llama_dir):
    """Each rank computes its share of the messages' loss and the gradients are summed over ranks: 2 gloo ranks end
    on the weights of 1 process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = str(ROOT / "tests" / "creator_ranks.py")
    runs = {1: [sys.executable, script], 2: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node=2", script]}
    procs = {n: subprocess.Popen([*cmd, str(tiny_llama_dir), str(tmp_path / f"{n}.safetensors")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n, cmd in runs.items()}
    for n, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{n} rank(s):\n{err[-4000:]}"
    one, two = (load_file(tmp_path / f"{n}.safetensors") for n in (1, 2))
    assert one.keys() == two.keys() and any("lora_B" in n and w.abs().sum() > 0 for n, w in one.items())
    for name in one:  # the ranks' gradients add up in another order
        err = ((two[name] - one[name]).norm() / one[name].norm().clamp(min=1e-12)).item()
        assert err <= 1e-5, f"{name} differs by {err:.2e} (relative) between 1 and 2 ranks"


def test_report_shows_the_creator_rounds(tmp_path):
    import json

    import report
    for t, (reward, info) in enumerate([(-0.5, 0.1), (0.2, 0.4)], start=1):
        folder = tmp_path / f"iter_{t}"
        folder.mkdir()
        summary = dict(rewrites=8, creator_reward=reward, valid=0.5, near_copy=0.25, child_reward=0.4,
                       child_info=info, parent_reward=0.5, parent_info=0.3, seconds=1.0)
        (folder / "done_creator").write_text(json.dumps(summary) + "\n")
    report.write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## The learning creator's rounds" in md
    assert "| 2 | 8 | 0.200 | 0.50 | 0.25 | 0.400 (0.500) | 0.400 (0.300) |" in md
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_round_takes_creator_steps_on_fresh_rewrites_and_saves_its_state(tiny_llama_dir, tmp_path):
    """learn() end to end on the tiny model with the rules reward: creator_steps steps, each on its own rewrites of
    the same messages (the tiny model writes mostly invalid ones: reward -1), the state file written."""
    import reward
    from test_train_eva import TINY_PROMPTS
    cfg, m, tokenizer, learner = creator_setup(tiny_llama_dir)
    cfg.creator_steps, cfg.creator_max_new_tokens = 2, 12
    parents = [dict(r) for r in TINY_PROMPTS[:3]]
    samples = [{"prompt_id": r["id"], "rewards": [0.0, 1.0], "info": 1.0} for r in parents]
    path = tmp_path / creator_rl.STATE_FILE
    records, summary, line = creator_rl.learn(m, tokenizer, reward.load_reward("rules"), parents, samples, parents,
                                              learner, cfg, 1, save_to=path)
    assert len(records) == 2 * 3 * cfg.creator_group and {r["step"] for r in records} == {0, 1}
    first, second = ([r["raw"] for r in records if r["step"] == s] for s in (0, 1))
    assert first != second, "each step samples fresh rewrites"
    assert all(r["reward"] == -1.0 for r in records if not r["valid"]) and summary["rewrites"] == len(records)
    assert len(summary["reward_per_step"]) == 2 and "per step" in line and summary["parent_info"] == 1.0
    saved = torch.load(path, weights_only=False)
    assert saved["at"] == 1 and learner["at"] == 1 and saved["weights"]
