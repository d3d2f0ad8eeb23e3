"""Reward back-ends behind one call: `load_reward(spec).score(prompts, responses) -> list[float]`.

  rules                  the fraction of a prompt's IFEval instructions the response follows, in [0, 1]
                         (the checkers are in instructions.py)
  hf:<hub-id-or-folder>  a sequence-classification reward model, through its own tokenizer and chat template
                         (options batch_size, max_length, dtype); ArmoRM's checkpoint format is understood natively,
                         and remote code runs only with `?trust_remote_code=1`
  judge:<base-url>[?model=NAME&template=FILE&key_env=VAR&concurrency=N&timeout=S&retries=N]
                         an LLM judge behind an OpenAI-compatible endpoint, rating 1-10 (JUDGE_TEMPLATE); a response
                         it could not rate gets NaN (in scorer.info["unrated"]); a dead endpoint raises EndpointError
  py:<file.py>:<function>  your own batched function, fn(prompts: list[str], responses: list[str]) -> list[float],
                         called with the prompts' text; None or NaN = no rating (examples/concise_reward.py)

Under torchrun, score_sharded(scorer, prompts, responses) splits the items over the ranks and gathers them in order.
Rescore sample records: `python reward.py --reward rules --prompts pool.jsonl --samples s.jsonl --out scored.jsonl`.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import endpoint
import files
import instructions

# ----------------------------------------------------------------------------------------------- back-ends

@dataclass
class Scorer:
    """What load_reward returns: `score(prompts, responses) -> rewards`, plus what the back-end reports in info."""
    spec: str
    score: Callable[[list, list[str]], list[float]]
    info: dict = field(default_factory=dict)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    assert isinstance(prompt, dict) and "prompt" in prompt, f"a prompt must be a record with 'prompt', got {prompt!r}"
    return prompt["prompt"]


def _check_lengths(prompts: list, responses: list[str]) -> None:
    assert len(prompts) == len(responses), f"{len(prompts)} prompts but {len(responses)} responses"


def rules_reward(record: dict, response: str) -> float:
    """Fraction of the record's instructions the response follows (strict)."""
    followed = instructions.check_instructions(record, response)
    if not followed:
        raise ValueError(f"{instructions.record_name(record)}: no instructions, so the rules reward is undefined")
    return sum(followed) / len(followed)


def _rules_scorer() -> Scorer:
    def score(prompts: list[dict], responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        for i, record in enumerate(prompts):
            instructions.validate_record(record, f"item {i}")  # fail on a bad id before scoring anything
        return [rules_reward(p, r) for p, r in zip(prompts, responses)]
    return Scorer("rules", score)


JUDGE_TEMPLATE = """You are grading how well an AI assistant answered a user. Judge the response on how helpful, \
correct, complete and clear it is, and on whether it follows every instruction and constraint in the user's \
message (length, format, words to use or avoid, and so on). Ignore the response's length as such: a short answer \
that does everything asked is better than a long one that does not.

[User message]
{prompt}
[End of user message]

[Assistant response]
{response}
[End of assistant response]

Write one or two sentences of justification, then, on the last line, your rating as an integer from 1 (useless or \
ignores the request) to 10 (excellent, follows every instruction), in exactly this form:
Rating: N"""

_RATING_PATTERNS = (re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"),
                    re.compile(r"(?i)\brating\W{0,3}\s*(\d+(?:\.\d+)?)"),
                    re.compile(r"(?i)\b(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b"))


def parse_rating(text: str | None) -> float | None:
    """The judge's 1-10 rating from its reply (last match of the most specific form), or None when there is none."""
    if text is None:
        return None
    stripped = text.strip().strip("*").strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
        value = float(stripped)
    else:
        value = None
        for pattern in _RATING_PATTERNS:
            found = pattern.findall(text)
            if found:
                value = float(found[-1])
                break
    return value if value is not None and 1.0 <= value <= 10.0 else None


def fill_template(template: str, prompt: str, response: str) -> str:
    """The judge's message: {prompt} and {response} filled in one pass (braces inside the texts stay as written)."""
    return re.sub(r"\{(prompt|response)\}", lambda m: prompt if m.group(1) == "prompt" else response, template)


def _load_template(path: str | None) -> str:
    if path is None:
        return JUDGE_TEMPLATE
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"judge template {path}: no such file")
    text = file.read_text()
    for slot in ("{prompt}", "{response}"):
        if slot not in text:
            raise ValueError(f"judge template {path}: missing the placeholder {slot}")
    return text


