"""The whole loop on a tiny random Llama: every phase runs, every file lands, bad input is named, runs resume."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

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
    assert len(selected) == 4, "smoke preset selects half of 8 prompts"
    assert evolved and all(e["iteration"] == 1 and e["parent"] and e["method"] for e in evolved)
    pool_1 = (run / "iter_1" / "pool.jsonl").read_text().splitlines()
    assert len(pool_1) == len(TINY_PROMPTS)
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == str(tiny_llama_dir) and config["preset"] == "smoke"
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
    saved = json.loads(json.dumps(train_eva.dataclasses.asdict(train_eva.Config(run_dir=str(folder)))))
    (folder / "config.json").write_text(json.dumps(saved))
    (folder / "iter_0").mkdir()
    (folder / "iter_0" / "done_estimate").write_text("{}\n")  # finished work exists: the config is binding
    out = run_cli("--run_dir", str(folder), "--lr", "0.1")
    assert out.returncode != 0 and "lr" in out.stderr and "allow_config_change" in out.stderr
