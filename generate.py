"""Batched sampling: N responses for each of many prompts, from any causal LM that Hugging Face loads.

    from generate import sample
    out = sample(model, tok, ["Write a haiku about rain."], n=4, temperature=0.7, top_p=0.9, max_new_tokens=128)
    out.texts[0]      # 4 strings;  out.token_ids[0] -> 4 lists of token ids

    python generate.py --model default --prompt "Write a haiku about rain." -n 4 --temperature 0.7 --top_p 0.9
    python bench/bench_generate.py        # ours vs transformers' generate, same settings, ratio printed

One batch of P prompts (R = P * n sample rows) goes like this:
1. prefill: the prompts, left-padded to L, run once each through the model's own forward; their keys/values are
   written n times into a KV cache preallocated for all R rows and L + max_new_tokens positions.
2. decode: one token per row per step, with explicit position ids (0 at each row's first real token) and a 4-D
   additive mask we build (left padding, Gemma-2 / Mistral / Qwen2 sliding windows); logits of the last position
   only. Sampling and EOS checks stay on the device.
3. every `sync_every` steps one host sync: stop strings are checked on the decoded text, and the rows that ended
   leave the batch (their cache rows are dropped), so finished rows stop costing compute.
Attention is whatever the model was loaded with (model.py picks flash-attn's kernels on a GPU that runs them, SDPA
otherwise; Gemma-2 needs eager or flash for its soft-capping). `compile=True` compiles the decode step (GPU only,
untested on this CPU-only machine).

Randomness: every row owns a 32-bit key made from (seeds[i], sample index j); the uniform for step t is a hash of
(key, t) computed on the device with integer ops, and the token is drawn by inverse CDF from the filtered
distribution. So the samples of a prompt depend only on its seed, never on batch composition or batch size (up to
float rounding of batched matmuls, which can move a logit by ~1e-6).

Stop strings: a row ends at the first token after which its decoded text contains a stop string. The returned
text is cut just before the stop string; the returned token ids end with the token that completed it, so a stop
string spanning several tokens, or ending inside a token, is found too (that last token can carry a few characters
beyond the stop string, which the text drops). Texts and token ids never include EOS.
"""
import argparse
import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class SampleOutput:
    texts: list[list[str]]  # [prompt][sample]
    token_ids: list[list[list[int]]]  # [prompt][sample][token]


# ----------------------------------------------------------------------------- randomness and sampling

_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply); the same on Python ints and int64 tensors (no overflow: c < 2^27)."""
    x = x & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def _row_key(seed: int, sample_index: int) -> int:
    s = seed & (2**64 - 1)
    return _mix32(_mix32(_mix32(s) ^ (s >> 32)) + sample_index * 0x9E3779B9)


def _uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """keys [R] int64 -> [R] float64 uniforms in (0, 1), 53 random bits each, a pure function of (key, step)."""
    a = _mix32(keys ^ _mix32(2 * step + 1))  # [R]
    b = _mix32(a ^ 0x5BD1E995)  # [R]
    return ((a << 21) + (b >> 11)).double().add_(0.5).div_(2.0**53)


def _search(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First index where the (unnormalised) cdf [R, K] reaches u * total; u [R] -> [R] int64."""
    target = (u * cdf[:, -1].double()).to(cdf.dtype)  # [R]
    return torch.searchsorted(cdf, target[:, None]).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def _pick_nucleus(probs: torch.Tensor, idx: torch.Tensor, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """probs [R, K] sorted descending with their token ids idx [R, K] -> [R] tokens drawn from the top-p nucleus."""
    above = probs.cumsum(-1) - probs  # [R, K] mass of the tokens ranked above each token
    kept = torch.where(above < top_p, probs, 0.0)  # [R, K]
    return idx.gather(1, _search(kept.cumsum(-1), u)[:, None]).squeeze(1)


def _sample_from_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, u: torch.Tensor,
                        candidates: int | None = None) -> torch.Tensor:
    """One token per row from logits [R, V] with uniforms u [R] -> [R] int64.

    The distribution is transformers' (warpers in this order): logits / temperature; keep the top_k tokens (0 = all);
    keep the most likely tokens while the mass ranked above them is below top_p (the first one always); renormalise.
    The draw is an inverse CDF over the kept tokens in descending order. A full sort of a [128, 49152] row block
    costs ~0.4 s on a CPU core pair, so without top_k the CPU path takes the top `candidates` (64) tokens and sorts
    the whole vocabulary only for the rows whose nucleus reaches past them (exact, not an approximation).
    """
    R, V = logits.shape
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    scaled = logits.float() / temperature  # [R, V]
    if top_k == 0 and top_p >= 1.0:  # plain temperature sampling: any fixed order works, no sort needed
        return _search(scaled.softmax(-1).cumsum(-1), u)
    if candidates is None:
        candidates = 64 if logits.device.type == "cpu" else V  # GPUs sort fast; the check below would sync
    k = min(top_k if top_k > 0 else candidates, V)
    vals, idx = scaled.topk(k, dim=-1)  # [R, k] descending
    log_z = (vals if top_k > 0 else scaled).logsumexp(-1, keepdim=True)  # [R, 1]
    probs = (vals - log_z).exp()  # [R, k]
    tokens = _pick_nucleus(probs, idx, top_p, u)  # [R]
    if top_k == 0 and k < V:
        short = probs.sum(-1) < top_p  # [R] the nucleus reaches past the candidates
        if short.any():  # one host sync per step, only on the CPU path (free there)
            rows = short.nonzero().squeeze(1)
            vals, idx = scaled[rows].sort(-1, descending=True)  # [r, V]
            tokens[rows] = _pick_nucleus((vals - log_z[rows]).exp(), idx, top_p, u[rows])
    return tokens


