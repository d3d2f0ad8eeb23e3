"""The multi-process path on the CPU: torchrun with 2 gloo ranks must reproduce one process.

    python -m pytest tests/test_distributed.py -x -q

Each test runs train_eva.py twice with the same seed, once as a plain process and once under
`python -m torch.distributed.run --standalone --nproc_per_node=2`, and compares what they wrote: the first
iteration's samples and pairs must be identical (sampling is seeded per prompt and sharded, so the rank count
cannot change it), the trained weights equal to a relative 1e-5 (the gradient norm adds up in another order), and
what later iterations sample from those weights alike but for the odd flipped token (see assert_mostly_same).
Covered: LoRA under DDP through a whole eva iteration, full fine-tuning under FSDP2 (whose trained weights are
handed back in memory to the model that samples the next iteration), and QLoRA (bitsandbytes' NF4 CPU back-end).
Each run is a fresh subprocess with one thread per rank, the two of a test at once; the file takes about two
minutes on 2 free cores.

Each run writes to the default run folder, runs/demo, under its own working directory. (The flag is --run_dir, not
--run: torchrun's own parser rejects `--run` anywhere on its command line as an abbreviation of its --run-path.)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_train_eva import TINY_PROMPTS, write_prompts

import config

TIMEOUT = 300


def launch_pair(tmp_path: Path, args_one: list[str], args_two: list[str]) -> tuple[Path, Path]:
    """Run train_eva.py as 1 process and under torchrun with 2 ranks, at the same time (each rank is single-threaded,
    so three processes keep the 2 cores busy); return the two run folders."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = str(ROOT / "train_eva.py")
    commands = {1: [sys.executable, script, *args_one],
                2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                    *args_two]}
    procs = {}
    for ranks, cmd in commands.items():
        cwd = tmp_path / f"ranks{ranks}"
        cwd.mkdir()
        procs[ranks] = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
    for ranks, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise AssertionError(f"{ranks} rank(s) ran past {TIMEOUT} s (a collective that never completes?)")
        assert proc.returncode == 0, f"{ranks} rank(s) failed:\n{out[-3000:]}\n{err[-5000:]}"
    return tmp_path / "ranks1" / "runs" / "demo", tmp_path / "ranks2" / "runs" / "demo"  # Config.run_dir's default


def common_args(tmp_path: Path, tiny_llama_dir: Path, *extra: str) -> list[str]:
    prompts = write_prompts(tmp_path / "prompts.jsonl", TINY_PROMPTS)
    # two epochs, so the optimizer state and the schedule matter, not only one sign-like Adam step
    return ["--preset", "smoke", "--model", str(tiny_llama_dir), "--seed_prompts", prompts, "--heldout_prompts", "",
            "--lr", "1e-3", "--epochs", "2", *extra]


def assert_same_files(one: Path, two: Path, names: list[str]) -> None:
    for name in names:
        a, b = (one / name).read_text(), (two / name).read_text()
        assert a, f"{name} is empty: nothing was compared"
        assert a == b, f"{name} differs between 1 and 2 ranks"


def assert_mostly_same(one: Path, two: Path, names: list[str], at_least: float = 0.75) -> None:
    """Files written after training: the weights of 1 and 2 ranks agree to ~1e-7 (gradient norms add up in another
    order), and a random tiny model samples from a nearly flat distribution, so now and then one token flips. A
    wrong hand-over or a rank that trained on other data changes (nearly) every response instead (measured: 0 of
    16 responses alike after an untrained iteration), so most lines (responses, for samples) must agree."""
    for name in names:
        a, b = (one / name).read_text().splitlines(), (two / name).read_text().splitlines()
        assert a, f"{name} is empty: nothing was compared"
        if name.endswith("samples.jsonl"):
            a, b = ([r for line in x for r in json.loads(line)["responses"]] for x in (a, b))
        same = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))
        assert same >= at_least, f"{name}: only {same:.0%} alike between 1 and 2 ranks"


def assert_close_weights(one: dict, two: dict, what: str, rtol: float = 1e-5) -> None:
    assert one.keys() == two.keys(), f"{what}: different tensors"
    for name in one:
        a, b = one[name].double(), two[name].double()
        err = ((a - b).norm() / a.norm().clamp(min=1e-12)).item()
        assert err <= rtol, f"{what}: {name} differs by {err:.2e} (relative) between 1 and 2 ranks"


