"""The whole loop on a tiny random Llama: every phase runs, every file lands, bad input is named, runs resume."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

import config
import model
import prompts
import reward
import train_eva

# Constraints that random text from a tiny random model meets only sometimes, so rewards differ and pairs exist.
TINY_PROMPTS = [
    {"id": f"t{i}", "prompt": f"Write about topic number {i}. Use the letter a at least {7 + i % 3} times.",
     "instruction_id_list": ["keywords:letter_frequency", "length_constraints:number_words"],
     "kwargs": [{"letter": "a", "let_frequency": 7 + i % 3, "let_relation": "at least"},
                {"relation": "less than", "num_words": 10 + i % 3}]}
    for i in range(8)
]


def write_prompts(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def smoke_args(tmp_path: Path, tiny_llama_dir: Path, *extra: str) -> list[str]:
    prompts = write_prompts(tmp_path / "prompts.jsonl", TINY_PROMPTS)
    heldout = write_prompts(tmp_path / "heldout.jsonl", TINY_PROMPTS[:3])
    return ["--preset", "smoke", "--model", str(tiny_llama_dir), "--seed_prompts", prompts,
            "--heldout_prompts", heldout, "--run_dir", str(tmp_path / "run"), "--lr", "1e-3", *extra]


def test_one_full_iteration_writes_every_file(tmp_path, tiny_llama_dir):
    train_eva.main(smoke_args(tmp_path, tiny_llama_dir))
    run = tmp_path / "run"
    for name in ["config.json", "metrics.jsonl", "eval_start.json", "eval_end.json", "report.md", "report.png"]:
        assert (run / name).is_file(), f"missing {name}"
    for name in ["pool.jsonl", "samples.jsonl", "pairs.jsonl", "adapter/adapter_config.json", "done_train"]:
        assert (run / "iter_0" / name).exists(), f"missing iter_0/{name}"
    for name in ["pool.jsonl", "samples.jsonl", "selected.jsonl", "evolved.jsonl", "evolved_samples.jsonl",
                 "pairs.jsonl", "adapter/adapter_config.json", "done_estimate", "done_select", "done_evolve",
                 "done_generate", "done_pairs", "done_train"]:
        assert (run / "iter_1" / name).exists(), f"missing iter_1/{name}"
    samples = [json.loads(line) for line in (run / "iter_0" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(TINY_PROMPTS) and all(len(s["responses"]) == 2 == len(s["rewards"]) for s in samples)
    assert all(len(s["finish"]) == 2 and set(s["finish"]) <= {"stop", "length"} for s in samples)
    pairs = [json.loads(line) for line in (run / "iter_0" / "pairs.jsonl").read_text().splitlines()]
    assert pairs, "the tiny prompts are built so that rewards differ: there must be pairs"
    for p in pairs:
        assert p["chosen_reward"] > p["rejected_reward"]
        assert {p["chosen_finish"], p["rejected_finish"]} <= {"stop", "length"}
    evolved = [json.loads(line) for line in (run / "iter_1" / "evolved.jsonl").read_text().splitlines()]
    selected = [json.loads(line) for line in (run / "iter_1" / "selected.jsonl").read_text().splitlines()]
    samples_1 = [json.loads(line) for line in (run / "iter_1" / "samples.jsonl").read_text().splitlines()]
    informative = sum(s["info"] > 0 for s in samples_1)
    assert informative and len(selected) == min(4, informative), \
        "smoke preset selects half of 8 prompts (fewer only when fewer have a reward gap)"
    assert evolved and all(e["iteration"] == 1 and e["parent"] and e["method"] for e in evolved)
    assert not list(run.glob("iter_*/train_state.pt")), "a finished iteration keeps no training checkpoint"
    pool_1 = (run / "iter_1" / "pool.jsonl").read_text().splitlines()
    assert len(pool_1) == len(TINY_PROMPTS)
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"] == str(tiny_llama_dir) and saved["preset"] == "smoke"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in s for s in steps)

    # Rerunning the same command finds every phase done and changes nothing.
    before = (run / "iter_1" / "pairs.jsonl").read_text()
    train_eva.main(smoke_args(tmp_path, tiny_llama_dir))
    assert (run / "iter_1" / "pairs.jsonl").read_text() == before


@pytest.mark.parametrize("loss", ["ipo", "sppo", "simpo", "orpo"])
def test_each_loss_runs_an_iteration(tmp_path, tiny_llama_dir, loss):
    train_eva.main(smoke_args(tmp_path, tiny_llama_dir, "--loss", loss, "--eva_iterations", "0",
                              "--heldout_prompts", ""))
    assert (tmp_path / "run" / "iter_0" / "done_train").exists()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert losses and all(abs(x) < 1e9 for x in losses)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train_eva.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_unknown_flag_is_named(tmp_path):
    out = run_cli("--run_dir", str(tmp_path / "r"), "--learning_rate", "1")
    assert out.returncode != 0 and "--learning_rate" in out.stderr


def test_missing_prompt_file_is_named(tmp_path):
    out = run_cli("--run_dir", str(tmp_path / "r"), "--seed_prompts", str(tmp_path / "nope.jsonl"))
    assert out.returncode != 0 and "nope.jsonl" in out.stderr
    assert out.stderr.strip().count("\n") == 0, f"expected one line, got: {out.stderr}"


def test_malformed_prompt_line_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TINY_PROMPTS[0]) + "\n{not json\n")
    out = run_cli("--run_dir", str(tmp_path / "r"), "--seed_prompts", str(bad))
    assert out.returncode != 0 and "bad.jsonl:2" in out.stderr


def test_unknown_model_path_is_named(tmp_path):
    out = run_cli("--run_dir", str(tmp_path / "r"), "--model", str(tmp_path / "no_such_model"),
                  "--heldout_prompts", "")
    assert out.returncode != 0 and "no_such_model" in out.stderr


def test_existing_folder_is_not_overwritten(tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    out = run_cli("--run_dir", str(folder))
    assert out.returncode != 0 and "precious" in out.stderr
    assert (folder / "notes.txt").read_text() == "keep me"


def test_changed_config_refuses_to_resume(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    saved = json.loads(json.dumps(dataclasses.asdict(config.Config(run_dir=str(folder)))))
    (folder / "config.json").write_text(json.dumps(saved))
    (folder / "iter_0").mkdir()
    (folder / "iter_0" / "done_estimate").write_text("{}\n")  # finished work exists: the config is binding
    out = run_cli("--run_dir", str(folder), "--lr", "0.1")
    assert out.returncode != 0 and "lr" in out.stderr and "allow_config_change" in out.stderr


# flag and a bad value; every one is refused by check_config before any model is loaded or any prompt read
BAD_FLAGS = [("lr", "0"), ("lr", "nan"), ("beta", "0"), ("orpo_lambda", "-0.1"), ("gamma_beta_ratio", "-1"),
             ("weight_decay", "-0.01"), ("warmup_ratio", "1"), ("warmup_ratio", "-0.1"), ("max_grad_norm", "0"),
             ("vocab_chunk", "-1"), ("save_every", "0"), ("n_samples", "1"), ("temperature", "-0.5"),
             ("top_p", "0"), ("top_p", "1.5"), ("lora_r", "0"), ("lora_dropout", "1"), ("epochs", "0"),
             ("micro_batch_size", "0"), ("max_prompt_tokens", "0"), ("gen_batch_size", "0"),
             ("eva_iterations", "-1"), ("select_fraction", "0"), ("endpoint_timeout", "0"), ("reward", "bogus"),
             ("reward", "hf:"), ("reward", "hf:some/rm?batch=8"), ("reward", "judge:"), ("reward", "py:nope.py:f")]
# online eva's own flags, checked with --online
BAD_ONLINE_FLAGS = [("online_algo", "ppo"), ("online_steps", "0"), ("evolve_every", "-1"), ("grpo_epsilon", "0"),
                    ("grpo_aggregation", "mean"), ("grpo_iterations", "0"), ("online_prompts", "3")]
BAD = [([], f, v) for f, v in BAD_FLAGS] + [(["--online"], f, v) for f, v in BAD_ONLINE_FLAGS]


@pytest.mark.parametrize("mode,flag,value", BAD, ids=[f"{' '.join(m)} {f}={v}".strip() for m, f, v in BAD])
def test_each_bad_flag_is_one_line_before_anything_loads(tmp_path, monkeypatch, mode, flag, value):
    def nothing_may_load(*args, **kwargs):
        raise AssertionError("a model or prompt file was read before the config was checked")

    for module, name in [(model, "load_model"), (model, "resolve"),
                         (prompts, "read_prompts"), (reward, "load_reward")]:
        monkeypatch.setattr(module, name, nothing_may_load)
    with pytest.raises(ValueError) as err:
        train_eva.main([*mode, "--run_dir", str(tmp_path / "r"), f"--{flag}", value])
    message = str(err.value)
    assert message.startswith((f"--{flag} ", f"--{flag}: ")) and "\n" not in message, message
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,flag", [(["--lr", "-1"], "--lr"), (["--loss", "orpo", "--beta", "0.1"], "--beta"),
                                       (["--n_samples", "1"], "--n_samples")])
def test_bad_flag_on_the_command_line_exits_fast_with_one_line(tmp_path, args, flag):
    out = run_cli("--run_dir", str(tmp_path / "r"), *args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} "), out.stderr
    if flag == "--beta":
        assert "--orpo_lambda" in lines[0]


@pytest.mark.parametrize("loss", ["dpo", "ipo", "sppo", "simpo", "orpo"])
def test_paper_preset_is_valid_for_every_loss(monkeypatch, loss):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = config.parse_config(["--preset", "paper", "--loss", loss])
    settings = config.PAPER_LOSS_SETTINGS[loss]
    assert cfg.loss == loss and all(getattr(cfg, k) == v for k, v in settings.items()), settings
    assert cfg.beta == settings.get("beta", -1.0), "the paper's beta comes from the per-loss settings only"
    if loss == "orpo":
        assert cfg.beta < 0, "ORPO has no beta: losses.preference_loss refuses one"
    flagged = config.parse_config(["--preset", "paper", "--loss", loss, "--lr", "1e-6", "--epochs", "3"])
    assert (flagged.lr, flagged.epochs) == (1e-6, 3), "explicit flags win over the per-loss settings"


# ------------------------------------------------------------------------------------ the packed training forward
def straightforward_logps(policy, encoded: list[dict], half: str):
    """Sum of log p(response tokens) per pair, each sequence alone through the model: full logits, fp32
    log_softmax over the whole vocabulary, gather."""
    import torch
    out = []
    for e in encoded:
        ids = torch.tensor([e["prompt"] + e[half]])  # [1, T]
        logps = policy(input_ids=ids).logits[0, :-1].float().log_softmax(-1)  # [T-1, V]
        token = logps.gather(-1, ids[0, 1:, None])[:, 0]  # [T-1]
        out.append(token[len(e["prompt"]) - 1:].sum())
    return torch.stack(out)


@pytest.mark.parametrize("family, lora, checkpointing", [("llama", True, False), ("llama", False, False),
                                                         ("gemma2", False, False), ("gemma2", False, True)])
def test_forward_logps_and_gradients_equal_the_straightforward_ones(tmp_path, family, lora, checkpointing):
    """Packed rows, per-sequence attention, LM head on response positions only, oneDNN linears and chunked
    log-softmax give the log-probs and gradients of one plain forward per sequence, to fp32 rounding; the DPO loss
    against a reference taken the same way is ln 2. gemma2 soft-caps attention scores and uses sliding windows
    (here 8 tokens, shorter than the sequences)."""
    import math
    import torch
    import losses
    import model
    import solver as solver_lib
    from conftest import make_tiny_llama, make_toy_gemma2
    make = make_tiny_llama if family == "llama" else make_toy_gemma2
    from transformers import AutoModelForCausalLM
    solver = AutoModelForCausalLM.from_pretrained(make(tmp_path / family), attn_implementation="eager")
    if lora:
        torch.manual_seed(1)
        solver = model.add_lora(solver, r=4, alpha=8)
        for name, p in solver.named_parameters():
            if "lora_B" in name:  # B = 0 would leave the adapter's A gradients zero
                p.data.normal_(0, 0.1)
    if checkpointing:  # the paper preset's setting: layers recompute their forward in backward
        solver.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    solver.train()
    cfg = config.Config(vocab_chunk=1000)
    gen = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(10, 1000, (n,), generator=gen).tolist()
    lengths = [(5, 9, 3), (12, 4, 15), (1, 6, 6)]  # prompt, chosen, rejected
    encoded = [dict(prompt=draw(p), chosen=draw(c), rejected=draw(r)) for p, c, r in lengths]
    params = [p for p in solver.parameters() if p.requires_grad]

    def grads(fn):
        chosen, rejected = fn()
        (chosen.sum() - 0.5 * rejected.sum()).backward()
        out = [p.grad.clone() for p in params]
        solver.zero_grad(set_to_none=True)
        return chosen.detach(), rejected.detach(), out

    batch = solver_lib.collate(encoded, "cpu")
    with model.packed_training(solver):  # checkpointed layers rerun the packed forward during backward
        c1, r1, g1 = grads(lambda: tuple(s.sum for s in solver_lib.forward_logps(solver, batch, cfg)))
    c2, r2, g2 = grads(lambda: (straightforward_logps(solver, encoded, "chosen"),
                                straightforward_logps(solver, encoded, "rejected")))
    torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-4)
    assert sum(g.abs().sum() for g in g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with model.packed_training(solver):
        with torch.no_grad():
            ref = solver_lib.forward_logps(solver, batch, cfg)
        chosen, rejected = solver_lib.forward_logps(solver, batch, cfg)
    assert chosen.count.tolist() == [9, 4, 6] and rejected.count.tolist() == [3, 15, 6]
    loss, _, _ = losses.preference_loss("dpo", chosen, rejected, *ref, beta=0.1)
    torch.testing.assert_close(loss, torch.full((3,), math.log(2)))


# ------------------------------------------------------------------------------------ --help and --config
def test_help_shows_each_fields_comment_default_presets_and_choices(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # one line per flag: argparse would wrap inside words at hyphens
    text = " ".join(config.build_parser().format_help().split())
    docs = config.field_docs()
    assert set(docs) == {f.name for f in dataclasses.fields(config.Config)}, "every field needs its comment"
    for f in dataclasses.fields(config.Config):
        comment = " ".join(docs[f.name][1].split())
        assert f"--{f.name}" in text and comment in text and f"(default: {f.default}" in text, f.name
    assert "--loss {dpo,ipo,sppo,simpo,orpo}" in text
    assert "(default: 5e-05; preset demo 0.0005, paper 5e-07, online 0.0002)" in text  # --lr across presets
    assert "the solver update:" in text and "online eva" in text  # grouped by Config's sections


def test_config_file_yaml_and_json_flags_win(tmp_path):
    (tmp_path / "run.yaml").write_text("preset: smoke\nlr: 1e-4\nloss: simpo\nlora: false\nmax_new_tokens: 24\n")
    cfg = config.parse_config(["--config", str(tmp_path / "run.yaml"), "--max_new_tokens", "8"])
    assert (cfg.preset, cfg.lr, cfg.loss, cfg.lora) == ("smoke", 1e-4, "simpo", False)
    assert cfg.max_new_tokens == 8, "a flag given explicitly wins over the file"
    assert cfg.n_samples == config.PRESETS["smoke"]["n_samples"], "the file's preset fills the rest"
    # A run folder's config.json (every field) gives back the same Config.
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    assert config.parse_config(["--config", str(tmp_path / "config.json")]) == cfg


@pytest.mark.parametrize("text,message", [
    ("lr: 1e-4\nlearning_rate: 2\n", "unknown key 'learning_rate'"),
    ("n_samples: 2.5\n", "n_samples must be int, got 2.5"),
    ("lora: 'yes'\n", "lora must be bool, got 'yes'"),
    ("loss: dpox\n", "--loss dpox: choose one of"),
    ("lr: [1\n", "not valid YAML or JSON"),
    ("- lr\n", "expected a mapping"),
])
def test_bad_config_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        config.parse_config(["--config", str(path)])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"--config {path}: ") or message.startswith("--loss")
