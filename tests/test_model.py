"""Tests of model.py: every family generate.py decodes loads from a saved folder with the attention its class
supports and samples like transformers' generate; the attention choice; the token that ends an assistant turn.

    .venv/bin/python -m pytest tests/test_model.py -x -q
"""
import importlib.util

import pytest
import torch

import generate
import model
from generate import sample
from test_generate import PROMPTS, hf_greedy, tiny

# generate.DECODE_FAMILIES, then one family that decodes through the model's own forward
FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "qwen3"]


@pytest.fixture(scope="module")
def tok():
    return model.load_tokenizer("default")


def test_every_decode_family_is_tested():
    assert set(generate.DECODE_FAMILIES) <= set(FAMILIES) and "qwen3" not in generate.DECODE_FAMILIES


@pytest.mark.parametrize("arch", FAMILIES + ["toy gemma-2-9b-it"])
def test_saved_family_loads_and_samples_like_hf(tok, tmp_path, request, arch):
    """A folder (config, safetensors, tokenizer with its chat template) loads through load_model with SDPA, or eager
    for Gemma-2 (soft-capped logits), and greedy sampling equals transformers' greedy generate on the loaded model."""
    if arch.startswith("toy"):
        folder = request.getfixturevalue("toy_gemma2_dir")  # gemma-2-9b-it's shape: <end_of_turn> is not <eos>
    else:
        folder = tmp_path
        tiny(tok, arch).save_pretrained(folder)
        tok.save_pretrained(folder)
    m, t = model.load_model(str(folder))
    want = "eager" if m.config.model_type == "gemma2" else "sdpa"
    assert m.config._attn_implementation == want, f"{arch}: loaded with {m.config._attn_implementation}"
    ref = hf_greedy(m, t, PROMPTS, 12, generate.eos_ids(m, t))
    out = sample(m, t, PROMPTS, n=2, max_new_tokens=12, temperature=0, sync_every=3)
    assert [r[0] for r in out.token_ids] == ref and [r[1] for r in out.token_ids] == ref, f"{arch}: greedy differs"


def test_attention_choice_per_class_and_device(monkeypatch):
    """flash-attn only where installed, on a CUDA GPU of capability >= 8, for a class that supports it; else SDPA
    where the class supports it; else eager. The GPU and the package are faked: only the choice is under test."""
    from transformers import (MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, BloomConfig, Gemma2Config, LlamaConfig,
                              PretrainedConfig)
    choose = model.attention_implementation
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    real_find_spec, capability = importlib.util.find_spec, [9]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (capability[0], 0))
    if real_find_spec("flash_attn") is None:  # not installed: nothing but the package is missing for flash
        assert choose(LlamaConfig(), gpu) == "sdpa" and choose(Gemma2Config(), gpu) == "eager"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert choose(LlamaConfig(), gpu) == "flash_attention_2" and choose(Gemma2Config(), gpu) == "flash_attention_2"
    assert choose(BloomConfig(), gpu) == "eager", "Bloom supports neither flash-attn nor SDPA"
    assert choose(Gemma2Config(), gpu, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING) == "flash_attention_2"
    assert choose(LlamaConfig(), cpu) == "sdpa" and choose(Gemma2Config(), cpu) == "eager"
    assert choose(Gemma2Config(), cpu, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING) == "eager"
    capability[0] = 7  # a V100: flash-attn 2 does not run there
    assert choose(LlamaConfig(), gpu) == "sdpa" and choose(Gemma2Config(), gpu) == "eager"

    class RemoteConfig(PretrainedConfig):  # a class from a hub repository's own code: transformers decides
        model_type = "eva_remote_test"
    assert choose(RemoteConfig(), gpu) is None


def test_turn_end_id(toy_gemma2_dir, tok):
    gemma = model.load_tokenizer(str(toy_gemma2_dir))
    assert gemma.eos_token == "<eos>"
    assert gemma.convert_ids_to_tokens(model.turn_end_id(gemma)) == "<end_of_turn>"
    assert tok.convert_ids_to_tokens(model.turn_end_id(tok)) == "<|im_end|>"