# ----------------------------------------------------------------------------- KV cache and masks

class _Layer(CacheLayerMixin):
    """One layer's keys/values, [R, H_kv, S, D] each, allocated at the first write and filled left to right.

    The prefill writes P = R / n prompt rows; each is copied into its n sample rows. In `static` mode (compiled
    decode) the whole buffer is returned so shapes never change, and writes go to the tensor position `write_at`."""

    def __init__(self, rows: int, max_len: int, expand: int, static: bool):
        super().__init__()
        self.rows, self.max_len, self.expand, self.static, self.length = rows, max_len, expand, static, 0
        self.write_at = None

    def lazy_initialization(self, key_states, value_states):
        _, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(self.rows, h, self.max_len, d)  # [R, H_kv, S, D]
        self.values = value_states.new_zeros(self.rows, h, self.max_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        if self.length == 0:  # prefill: [P, H, L, D] -> every sample row of its prompt
            p, h, _, d = key_states.shape
            self.keys.view(p, self.expand, h, self.max_len, d)[:, :, :, :q] = key_states[:, None]
            self.values.view(p, self.expand, h, self.max_len, -1)[:, :, :, :q] = value_states[:, None]
            self.length = q
            return key_states, value_states
        if self.static:
            self.keys.index_copy_(2, self.write_at, key_states)
            self.values.index_copy_(2, self.write_at, value_states)
            self.length += q
            return self.keys, self.values
        self.keys[:, :, self.length:self.length + q] = key_states
        self.values[:, :, self.length:self.length + q] = value_states
        self.length += q
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.max_len if self.static else self.length + query_length), 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.keys, self.values = self.keys.index_select(0, rows), self.values.index_select(0, rows)
        self.rows = len(rows)


def _new_cache(model, rows: int, max_len: int, expand: int, static: bool) -> Cache:
    n_layers = model.config.get_text_config().num_hidden_layers
    return Cache(layers=[_Layer(rows, max_len, expand, static) for _ in range(n_layers)])