def losses_logged(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_lora_ddp_two_ranks_equal_one(tmp_path, tiny_llama_dir):
    args = common_args(tmp_path, tiny_llama_dir, "--creator_learns")  # the learning creator's round runs sharded too
    one, two = launch_pair(tmp_path, args, args)
    # before any training, sampling and pairing depend on the seed alone, never on the number of ranks
    assert_same_files(one, two, ["iter_0/samples.jsonl", "iter_0/pairs.jsonl"])
    a = load_file(one / "iter_0" / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "iter_0" / "adapter" / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k), "the adapter never moved"
    assert_close_weights(a, b, "iter_0 adapter")
    assert_mostly_same(one, two, ["iter_1/samples.jsonl", "iter_1/selected.jsonl", "iter_1/creator_rollouts.jsonl",
                                  "iter_1/evolved.jsonl",
                                  "iter_1/evolved_samples.jsonl", "iter_1/pairs.jsonl"])
    if (one / "iter_1" / "pairs.jsonl").read_text() == (two / "iter_1" / "pairs.jsonl").read_text():
        a = load_file(one / "iter_1" / "adapter" / "adapter_model.safetensors")
        b = load_file(two / "iter_1" / "adapter" / "adapter_model.safetensors")
        assert_close_weights(a, b, "iter_1 adapter")
    # the logged loss is the global batch's, not rank 0's half of it
    assert losses_logged(one)[:2] == pytest.approx(losses_logged(two)[:2], rel=1e-5)


def test_full_fine_tuning_fsdp_two_ranks_equal_one(tmp_path, tiny_llama_dir):
    # iteration 1 is an ordinary one: it samples with the weights FSDP trained in iteration 0, so its samples match
    # only if those weights reached the unsharded sampling model
    args = common_args(tmp_path, tiny_llama_dir, "--no-lora", "--eva_iterations", "1", "--no-evolve")
    one, two = launch_pair(tmp_path, args, [*args, "--fsdp"])
    assert_same_files(one, two, ["iter_0/samples.jsonl", "iter_0/pairs.jsonl"])
    start = load_file(tiny_llama_dir / "model.safetensors")
    a = load_file(one / "iter_0" / "model" / "model.safetensors")
    b = load_file(two / "iter_0" / "model" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a[name], start[name]), "full fine-tuning did not change the weights"
    assert_close_weights(a, b, "iter_0 model")
    # samples only: each of the 4 pairs depends on 4 responses, so two flipped tokens can change half the pairs
    assert_mostly_same(one, two, ["iter_1/samples.jsonl"])
    assert not (two / "iter_0" / "train_state.pt").exists(), "--fsdp writes no mid-phase checkpoint"
    assert losses_logged(one)[:2] == pytest.approx(losses_logged(two)[:2], rel=1e-5)


def test_qlora_on_cpu_two_ranks_equal_one(tmp_path, tiny_llama_dir):
    # de-quantising every layer on every call is slow on the CPU: one iteration
    args = common_args(tmp_path, tiny_llama_dir, "--load_in_4bit", "--eva_iterations", "0")
    one, two = launch_pair(tmp_path, args, args)
    assert_same_files(one, two, ["iter_0/samples.jsonl", "iter_0/pairs.jsonl"])
    a = load_file(one / "iter_0" / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "iter_0" / "adapter" / "adapter_model.safetensors")
    assert_close_weights(a, b, "QLoRA adapter")


def test_four_bit_gradients_survive_sampling(tmp_path, tiny_llama_dir):
    """bitsandbytes' CPU repacking after an eval-mode forward drops input gradients; model.load_model prevents it."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM
    import model
    # layers 64 wide: the repacking needs whole blocks of 64 inputs (narrower ones crash instead of going wrong)
    folder = tmp_path / "tiny64"
    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    model.load_tokenizer(str(tiny_llama_dir)).save_pretrained(folder)
    q, _ = model.load_model(str(folder), load_in_4bit=True)
    linears = [m for m in q.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears, "load_in_4bit=True gave no 4-bit layers"
    # the same model with the 4-bit weights de-quantised into ordinary fp32 layers: the exact reference
    d, _ = model.load_model(str(folder))
    for name, m in q.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            d.get_submodule(name).weight.data = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
    torch.manual_seed(0)
    q = model.add_lora(q, r=4)
    torch.manual_seed(0)
    d = model.add_lora(d, r=4)
    for m in (q, d):  # B = 0 would give A no gradient; any fixed non-zero B will do
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.constant_(p, 0.01)
    ids = torch.randint(0, 1000, (2, 12))
    q.eval()
    with torch.inference_mode():
        q(input_ids=ids)  # what sampling does first (in eval mode, without gradients)
    grads = []
    for m in (q, d):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    # the first layer's adapter: its gradient has come back through every 4-bit layer above it
    name = next(n for n in grads[1] if "layers.0.self_attn.q_proj.lora_A" in n)
    torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_bad_scale_settings_are_refused_before_loading(monkeypatch):
    with pytest.raises(ValueError, match="--fsdp"):
        config.parse_config(["--fsdp"])  # LoRA is the default
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3"):
        config.parse_config(["--batch_size", "8", "--micro_batch_size", "1"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = config.parse_config(["--preset", "paper"])
    assert cfg.fsdp and not cfg.lora and cfg.batch_size == 64 and cfg.n_samples == 6 and cfg.lr == 5e-7
    assert config.parse_config(["--preset", "paper", "--loss", "sppo"]).optimizer == "rmsprop"


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_at_once(tmp_path, tiny_llama_dir):
    """Rank 1's loss turns NaN (tests/faulty_run.py --nan_at): both ranks must stop with the same one-line error within
    seconds, not wait in the next collective for the process group's timeout. The two ranks are started the way
    torchrun starts them (its environment variables), so that each rank's exit code and stderr can be read."""
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = common_args(tmp_path, tiny_llama_dir, "--eva_iterations", "0", "--run_dir", str(tmp_path / "run"))
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "faulty_run.py"), "--nan_at", "1:0:1", "--",
                                       *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    ended = {}
    deadline = time.time() + TIMEOUT
    while len(ended) < 2 and time.time() < deadline:
        for rank, proc in enumerate(procs):
            if rank not in ended and proc.poll() is not None:
                ended[rank] = time.time()
        time.sleep(0.2)
    if len(ended) < 2:
        for proc in procs:
            proc.kill()
    outputs = [proc.communicate() for proc in procs]
    assert len(ended) == 2, f"rank(s) {sorted(set(range(2)) - set(ended))} still running after {TIMEOUT} s"
    assert abs(ended[0] - ended[1]) < 60, f"the ranks stopped {abs(ended[0] - ended[1]):.0f} s apart"
    errors = []
    for rank, (proc, (_, err)) in enumerate(zip(procs, outputs)):
        assert proc.returncode != 0, f"rank {rank} exited 0"
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, f"rank {rank}:\n{err[-3000:]}"
        errors.append(lines[0])
    assert errors[0] == errors[1] and "iteration 0 step 1: the dpo loss is not finite" in errors[0], errors
    bad = json.loads((tmp_path / "run" / "iter_0" / "nonfinite_batch.json").read_text())
    assert bad["ranks"] == [1] and bad["step"] == 1 and len(bad["prompt_ids"]) == 2, bad
    assert not (tmp_path / "run" / "iter_0" / "done_train").exists()


def test_fsdp_masters_load_on_rank_0_only_and_save_in_shards(tmp_path, tiny_llama_dir):
    """--fsdp's masters: rank 0 alone reads the weights, the others build the model on the meta device; the scattered
    shards equal the checkpoint; saving streams them (here in several shards) and the sampling copy takes them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fsdp_masters.py"), str(tiny_llama_dir), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["calls"] == [str(tiny_llama_dir)] and ranks[1]["calls"] == [], "only rank 0 reads the weights"
    assert all(r["equal"] for r in ranks), "the masters' gathered weights differ from the checkpoint"
    assert all(r["attention"] == r["expected_attention"] for r in ranks), ranks
    assert all(r["sampler_moved"] for r in ranks), "the sampling copy did not take the saved weights"
    saved = tmp_path / "saved" / "model"
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    import model
    reloaded, _ = model.load_model(str(saved))
    start = load_file(tiny_llama_dir / "model.safetensors")
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, start[name] + 1), name
    assert (saved / "generation_config.json").exists() and (saved / "tokenizer_config.json").exists()
