"""Tests of model.py's hub ids and export: ids with dots load from a real Hugging Face cache layout built in a tmp
folder (offline), paths that do not exist say so in one line, and `python model.py export` writes one folder that
loads as the adapter did: safetensors shards in the asked dtype, the tokenizer with its chat template, the generation
config.

    .venv/bin/python -m pytest tests/test_hub_export.py -x -q
"""
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants, scan_cache_dir
from safetensors import safe_open

import model

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
QWEN_LIKE, LLAMA_LIKE = "Org/Name-1.5B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """Copy folder into the cache as huggingface_hub lays a download out: blobs named by their content, snapshot
    files linking to them, refs/main naming the commit. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(f.read_bytes())
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(request, tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, named by HF_HOME (the cache is its hub/) or by HF_HUB_CACHE
    (request.param), with HF_HUB_OFFLINE=1. huggingface_hub reads these variables once, when it is imported, so setting
    them here alone would change nothing: huggingface_hub.constants is reloaded after setting them (what a process
    started with them sees), and again after they are restored. (Modules that copied a constant by name at import,
    as scan_cache_dir's does, keep the old value: pass those the folder.)"""
    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "hf" / "hub"
    if getattr(request, "param", "HF_HOME") == "HF_HOME":
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    else:
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    importlib.reload(constants)
    cache.mkdir(parents=True)
    yield cache
    monkeypatch.undo()
    importlib.reload(constants)


def logits(m, tokenizer) -> torch.Tensor:
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        return m(ids).logits.float()


def make_adapter(base_spec: str, folder: Path) -> Path:
    """A LoRA adapter on base_spec with random B (a fresh one is B = 0: merging it would change nothing)."""
    m, _ = model.load_model(base_spec)
    m = model.add_lora(m, r=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_adapter(m, folder, base_spec)
    return folder


@pytest.mark.parametrize("hub_cache", ["HF_HOME", "HF_HUB_CACHE"], indirect=True)
def test_hub_ids_with_dots_load_from_the_cache(hub_cache, tiny_llama_dir):
    snapshots = {repo: put_in_hub_cache(hub_cache, repo, tiny_llama_dir) for repo in (QWEN_LIKE, LLAMA_LIKE)}
    assert constants.HF_HUB_CACHE == str(hub_cache), "the env var did not reach huggingface_hub"
    assert {r.repo_id for r in scan_cache_dir(hub_cache).repos} == set(snapshots), "not the hub's cache layout"
    for repo, snapshot in snapshots.items():
        assert model.resolve(repo) == (str(snapshot), None)
    m, tokenizer = model.load_model(QWEN_LIKE)
    assert tokenizer.chat_template and model.load_tokenizer(LLAMA_LIKE).chat_template == tokenizer.chat_template
    ref, ref_tokenizer = model.load_model(str(tiny_llama_dir))
    assert torch.equal(logits(m, tokenizer), logits(ref, ref_tokenizer))


def test_a_folder_wins_over_the_cache(hub_cache, tiny_llama_dir, tmp_path, monkeypatch):
    put_in_hub_cache(hub_cache, QWEN_LIKE, tiny_llama_dir)
    local = tmp_path / "work" / QWEN_LIKE
    local.mkdir(parents=True)
    (local / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    monkeypatch.chdir(tmp_path / "work")
    assert model.resolve(QWEN_LIKE) == (QWEN_LIKE, None)


def test_adapters_on_a_hub_base_load(hub_cache, tiny_llama_dir, tmp_path):
    """An adapter folder whose eva_base.json names a hub id, and the same adapter as a hub repository itself."""
    base = put_in_hub_cache(hub_cache, QWEN_LIKE, tiny_llama_dir)
    adapter = make_adapter(QWEN_LIKE, tmp_path / "adapter")
    assert json.loads((adapter / model.ADAPTER_BASE_FILE).read_text()) == {"base": QWEN_LIKE}
    hub_adapter = put_in_hub_cache(hub_cache, "me/name-eva-lora", adapter)
    assert model.resolve(str(adapter)) == (str(base), str(adapter))
    assert model.resolve("me/name-eva-lora") == (str(base), str(hub_adapter))
    m, tokenizer = model.load_model(str(adapter))
    from_hub, _ = model.load_model("me/name-eva-lora")
    plain, _ = model.load_model(QWEN_LIKE)
    assert torch.equal(logits(m, tokenizer), logits(from_hub, tokenizer))
    assert not torch.allclose(logits(m, tokenizer), logits(plain, tokenizer)), "the adapter changed nothing"


def test_missing_hub_id_and_missing_paths_one_line(hub_cache, tmp_path):
    want = (f"model 'Org/Missing-2.5B': neither a local folder nor in the Hugging Face cache ({hub_cache}); "
            f"download it with `hf download Org/Missing-2.5B` or give a folder")
    with pytest.raises(FileNotFoundError) as err:
        model.resolve("Org/Missing-2.5B")
    assert str(err.value) == want
    (tmp_path / "weights.gguf").write_text("")
    for spec in ("./x", str(tmp_path / "x"), "~/eva-no-such-model", "runs/demo/iter_1/adapter",
                 str(tmp_path / "weights.gguf")):
        with pytest.raises(FileNotFoundError) as err:
            model.resolve(spec)
        assert str(err.value) == f"model '{spec}': no such folder"


def test_export_adapter_bf16_in_shards(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    base = Path(shutil.copytree(tiny_llama_dir, tmp_path / "base"))
    # a chat model's own sampling defaults and turn-end tokens, as Llama-3.1-Instruct's folder has them
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, bos_token_id=1, eos_token_id=[2, 7],
                     pad_token_id=2).save_pretrained(base)
    adapter = make_adapter(str(base), tmp_path / "adapter")
    out = tmp_path / "out"
    model.main(["export", str(adapter), str(out), "--dtype", "bf16", "--max_shard_size", "100KB"])
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, shard.name
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert not any("lora" in k for k in merged.state_dict())
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(base).chat_template
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    assert GenerationConfig.from_pretrained(out).to_diff_dict() == GenerationConfig.from_pretrained(base).to_diff_dict()
    assert GenerationConfig.from_pretrained(out).eos_token_id == [2, 7]

    # a whole model folder re-saved: the default dtype is the folder's own (bf16 here), the weights unchanged
    again = tmp_path / "again"
    model.export(str(out), again)
    resaved = AutoModelForCausalLM.from_pretrained(again, dtype="auto")
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), resaved.state_dict().values()))
    assert {p.dtype for p in resaved.parameters()} == {torch.bfloat16}


def test_export_fp32_matches_the_adapter(tiny_llama_dir, tmp_path):
    adapter = make_adapter(str(tiny_llama_dir), tmp_path / "adapter")
    (tmp_path / "out").mkdir()  # an empty folder is fine
    model.export(str(adapter), tmp_path / "out", dtype="fp32")
    merged, tokenizer = model.load_model(str(tmp_path / "out"))
    with_adapter, _ = model.load_model(str(adapter))
    assert next(merged.parameters()).dtype == torch.float32
    torch.testing.assert_close(logits(merged, tokenizer), logits(with_adapter, tokenizer), atol=1e-5, rtol=1e-5)


def test_export_bad_input_one_line_before_loading(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(model, "load_model", no_loading)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    src, out = str(tiny_llama_dir), str(tmp_path / "out")
    cases = [(dict(source=src, out=tmp_path / "full"), ValueError, f"export: {tmp_path / 'full'} exists and is not "
                                                                    "empty; give a new folder"),
             (dict(source=src, out=out, dtype="fp8"), ValueError, "--dtype fp8: one of bf16, fp16, fp32"),
             (dict(source=src, out=out, max_shard_size="5 gigs"), ValueError,
              "--max_shard_size 5 gigs: a size such as 5GB or 500MB"),
             (dict(source=src, out=out, push_to_hub="me/a/b"), ValueError,
              "--push_to_hub me/a/b: not a hub repository id (org/name)"),
             (dict(source=str(tmp_path / "nope"), out=out), FileNotFoundError,
              f"model '{tmp_path / 'nope'}': no such folder")]
    for kwargs, error, line in cases:
        with pytest.raises(error) as err:
            model.export(**kwargs)
        assert str(err.value) == line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"^--push_to_hub me/model: HF_HUB_OFFLINE is set$"):
        model.export(src, out, push_to_hub="me/model")
    with pytest.raises(SystemExit):
        model.main(["export", src, out, "--dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    assert not Path(out).exists()


def test_cli_error_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "model.py", "export", "./no-such-adapter", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1 and run.stderr.splitlines()[-1] == "error: model './no-such-adapter': no such folder"