def _masks(config, first: torch.Tensor, q_slots: torch.Tensor, kv_len: int, dtype: torch.dtype):
    """Additive masks [B, 1, Q, kv_len] for queries at cache slots q_slots [Q]; row b's real tokens start at first[b].

    A padding query may see itself only (so no row is fully masked and no NaN reaches the cache). Returns one mask,
    or {layer type: mask} for models that mix full and sliding-window layers (Gemma-2, Qwen2 with a window)."""
    kv = torch.arange(kv_len, device=first.device)  # [S]
    qs = q_slots[:, None]  # [Q, 1]
    ok = (kv[None, None] >= first[:, None, None]) & (kv <= qs)  # [B, Q, S]
    ok |= kv == qs
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or [])

    def additive(allowed):
        return torch.zeros(allowed.shape, dtype=dtype, device=first.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)[:, None]  # [B, 1, Q, S]

    if "sliding_attention" in types:
        return {"full_attention": additive(ok), "sliding_attention": additive(ok & (qs - kv < window))}
    if window and not types:  # Mistral: every layer slides
        return additive(ok & (qs - kv < window))
    return additive(ok)


# ----------------------------------------------------------------------------- the sampler

def _forward(model, ids, positions, mask, cache, cache_kw: str) -> torch.Tensor:
    """Logits [B, V] (fp32) of the last position of ids [B, T]."""
    out = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    return out.logits[:, -1].float()


