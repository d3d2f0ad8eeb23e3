"""ArmoRM (the paper's reward model) in eva's own code, and remote code as an opt-in only.

The toy folder (conftest.make_toy_armorm) has ArmoRM's config, parameter names and Llama-3 turn format, and an
auto_map to a modeling_custom.py that is not there. The reference below recomputes ArmoRM's score from the same
safetensors with transformers' LlamaModel and plain torch, without calling reward.py's implementation.
"""
import json
import shutil
import sys

import pytest
import torch

import reward

PROMPTS = ["Write a haiku about autumn.", "What is 2 + 2?", "Say hi."]
RESPONSES = ["Leaves fall slowly down,\n\nred and gold upon the ground, the year exhales.", "4", "Hi there, friend!"]


def reference_scores(folder, prompts: list[str], responses: list[str]) -> list[float]:
    """ArmoRM's formula, one unpadded conversation at a time: the backbone's final normed hidden states h [T, H];
    r = W_reg h[-1]; g = softmax(gating MLP(h[j]) / temperature) * logit_scale, where j is where the last
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n" begins; score = sum(g * (r @ M))."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaModel
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    backbone = LlamaModel.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    header = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|start_header_id|>")]
    header += tokenizer.encode("assistant", add_special_tokens=False)
    header += [tokenizer.convert_tokens_to_ids("<|end_header_id|>"), tokenizer.convert_tokens_to_ids("\n\n")]
    scores = []
    for prompt, response in zip(prompts, responses):
        text = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt.strip()}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n{response.strip()}<|eot_id|>")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        j = max(i for i in range(len(ids)) if ids[i:i + len(header)] == header)
        with torch.no_grad():
            h = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [T, H]
        r = weights["regression_layer.weight"] @ h[-1]  # [19]
        x = h[j]
        n = config["gating_n_hidden"]
        for i in range(n + 1):
            x = weights[f"gating.layers.{i}.weight"] @ x + weights[f"gating.layers.{i}.bias"]
            x = torch.relu(x) if i < n else x
        g = torch.softmax(x / config["gating_temperature"], dim=0) * weights["gating.logit_scale"][0]
        scores.append(float((g * (r @ weights["reward_transform_matrix"])).sum()))
    return scores


def test_armorm_matches_the_formula(toy_armorm_dir):
    scorer = reward.load_reward(f"hf:{toy_armorm_dir}", batch_size=3)  # one padded batch of three lengths
    rewards = scorer.score([{"prompt": p} for p in PROMPTS], RESPONSES)
    expected = reference_scores(toy_armorm_dir, PROMPTS, RESPONSES)
    assert rewards == pytest.approx(expected, abs=1e-4)
    assert len({round(x, 4) for x in rewards}) == 3, f"the toy should tell the conversations apart: {rewards}"


def test_armorm_alone_equals_padded_batch(toy_armorm_dir):
    scorer = reward.load_reward(f"hf:{toy_armorm_dir}", batch_size=8)
    batch = scorer.score(PROMPTS, RESPONSES)
    for i in range(len(PROMPTS)):
        assert scorer.score([PROMPTS[i]], [RESPONSES[i]])[0] == pytest.approx(batch[i], abs=1e-5)


def test_armorm_never_runs_repository_code(toy_armorm_dir, tmp_path):
    folder = shutil.copytree(toy_armorm_dir, tmp_path / "armorm")
    (folder / "modeling_custom.py").write_text('raise RuntimeError("modeling_custom.py was imported")\n')
    before = set(sys.modules)
    for spec in (f"hf:{folder}", f"hf:{folder}?trust_remote_code=1"):  # ArmoRM is eva's own code either way
        rewards = reward.load_reward(spec).score(PROMPTS[:1], RESPONSES[:1])
        assert rewards == pytest.approx(reference_scores(toy_armorm_dir, PROMPTS[:1], RESPONSES[:1]), abs=1e-4)
    assert not [m for m in set(sys.modules) - before if "modeling_custom" in m]


def test_armorm_needs_the_llama3_header(toy_armorm_dir, tmp_path):
    folder = shutil.copytree(toy_armorm_dir, tmp_path / "armorm")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                                "{% endfor %}")
    with pytest.raises(ValueError, match=r"armorm: ArmoRM gates on .*does not produce"):
        reward.load_reward(f"hf:{folder}")


def test_remote_code_is_opt_in(toy_armorm_dir, tmp_path):
    folder = shutil.copytree(toy_armorm_dir, tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["CustomRewardModel"], model_type="custom_rm",
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForSequenceClassification": "modeling_custom.CustomRewardModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text('raise RuntimeError("modeling_custom.py was imported")\n')
    with pytest.raises(ValueError) as err:
        reward.load_reward(f"hf:{folder}")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"hf:{folder}: ") and f"hf:{folder}?trust_remote_code=1" in message
    with pytest.raises(ValueError, match=r"unknown option 'trust_remote'"):
        reward.load_reward(f"hf:{folder}?trust_remote=1")


@pytest.mark.parametrize("spec", ["rules", "hf:RLHFlow/ArmoRM-Llama3-8B-v0.1", "hf:/models/rm?trust_remote_code=1",
                                  "hf:org/rm?batch_size=4&max_length=2048&dtype=bfloat16&trust_remote_code=false",
                                  "judge:http://localhost:8000/v1?model=judge&concurrency=4&timeout=30"])
def test_check_spec_accepts(spec):
    reward.check_spec(spec)


@pytest.mark.parametrize("spec, problem", [
    ("rule", r"unknown reward back-end 'rule'"),
    ("hf:", r"unknown reward back-end 'hf:'"),
    ("hf:?trust_remote_code=1", r"no hub id or folder"),
    ("hf:org/rm?trust=1", r"unknown option 'trust' \(known: trust_remote_code"),
    ("hf:org/rm?trust_remote_code=maybe", r"option 'trust_remote_code' got 'maybe'"),
    ("hf:org/rm?trust_remote_code", r"option 'trust_remote_code' got ''"),
    ("hf:org/rm?batch_size=0", r"option 'batch_size' got '0'"),
    ("hf:org/rm?dtype=fp8", r"option 'dtype' got 'fp8'"),
    ("judge:", r"unknown reward back-end 'judge:'"),
    ("judge:localhost:8000?model=j", r"not an http\(s\) URL"),
    ("judge:http://localhost:8000/v1?model=j&retries=many", r"option 'retries' must be a int"),
    ("judge:http://localhost:8000/v1?modle=j", r"unknown option 'modle'"),
])
def test_check_spec_names_the_flag(spec, problem, monkeypatch):
    monkeypatch.setenv("EVA_JUDGE_MODEL", "judge")
    with pytest.raises(ValueError, match=problem) as err:
        reward.check_spec(spec)
    assert str(err.value).startswith("--reward: ") and "\n" not in str(err.value)


def test_armorm_truncated_header_is_an_error(toy_armorm_dir):
    scorer = reward.load_reward(f"hf:{toy_armorm_dir}?max_length=12")
    assert scorer.info["max_length"] == 12
    with pytest.raises(ValueError, match=r"lost its last assistant header .* at 12 tokens") as err:
        scorer.score(["Say hi."], [" ".join(["word"] * 30)])
    assert "\n" not in str(err.value)