def _judge_scorer(rest: str, *, model: str | None = None, template: str | None = None,
                  key_env: str = "OPENAI_API_KEY", concurrency: int = 8, timeout: float = 120, retries: int = 4,
                  max_tokens: int = 512, backoff: float = 1.0, check: bool = True) -> Scorer:
    parts = urllib.parse.urlsplit(rest)
    query = dict(urllib.parse.parse_qsl(parts.query))
    options = {"model": model, "template": template, "key_env": key_env, "concurrency": concurrency,
               "timeout": timeout, "retries": retries}
    for key, value in query.items():
        if key not in options:
            raise ValueError(f"judge:{rest}: unknown option '{key}' (known: {', '.join(options)})")
        kind = {"concurrency": int, "retries": int, "timeout": float}.get(key, str)
        try:
            options[key] = kind(value)
        except ValueError:
            raise ValueError(f"judge:{rest}: option '{key}' must be a {kind.__name__}, got {value!r}") from None
    base_url = urllib.parse.urlunsplit(parts._replace(query=""))
    endpoint.completions_url(base_url)  # raises on a malformed URL
    name = options["model"] or os.environ.get("EVA_JUDGE_MODEL")
    if not name:
        raise ValueError(f"judge:{rest}: no judge model name; add ?model=<name> or set EVA_JUDGE_MODEL")
    text = _load_template(options["template"])
    if check:
        endpoint.check_reachable(base_url, timeout=min(10.0, float(options["timeout"])))
    info: dict = {"unrated": []}
    call = dict(concurrency=int(options["concurrency"]), timeout=float(options["timeout"]),
                retries=int(options["retries"]), api_key_env=options["key_env"], max_tokens=max_tokens,
                backoff=backoff)

    def score(prompts: list, responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        messages = [[{"role": "user", "content": fill_template(text, _prompt_text(p), r)}]
                    for p, r in zip(prompts, responses)]
        replies = endpoint.chat_many(base_url, name, messages, **call)
        rewards, unrated = [], []
        for i, reply in enumerate(replies):
            rating = parse_rating(reply)
            if rating is None:
                reason = "call failed" if reply is None else f"unparseable reply {reply[-80:]!r}"
                unrated.append((i, reason))
            rewards.append(float("nan") if rating is None else rating)
        info["unrated"] = unrated
        if unrated:
            print(f"reward judge:{base_url}: {len(unrated)}/{len(replies)} responses unrated (NaN); "
                  f"first: item {unrated[0][0]}, {unrated[0][1]}", file=sys.stderr)
        return rewards
    return Scorer(f"judge:{rest}", score, info)


def _py_parts(rest: str) -> tuple[str, str]:
    """'<file.py>:<function>' -> (file, function); the last colon splits, so a Windows drive letter survives."""
    path, _, name = rest.rpartition(":")
    if not path or not name.isidentifier():
        raise ValueError(f"py:{rest}: expected py:<file.py>:<function>, such as py:examples/concise_reward.py:concise")
    return path, name


def _py_function(rest: str) -> Callable:
    """The named function of the file, which is imported once per process (check_spec's import is load_reward's)."""
    path, name = _py_parts(rest)
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"py:{rest}: {path}: no such file")
    # A name of its own, so that a file called reward.py or json.py shadows nothing already imported.
    key = "eva_py_reward_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    module = sys.modules.get(key)
    if module is None:
        spec = importlib.util.spec_from_file_location(key, file)
        if spec is None:
            raise ValueError(f"py:{rest}: {path} is not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # registered while it runs, as an import does (dataclasses in the file need it)
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # anything the user's file raises is reported as one line
            del sys.modules[key]
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(f"py:{rest}: importing {path} failed: {type(err).__name__}: {first}") from None
    if not hasattr(module, name):
        raise ValueError(f"py:{rest}: {path} defines no '{name}'")
    fn = getattr(module, name)
    if not callable(fn):
        raise ValueError(f"py:{rest}: '{name}' in {path} is a {type(fn).__name__}, not a function")
    return fn


def _py_scorer(rest: str) -> Scorer:
    fn = _py_function(rest)
    where = f"py:{rest}"

    def score(prompts: list, responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        values = fn([_prompt_text(p) for p in prompts], list(responses))
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
            raise ValueError(f"{where} returned a {type(values).__name__}, not a list of floats")
        if len(values) != len(responses):
            raise ValueError(f"{where} returned {len(values)} rewards for {len(responses)} responses")
        rewards = []
        for i, value in enumerate(values):
            try:
                reward = math.nan if value is None else float(value)
            except (TypeError, ValueError):
                reward = None
            if reward is None or isinstance(value, (str, bytes)) or math.isinf(reward):
                raise ValueError(f"{where} returned {value!r:.60} for item {i}: a reward must be a finite number "
                                 "(None or NaN for no rating)")
            rewards.append(reward)
        return rewards
    return Scorer(where, score)


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ValueError("not a yes/no value")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("not positive")
    return number


def _dtype_name(value: str) -> str:
    if value not in ("float32", "bfloat16", "float16"):
        raise ValueError("not float32, bfloat16 or float16")
    return value


HF_OPTIONS = {"trust_remote_code": _flag, "batch_size": _positive_int, "max_length": _positive_int,
              "dtype": _dtype_name}


def _hf_options(rest: str) -> tuple[str, dict]:
    """'<id-or-folder>[?trust_remote_code=1&batch_size=N&max_length=N&dtype=NAME]' -> (id-or-folder, options)."""
    ref, _, query = rest.partition("?")
    if not ref:
        raise ValueError(f"hf:{rest}: no hub id or folder before the options")
    options = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key not in HF_OPTIONS:
            raise ValueError(f"hf:{rest}: unknown option '{key}' (known: {', '.join(HF_OPTIONS)})")
        try:
            options[key] = HF_OPTIONS[key](value)
        except ValueError as err:
            raise ValueError(f"hf:{rest}: option '{key}' got {value!r}: {err}") from None
    return ref, options


# ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1), run by eva's own code rather than its repository's modeling_custom.py.
ARMORM = "LlamaForRewardModelWithGating"
ARMORM_GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"  # the last assistant header


def _checkpoint_tensors(ref: str, names: list[str]) -> dict:
    """The named tensors (fp32) from a folder's or cached hub model's safetensors, one file or sharded by an index."""
    from safetensors import safe_open
    from transformers.utils import cached_file
    index = cached_file(ref, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = {name: weight_map.get(name, "model.safetensors") for name in names}
    else:
        files = {name: "model.safetensors" for name in names}
    tensors = {}
    for file in sorted(set(files.values())):
        path = cached_file(ref, file, _raise_exceptions_for_missing_entries=False)
        if path is None:
            raise FileNotFoundError(f"hf:{ref}: {file} is missing")
        with safe_open(path, framework="pt") as shard:
            stored = set(shard.keys())
            for name in (n for n in names if files[n] == file and n in stored):
                tensors[name] = shard.get_tensor(name).float()
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"hf:{ref}: the reward head is not in the checkpoint ({missing[0]} missing); "
                         "this is not a trained reward model")
    return tensors


def _load_armorm(ref: str, config: dict, device, dtype) -> tuple:
    """ArmoRM as (backbone, head): a transformers LlamaModel (the checkpoint's model.* weights, no LM head) and the
    fp32 tensors of its gating head: regression [K, H], gating [(weight, bias)] * (n_hidden + 1), logit_scale,
    transform [K, K], temperature."""
    from transformers import MODEL_MAPPING, LlamaConfig, LlamaModel
    import model
    attention = model.attention_implementation(LlamaConfig(), device, MODEL_MAPPING)
    backbone, loading = LlamaModel.from_pretrained(ref, dtype=dtype, output_loading_info=True,
                                                   attn_implementation=attention)
    if loading.get("missing_keys"):
        raise ValueError(f"hf:{ref}: the Llama backbone is incomplete ({sorted(loading['missing_keys'])[0]} missing)")
    n_layers = config.get("gating_n_hidden", 3) + 1  # ArmoRM's defaults when the config leaves them out
    gating = [f"gating.layers.{i}.{p}" for i in range(n_layers) for p in ("weight", "bias")]
    t = _checkpoint_tensors(ref, ["regression_layer.weight", "gating.logit_scale", "reward_transform_matrix", *gating])
    t = {k: v.to(device) for k, v in t.items()}
    head = {"regression": t["regression_layer.weight"], "logit_scale": t["gating.logit_scale"].reshape(()),
            "transform": t["reward_transform_matrix"], "temperature": float(config.get("gating_temperature", 10)),
            "gating": [(t[f"gating.layers.{i}.weight"], t[f"gating.layers.{i}.bias"]) for i in range(n_layers)]}
    return backbone.to(device).eval(), head


def _last_occurrence(row: list[int], pattern: list[int]) -> int | None:
    for j in range(len(row) - len(pattern), -1, -1):
        if row[j:j + len(pattern)] == pattern:
            return j
    return None


def armorm_scores(hidden, lengths: list[int], gate_at: list[int], head: dict):
    """ArmoRM's preference score per row, [B], from the backbone's final (normed) hidden states [B, T, H]:
        r = W_reg h[last]                      (K objectives; last = lengths - 1, the last real token)
        g = softmax(MLP(h[gate_at]) / temperature) * logit_scale    (MLP: Linear+ReLU, ..., Linear)
        score = sum_k g_k (r @ transform)_k"""
    import torch
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, torch.tensor(lengths, device=hidden.device) - 1].float()  # [B, H]
    x = hidden[rows, torch.tensor(gate_at, device=hidden.device)].float()  # [B, H]
    for i, (weight, bias) in enumerate(head["gating"]):
        x = torch.nn.functional.linear(x, weight, bias)
        x = torch.relu(x) if i < len(head["gating"]) - 1 else x
    gate = torch.softmax(x / head["temperature"], dim=-1) * head["logit_scale"]  # [B, K]
    rewards = last @ head["regression"].T @ head["transform"]  # [B, K]
    return (gate * rewards).sum(-1)  # [B]


def _hf_scorer(rest: str, *, device: str = "cpu", batch_size: int = 8, max_length: int | None = None,
               dtype=None, trust_remote_code: bool = False) -> Scorer:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    ref, query = _hf_options(rest)  # options in the spec win over keyword arguments, as for judge:
    trust_remote_code = query.get("trust_remote_code", trust_remote_code)
    batch_size = query.get("batch_size", batch_size)
    max_length = query.get("max_length", max_length)
    dtype = getattr(torch, query["dtype"]) if "dtype" in query else dtype
    try:
        config, _ = PretrainedConfig.get_config_dict(ref)  # reads config.json only; runs no code
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"hf:{ref}: no model folder or cached hub model "
                                f"({str(err).strip().splitlines()[0]})") from None
    architectures = config.get("architectures") or []
    armorm = architectures == [ARMORM]  # eva's own code, with or without the opt-in
    native = config.get("model_type") in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    remote = not armorm and "AutoModelForSequenceClassification" in (config.get("auto_map") or {}) and (
        trust_remote_code or not native)
    if remote and not trust_remote_code:
        raise ValueError(f"hf:{ref}: this model's code is in its repository (auto_map), which eva runs only when "
                         f"asked: --reward 'hf:{ref}?trust_remote_code=1'")
    if not (armorm or remote or any(a.endswith("ForSequenceClassification") for a in architectures)):
        raise ValueError(f"hf:{ref}: no sequence-classification head (architectures {architectures}); a reward "
                         "model must load with AutoModelForSequenceClassification")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # loading reports are checked below, not printed
    try:
        if armorm:
            net, armo = _load_armorm(ref, config, device, dtype)
        else:
            from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoConfig
            import model
            hf_config = AutoConfig.from_pretrained(ref, trust_remote_code=remote)
            attention = model.attention_implementation(hf_config, device, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)
            net, loading = AutoModelForSequenceClassification.from_pretrained(
                ref, config=hf_config, trust_remote_code=remote, dtype=dtype, output_loading_info=True,
                attn_implementation=attention)
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=remote)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not armorm:
        fresh = [k for k in loading.get("missing_keys", []) if re.search(r"score|classifier|head|regression", k)]
        if fresh:
            raise ValueError(f"hf:{ref}: the classification head is not in the checkpoint ({fresh[0]} missing); "
                             "this is not a trained reward model")
        net.to(device).eval()
    # The head finds each row's last real token through config.pad_token_id. A configured pad id is the one the
    # model was trained with, so it is kept. Without one, each batch pads with an id that none of its rows
    # contains, so the head reads the true last token, as it does for a lone unpadded conversation.
    # eva's ArmoRM reads positions from the row lengths, so any id pads it.
    configured_pad = (tokenizer.eos_token_id or 0) if armorm else getattr(net.config, "pad_token_id", None)
    vocab_size = getattr(net.config, "vocab_size", None) or len(tokenizer)

    def pad_for(rows: list[list[int]]) -> int:
        if configured_pad is not None:
            return configured_pad
        used = set().union(*map(set, rows))
        preferred = [t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None]
        pad = next((t for t in [*preferred, *range(vocab_size)] if t not in used), None)
        assert pad is not None, f"hf:{ref}: every token id occurs in one batch; lower batch_size"
        net.config.pad_token_id = pad
        return pad
    limits = [max_length, getattr(net.config, "max_position_embeddings", None),
              tokenizer.model_max_length if tokenizer.model_max_length < 10**7 else None]
    limit = min(x for x in limits if x) if any(limits) else None
    info: dict = {"truncated": 0, "max_length": limit}
    bos = tokenizer.bos_token_id

    def encode(prompt, response: str) -> list[int]:
        messages = [{"role": "user", "content": _prompt_text(prompt)}, {"role": "assistant", "content": response}]
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(f"User: {_prompt_text(prompt)}\n\nAssistant: {response}")["input_ids"]

    if armorm:
        # ArmoRM gates on the hidden state where the last assistant header begins; its ids come from this tokenizer.
        pattern = tokenizer.encode(ARMORM_GATING_TEXT, add_special_tokens=False)
        if _last_occurrence(encode("Hi", "Hello"), pattern) is None:
            raise ValueError(f"hf:{ref}: ArmoRM gates on {ARMORM_GATING_TEXT!r}, which this tokenizer's chat "
                             "template does not produce (a Llama-3 tokenizer and template are needed)")

    def forward(ids, mask, rows: list[list[int]]):
        """[B] rewards of right-padded ids [B, T]."""
        if armorm:
            gate_at = [_last_occurrence(row, pattern) for row in rows]
            if None in gate_at:
                raise ValueError(f"hf:{ref}: a conversation lost its last assistant header {ARMORM_GATING_TEXT!r} "
                                 f"to truncation at {limit} tokens; ArmoRM cannot gate it")
            hidden = net(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
            return armorm_scores(hidden, [len(row) for row in rows], gate_at, armo)
        out = net(input_ids=ids, attention_mask=mask)
        if isinstance(out, torch.Tensor):
            values = out
        elif getattr(out, "score", None) is not None:
            values = out.score  # a remote-code head (such as ArmoRM's own) with a preference score, [B] or [B, 1]
        else:
            values = out.logits  # [B, num_labels]
        return values.reshape(len(rows), -1)[:, 0]

    def score(prompts: list, responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        encoded = [encode(p, r) for p, r in zip(prompts, responses)]
        truncated = 0
        if limit:
            for i, ids in enumerate(encoded):
                if len(ids) > limit:
                    # Keep the end: the head reads the last token, and the response is what is being judged.
                    head = [ids[0]] if bos is not None and ids[0] == bos else []
                    encoded[i] = head + ids[len(ids) - limit + len(head):]
                    truncated += 1
        if truncated:
            info["truncated"] += truncated
            print(f"reward hf:{ref}: truncated {truncated}/{len(encoded)} conversations to {limit} tokens",
                  file=sys.stderr)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
        rewards = [0.0] * len(encoded)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in rows)
                # Right padding: HF heads find the last real token either as "first pad - 1" (older and remote
                # code) or "last non-pad" (current transformers); right padding serves both.
                pad_id = pad_for([encoded[i] for i in rows])
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
                mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
                for b, i in enumerate(rows):
                    ids[b, :len(encoded[i])] = torch.tensor(encoded[i])
                    mask[b, :len(encoded[i])] = 1
                values = forward(ids.to(device), mask.to(device), [encoded[i] for i in rows])
                for b, value in enumerate(values.float().cpu().tolist()):
                    rewards[rows[b]] = value
        return rewards
    return Scorer(f"hf:{rest}", score, info)


def is_verifiable(spec: str) -> bool:
    """Whether the reward checks constraints the prompt record carries (the rules reward): then every prompt needs its
    instruction list, and the creator keeps its children's constraints checkable."""
    return spec == "rules"


def load_reward(spec: str, *, device: str = "cpu", **options) -> Scorer:
    """The reward back-end for a spec: "rules", "hf:<hub-id-or-folder>[?...]", "judge:<base-url>[?model=...]" or
    "py:<file.py>:<function>"."""
    if spec == "rules":
        if options:
            raise ValueError(f"reward 'rules' takes no options, got {sorted(options)}")
        return _rules_scorer()
    if spec.startswith("hf:") and spec[3:]:
        return _hf_scorer(spec[3:], device=device, **options)
    if spec.startswith("judge:") and spec[6:]:
        return _judge_scorer(spec[6:], **options)
    if spec.startswith("py:") and spec[3:]:
        if options:
            raise ValueError(f"reward '{spec}' takes no options, got {sorted(options)}")
        return _py_scorer(spec[3:])
    raise ValueError(_unknown_backend(spec))


def _unknown_backend(spec: str) -> str:
    return (f"unknown reward back-end {spec!r}: expected 'rules', 'hf:<id-or-path>', 'judge:<base-url>' or "
            "'py:<file.py>:<function>'")


def check_spec(spec: str) -> None:
    """Validate a --reward spec before anything loads: the back-end, its id or URL, and its options' names and values.
    Loads no model and calls no endpoint; a judge spec also needs its model name and template file, as at load; a py:
    spec's file is imported (load_reward reuses that import) and must define the function."""
    try:
        if spec == "rules":
            return
        if spec.startswith("hf:") and spec[3:]:
            _hf_options(spec[3:])
        elif spec.startswith("judge:") and spec[6:]:
            _judge_scorer(spec[6:], check=False)  # parses and checks without calling the endpoint
        elif spec.startswith("py:") and spec[3:]:
            _py_function(spec[3:])
        else:
            raise ValueError(_unknown_backend(spec))
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--reward: {err}") from None


def score_sharded(scorer: Scorer, prompts: list, responses: list[str]) -> list[float]:
    """scorer.score over this rank's shard under torchrun, gathered to every rank in order (plain call without)."""
    import parallel
    _check_lengths(prompts, responses)
    pairs = list(zip(prompts, responses))
    return parallel.sharded(lambda items: scorer.score([p for p, _ in items], [r for _, r in items]), pairs,
                            desc="reward")


# ----------------------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="(Re)score sample records with a reward back-end.")
    parser.add_argument("--reward", default="rules",
                        help="rules | hf:<id-or-path> | judge:<base-url>?model=NAME | py:<file.py>:<function>")
    parser.add_argument("--prompts", required=True, help="prompt records (JSON Lines; IFEval's format works)")
    parser.add_argument("--samples", required=True, help="sample records {prompt_id, responses: [...]}")
    parser.add_argument("--out", required=True, help="where the scored sample records go")
    parser.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    args = parser.parse_args(argv)
    import parallel
    device = args.device or str(parallel.init())
    prompts = {str(r.get("id", r.get("key"))): r for r in files.read_jsonl(args.prompts)}
    samples = files.read_jsonl(args.samples)
    flat_prompts, flat_responses = [], []
    for n, sample in enumerate(samples, 1):
        if str(sample.get("prompt_id")) not in prompts:
            raise ValueError(f"{args.samples}:{n}: prompt_id {sample.get('prompt_id')!r} is not in {args.prompts}")
        for response in sample["responses"]:
            flat_prompts.append(prompts[str(sample["prompt_id"])])
            flat_responses.append(response)
    scorer = load_reward(args.reward, device=device)
    rewards = score_sharded(scorer, flat_prompts, flat_responses)
    if parallel.is_main():
        scored, k = [], 0
        for sample in samples:
            r = rewards[k:k + len(sample["responses"])]
            k += len(r)
            scored.append(dict(sample, rewards=[None if math.isnan(x) else x for x in r]))
        files.write_jsonl(args.out, scored)
        print(f"scored {len(rewards)} responses of {len(samples)} prompts with {args.reward} -> {args.out}")


if __name__ == "__main__":
    main()