def _cache_kwarg(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def _cut_at_stop(tokenizer, tokens: list[int], stop: list[str]) -> tuple[str, list[int]]:
    """(text before the first stop string, tokens up to the one that completes it)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    hits = [text.find(s) for s in stop if s in text]
    if not hits:
        return text, tokens
    cut = min(hits)
    lo, hi = 1, len(tokens)  # the shortest prefix whose text contains a stop string (containment is monotone)
    while lo < hi:
        mid = (lo + hi) // 2
        prefix = tokenizer.decode(tokens[:mid], skip_special_tokens=True)
        lo, hi = (lo, mid) if any(s in prefix for s in stop) else (mid + 1, hi)
    return text[:cut], tokens[:lo]


@torch.inference_mode()
def _sample_batch(model, tokenizer, ids: list[list[int]], keys: list[int], n: int, cfg: dict) -> list[list[int]]:
    """Token ids for the R = len(ids) * n rows (row i * n + j = sample j of prompt i), EOS and stop not cut yet."""
    device = model.get_input_embeddings().weight.device
    dtype = model.get_input_embeddings().weight.dtype
    config, max_new, stop = model.config.get_text_config(), cfg["max_new_tokens"], cfg["stop"]
    P, L = len(ids), max(len(x) for x in ids)
    R, S = P * n, L + max_new
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    flash = config._attn_implementation.startswith("flash")  # flash-attn wants a 2-D padding mask
    prompt = torch.tensor([[pad] * (L - len(x)) + x for x in ids], device=device)  # [P, L]
    first = torch.tensor([L - len(x) for x in ids], device=device)  # [P] slot of each prompt's first token
    slots = torch.arange(L, device=device)  # [L]
    cache = _new_cache(model, R, S, n, static=cfg["compile"])
    mask = (slots >= first[:, None]).long() if flash else _masks(config, first, slots, L, dtype)
    logits = _forward(model, prompt, (slots - first[:, None]).clamp(min=0), mask, cache, cfg["cache_kw"])  # [P, V]
    logits = logits.repeat_interleave(n, 0)  # [R, V]
    first = first.repeat_interleave(n)  # [R]
    keys_t = torch.tensor(keys, dtype=torch.int64, device=device)  # [R]
    eos = torch.tensor(cfg["eos"], device=device)
    out = torch.full((R, max_new), pad, dtype=torch.long, device=device)  # [R, T] tokens, original row order
    alive = torch.arange(R, device=device)  # [R'] original row of each batch row
    done = torch.zeros(R, dtype=torch.bool, device=device)  # [R']
    decode = cfg["step"]
    for t in range(max_new):
        tok = _sample_from_logits(logits, cfg["temperature"], cfg["top_p"], cfg["top_k"], _uniforms(keys_t, t))
        tok = torch.where(done, pad, tok)  # [R']
        out[alive, t] = tok
        done |= torch.isin(tok, eos)
        if t == max_new - 1:
            break
        if (t + 1) % cfg["sync_every"] == 0:  # the only host syncs of the loop
            if stop:
                for b in (~done).nonzero().squeeze(1).tolist():
                    text = tokenizer.decode(out[alive[b], :t + 1].tolist(), skip_special_tokens=True)
                    if any(s in text for s in stop):
                        done[b] = True
            n_done = int(done.sum())
            if n_done == len(done):
                break
            if n_done >= max(1, len(done) // 8):  # drop finished rows when enough have piled up to pay the copy
                keep = (~done).nonzero().squeeze(1)  # [R'']
                for layer in cache.layers:
                    layer.keep_rows(keep)
                alive, keys_t, first, done, tok = alive[keep], keys_t[keep], first[keep], done[keep], tok[keep]
        q_slot = torch.tensor([L + t], device=device)
        if flash:
            mask = (torch.arange(L + t + 1, device=device) >= first[:, None]).long()  # [R', L + t + 1]
        else:
            mask = _masks(config, first, q_slot, S if cfg["compile"] else L + t + 1, dtype)
        if cfg["compile"]:
            for layer in cache.layers:
                layer.write_at = q_slot
        logits = decode(model, tok[:, None], (L + t - first)[:, None], mask, cache, cfg["cache_kw"])  # [R', V]
    return out.tolist()


def _encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False)
        return tokenizer(prompt, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def sample(model, tokenizer, prompts: list[str], n: int = 1, *, max_new_tokens: int = 256, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None, seed: int = 0,
           seeds: list[int] | None = None, chat: bool = True, batch_size: int = 16, progress: bool = False,
           sync_every: int = 8, compile: bool = False) -> SampleOutput:
    """n samples for each prompt; batch_size prompts (batch_size * n rows) are decoded together."""
    if n < 1 or max_new_tokens < 1 or batch_size < 1 or sync_every < 1:
        raise ValueError(f"sample: n, max_new_tokens, batch_size, sync_every must be >= 1, got "
                         f"{n}, {max_new_tokens}, {batch_size}, {sync_every}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"sample: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))] if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"sample: {len(seeds)} seeds for {len(prompts)} prompts")
    if any(s == "" for s in stop or []):
        raise ValueError("sample: an empty stop string would stop every row at once")
    step = _forward
    if compile:
        step = torch.compile(_forward, mode="reduce-overhead", dynamic=False)
    cfg = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=list(stop or []),
               eos=_eos_ids(model, tokenizer), cache_kw=_cache_kwarg(model), sync_every=sync_every, compile=compile,
               step=step)
    ids = [_encode(tokenizer, p, chat) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))  # similar lengths together: less padding
    texts, tokens = [None] * len(prompts), [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="sample", unit="batch")
    eos = set(cfg["eos"])
    for batch in batches:
        keys = [_row_key(seeds[i], j) for i in batch for j in range(n)]
        rows = _sample_batch(model, tokenizer, [ids[i] for i in batch], keys, n, cfg)
        for b, i in enumerate(batch):
            texts[i], tokens[i] = [], []
            for row in rows[b * n:(b + 1) * n]:
                end = next((k for k, x in enumerate(row) if x in eos), len(row))
                text, row = _cut_at_stop(tokenizer, row[:end], cfg["stop"])
                texts[i].append(text)
                tokens[i].append(row)
    return SampleOutput(texts=texts, token_ids=tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description="Sample n responses per prompt from a model.")
    ap.add_argument("--model", default="default", help="'default', a hub id, a model folder or an adapter folder")
    ap.add_argument("--prompt", action="append", required=True, help="a user message; repeat for several")
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top_p", type=float, default=0.9)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--stop", action="append", default=None, help="a stop string; repeat for several")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no_chat", action="store_true", help="send the prompt as raw text, no chat template")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--load_in_4bit", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    args = ap.parse_args()
    import model as model_lib
    model, tokenizer = model_lib.load_model(args.model, device=args.device, load_in_4bit=args.load_in_4bit)
    out = sample(model, tokenizer, args.prompt, args.n, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, stop=args.stop, seed=args.seed,
                 chat=not args.no_chat, compile=args.compile)
    for prompt, texts in zip(args.prompt, out.texts):
        print(f"### prompt: {prompt}")
        for j, text in enumerate(texts):
            print(f"--- sample {j}\n{text}")


if __name__ == "__main__":
    main()
