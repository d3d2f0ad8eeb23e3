"""Kill a run with SIGKILL inside every phase, rerun the same command, and end exactly where an uninterrupted run ends.

The kills are deterministic: tests/faulty_run.py --kill_at <iteration>:<phase>[:<step>] runs train_eva.py with a
hook at rundir.fault's points that SIGKILLs the process after the phase's outputs are written and before its marker
(for train: after a checkpoint). One run is
killed at every point in turn, each rerun going on until the next point, and compared with an uninterrupted run of
the same command: the same files byte for byte, the same adapter weights, the same losses, no finished phase redone.
A second fresh run shows that one seed and config give the same pool, samples and pairs.

    python -m pytest tests/test_resume.py -x -q        # ~3-4 minutes on 2 CPU cores (about ten processes)
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_train_eva import TINY_PROMPTS, write_prompts

# Three optimizer steps per iteration (checkpoints after steps 1 and 2) and LoRA dropout, so the resumed update needs
# the optimizer, the scheduler and the RNG state of the checkpoint to land on the same weights. The creator learns
# (creator_rl.py), so its phase is killed and resumed too.
ARGS = ["--preset", "smoke", "--heldout_prompts", "", "--lr", "1e-3", "--top_p", "1.0", "--epochs", "3",
        "--lora_dropout", "0.1", "--creator_learns"]
# "0:train:2": after the step-2 checkpoint, where the learning rate already decays (a scheduler restarted at step 0
# would not). The rest: iteration 1, each phase, outputs written but no marker.
KILLS = ["0:train:2", "1:estimate", "1:select", "1:creator", "1:evolve", "1:generate", "1:pairs", "1:train"]
# What each phase writes; once its marker exists these files must never be written again.
PHASE_FILES = {"estimate": ["samples.jsonl"], "select": ["selected.jsonl"], "creator": ["creator_rollouts.jsonl"],
               "evolve": ["evolved.jsonl"],
               "generate": ["evolved_samples.jsonl"], "pairs": ["pairs.jsonl"],
               "train": ["pool_next.jsonl", "adapter/adapter_model.safetensors"]}


def run_eva(prompts: str, model: Path, folder: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # the same float sums every time
    script = [str(ROOT / "train_eva.py")]
    if kill_at:
        script = [str(ROOT / "tests" / "faulty_run.py"), "--kill_at", kill_at, "--"]
    return subprocess.run([sys.executable, *script, *ARGS, "--model", str(model), "--seed_prompts", prompts,
                           "--run_dir", str(folder)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def finished(out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, f"run failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def outputs(folder: Path) -> dict[str, str]:
    """Every JSON Lines file the iterations wrote, by relative path."""
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.glob("iter_*/*.jsonl"))}


def adapters(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(folder)): load_file(p) for p in sorted(folder.glob("iter_*/adapter/*.safetensors"))}


def markers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.glob("iter_*/done_*"))


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def guarded_files(folder: Path) -> dict[str, int]:
    """mtime_ns of every file whose phase has its marker: they must not change on a resume."""
    found = {}
    for marker in folder.glob("iter_*/done_*"):
        for name in PHASE_FILES[marker.name.removeprefix("done_")]:
            path = marker.parent / name
            found[str(path)] = path.stat().st_mtime_ns
    return found


def tear_outputs(folder: Path, point: str) -> None:
    """Pretend the kill also tore the phase's output mid-write (no atomic rename): the resume must not trust it."""
    t, phase = point.split(":")[:2]
    iter_dir = folder / f"iter_{t}"
    assert not (iter_dir / f"done_{phase}").exists(), f"{point}: the marker was written before the kill"
    if phase == "train":
        assert (iter_dir / "train_state.pt").is_file(), f"{point}: killed before any checkpoint"
        (iter_dir / "train_state.pt.tmp").write_bytes(b"\x00half a checkpoint")
        # and as if it had logged one more step before it died, the last line torn: the resume must drop both
        step = torch.load(iter_dir / "train_state.pt", weights_only=False)["step"] + 1
        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(dict(iteration=int(t), step=step, loss=99.0, lr=1.0)) + '\n{"iteration": 1, "st')
        return
    for name in PHASE_FILES[phase]:
        path = iter_dir / name
        assert path.is_file(), f"{point}: {name} should be written before the marker"
        text = path.read_text()
        path.write_text(text[:len(text) // 2])
        (iter_dir / (name + ".tmp")).write_text(text[:len(text) // 3])


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", TINY_PROMPTS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama_dir, prompts) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted") / "run"
    finished(run_eva(prompts, tiny_llama_dir, folder))
    return folder


def test_killed_in_every_phase_resumes_to_the_same_run(tmp_path, tiny_llama_dir, prompts, uninterrupted):
    folder = tmp_path / "run"
    for point in KILLS:
        before = guarded_files(folder) if folder.exists() else {}
        out = run_eva(prompts, tiny_llama_dir, folder, kill_at=point)
        assert out.returncode == -signal.SIGKILL, \
            f"{point}: expected the kill hook to fire, got exit {out.returncode}:\n{out.stderr[-3000:]}"
        after = guarded_files(folder)
        assert {k: v for k, v in after.items() if k in before} == before, f"{point}: a finished phase was redone"
        tear_outputs(folder, point)
    finished(run_eva(prompts, tiny_llama_dir, folder))

    assert markers(folder) == markers(uninterrupted)
    for run in (folder, uninterrupted):  # a finished phase leaves no checkpoint behind
        assert not list(run.glob("iter_*/train_state.pt*")), "train_state.pt outlived its phase's marker"
    got, want = outputs(folder), outputs(uninterrupted)
    assert got.keys() == want.keys()
    for name in want:  # pool.jsonl, samples.jsonl, selected, evolved, evolved_samples, pairs, pool_next
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"
    got, want = adapters(folder), adapters(uninterrupted)
    assert got.keys() == want.keys() and want, "both runs save an adapter per iteration"
    for name in want:
        for key in want[name]:
            torch.testing.assert_close(got[name][key], want[name][key], rtol=0, atol=1e-6, msg=f"{name}: {key}")

    # Every phase finished exactly once (a killed phase never logged; a finished one never ran again), and the
    # training steps after each resume have the uninterrupted run's losses and learning rates.
    logged = lambda f: sorted((m["iteration"], m["step"]) for m in metrics(f) if "loss" in m)
    assert logged(folder) == logged(uninterrupted), "a step logged twice, or a killed run's step kept"
    phases = [(m["iteration"], m["phase"]) for m in metrics(folder) if "phase" in m]
    assert sorted(phases) == sorted((m["iteration"], m["phase"]) for m in metrics(uninterrupted) if "phase" in m)
    assert len(phases) == len(set(phases)), f"a phase was logged twice: {phases}"
    steps = lambda f: {(m["iteration"], m["step"]): (m["loss"], m["lr"]) for m in metrics(f) if "loss" in m}
    got, want = steps(folder), steps(uninterrupted)
    assert got.keys() == want.keys() and {i for i, _ in want} == {0, 1} and len(want) >= 6, "3+ steps an iteration"
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), f"iteration/step {key}"


def test_same_seed_and_config_give_identical_files(tmp_path, tiny_llama_dir, prompts, uninterrupted):
    folder = tmp_path / "run"
    finished(run_eva(prompts, tiny_llama_dir, folder))
    got, want = outputs(folder), outputs(uninterrupted)
    assert {"iter_1/pool_next.jsonl", "iter_1/samples.jsonl", "iter_1/evolved.jsonl", "iter_1/pairs.jsonl"} <= set(want)
    assert got == want, [name for name in want if got.get(name) != want[name]]
    got, want = adapters(folder), adapters(uninterrupted)
    for name in want:
        assert all(torch.equal(got[name][k], want[name][k]) for k in want[name]), name
