"""The paper's setting, rehearsed on toy copies of its models: `--preset paper` with a Gemma-2 solver and an ArmoRM
reward model, both built in code in the formats users download (conftest.make_toy_gemma2, make_toy_armorm).

    python -m pytest tests/test_paper_path.py -q

Every run keeps the preset's settings (full fine-tuning, N = 6, the paper's beta and learning rate per loss,
1-pair micro batches, 2 epochs, gradient checkpointing) and shrinks only lengths and counts (8 prompts, batches of 4).
The prompts are in UltraFeedback's shape (prompt_id + prompt, no instruction lists), as ArmoRM needs none.
"""
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

import config
import train_eva

PROMPTS = ["Explain why the sky is blue.", "Write a short poem about autumn leaves.",
           "Give three tips for a job interview.", "What is the capital of Australia, and why not Sydney?",
           "Describe how a bicycle gear works.", "Suggest a name for a bakery that sells only bread.",
           "Summarise the causes of the French Revolution.", "How do I boil an egg so the yolk stays soft?"]
TOY = ["--max_new_tokens", "8", "--max_prompt_tokens", "64", "--eval_max_new_tokens", "8",
       "--creator_max_new_tokens", "24", "--max_heldout_prompts", "2", "--gen_batch_size", "4", "--batch_size", "4"]


def write_ultrafeedback(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt_id": f"uf{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


class Creator(BaseHTTPRequestHandler):
    """An OpenAI-compatible creator endpoint that rewrites the request it is shown into a longer, concrete one."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        shown = body["messages"][-1]["content"]
        request = shown.rsplit("\nRequest: ", 1)[1].removesuffix("\nNew request:")  # the request to rewrite
        self.server.calls += 1
        text = f"{request} Answer for a reader who is twelve years old, with example number {self.server.calls}."
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


@pytest.fixture(scope="module")
def creator_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Creator)
    server.calls = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def paper_args(tmp_path: Path, gemma: Path, armorm: Path, *extra: str) -> list[str]:
    prompts = write_ultrafeedback(tmp_path / "ultrafeedback.jsonl")
    return ["--preset", "paper", "--model", str(gemma), "--reward", f"hf:{armorm}", "--seed_prompts", str(prompts),
            "--run_dir", str(tmp_path / "run"), *TOY, *extra]


@pytest.mark.parametrize("loss", ["dpo", "sppo", "simpo", "orpo", "ipo"])
def test_paper_preset_runs_every_iteration(tmp_path, toy_gemma2_dir, toy_armorm_dir, creator_url, loss):
    args = paper_args(tmp_path, toy_gemma2_dir, toy_armorm_dir, "--loss", loss,
                      "--creator", f"endpoint:{creator_url}#creator-model")
    train_eva.main(args)
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["lora"] is False and saved["n_samples"] == 6 and saved["loss"] == loss
    assert saved["beta"] == config.PAPER_LOSS_SETTINGS[loss].get("beta", -1.0)
    for t in (0, 1):
        assert (run / f"iter_{t}" / "done_train").exists(), f"iteration {t} did not finish"
        assert (run / f"iter_{t}" / "model" / "config.json").exists(), "full fine-tuning saves a whole model"
        assert not (run / f"iter_{t}" / "train_state.pt").exists(), "the mid-phase checkpoint outlived its phase"
    samples = [json.loads(line) for line in (run / "iter_0" / "samples.jsonl").open()]
    assert all(len(s["rewards"]) == 6 and len(s["finish"]) == 6 for s in samples)
    assert all(isinstance(r, float) for s in samples for r in s["rewards"]), "ArmoRM gives every response a score"
    evolved = [json.loads(line) for line in (run / "iter_1" / "evolved.jsonl").open()]
    assert evolved and all(e["iteration"] == 1 and e["parent"] for e in evolved), "the creator made no children"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    steps = [m for m in metrics if "step" in m and "loss" in m]
    assert steps and all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
    if loss == "dpo":
        first = next(m for m in steps if m["iteration"] == 0)
        assert abs(first["loss"] - 0.6931) < 1e-3, "DPO starts at ln 2 (policy == reference)"
    trained = load_file(run / "iter_1" / "model" / "model.safetensors")
    start = load_file(toy_gemma2_dir / "model.safetensors")
    assert any(not torch.equal(trained[k].float(), start[k].float()) for k in start), "no weight moved at lr 5e-7"


def test_paper_preset_under_torchrun_fsdp2(tmp_path, toy_gemma2_dir, toy_armorm_dir):
    """2 gloo ranks, full fine-tuning sharded with FSDP2, the solver itself as the creator (the preset's choice)."""
    args = paper_args(tmp_path, toy_gemma2_dir, toy_armorm_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_eva.py"), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "world size 2" in proc.stdout
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["fsdp"] is True
    for t in (0, 1):
        assert (run / f"iter_{t}" / "done_train").exists()
    trained = load_file(run / "iter_1" / "model" / "model.safetensors")
    start = load_file(toy_gemma2_dir / "model.safetensors")
    assert any(not torch.equal(trained[k].float(), start[k].float()) for k in start)
