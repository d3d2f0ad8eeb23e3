"""Every script in scripts/, bench/ and eval/ starts: `--help` prints its usage and exits 0, and the cheap ones do a
tiny real run on the tiny random Llama (each under half a minute). scripts/gpu_check.sh needs CUDA: its syntax only.

    python -m pytest tests/test_scripts.py -q
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_train_eva import TINY_PROMPTS, write_prompts

SCRIPTS = sorted(str(p.relative_to(ROOT)) for folder in ("scripts", "bench", "eval")
                 for p in (ROOT / folder).glob("*.py") if '__name__ == "__main__"' in p.read_text())


def run(script: str, *args: str, cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd, env=env,
                         timeout=timeout)
    assert out.returncode == 0, f"{script} {args} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def test_every_script_is_found():
    assert {"scripts/creator_samples.py", "scripts/ifeval_coverage.py", "bench/bench_logps.py", "bench/bench_train.py",
            "eval/ifeval.py", "eval/winrate.py"} <= set(SCRIPTS)
    assert "eval/common.py" not in SCRIPTS, "a module without a __main__ block is not a script"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage(script):
    out = run(script, "--help")
    assert out.stdout.startswith(f"usage: {Path(script).name}"), out.stdout[:500]


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


def test_creator_samples_evolves_with_the_tiny_model(tiny_llama_dir):
    out = run("scripts/creator_samples.py", "--model", str(tiny_llama_dir), "--parents", "2", "--samples", "1",
              "--flag=--creator_max_new_tokens=8", "--flag=--creator_candidates=1", "--flag=--evolve_depth=2")
    assert "2 parents -> " in out.stdout and "kept per method" in out.stdout, out.stdout[-2000:]


def test_ifeval_coverage_on_a_small_file(tmp_path):
    data = write_prompts(tmp_path / "ifeval.jsonl", TINY_PROMPTS)
    out = run("scripts/ifeval_coverage.py", "--data", data)
    assert "fully supported prompts: 8 / 8" in out.stdout, out.stdout


def test_bench_logps_compares_both_paths():
    out = run("bench/bench_logps.py", "--batch", "2", "--seq", "16", "--vocab", "300", "--chunk", "64",
              "--repeats", "1")
    assert "chunked / plain: time" in out.stdout, out.stdout


def test_bench_generate_times_the_sampler(tiny_llama_dir):
    out = run("bench/bench_generate.py", "--model", str(tiny_llama_dir), "--prompts", "2", "-n", "1",
              "--max_new_tokens", "4", "--skip_hf", "--device", "cpu", "--threads", "1")
    assert "ours:" in out.stdout and "tokens/s" in out.stdout, out.stdout


def test_bench_online_runs_an_online_step(tiny_llama_dir, tmp_path):
    out = run("bench/bench_online.py", "--model", str(tiny_llama_dir), "--steps", "1", "--repeats", "1", "--threads",
              "1", cwd=tmp_path)
    assert "\neva " in out.stdout, out.stdout
