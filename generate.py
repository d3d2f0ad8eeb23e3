"""Batched sampling: N responses for each of many prompts, from any causal LM that Hugging Face loads.

    from generate import sample
    out = sample(model, tok, ["Write a haiku about rain."], n=4, temperature=0.7, top_p=0.9, max_new_tokens=128)
    out.texts[0]      # 4 strings;  out.token_ids[0] -> 4 lists of token ids

    python generate.py --model default --prompt "Write a haiku about rain." -n 4 --temperature 0.7 --top_p 0.9
    python bench/bench_generate.py        # ours vs transformers' generate, same settings, ratio printed

One batch of P prompts (R = P * n sample rows):
1. prefill: the prompts, longest first, in groups padded to the group's longest, through the model's own forward
   and attention (flash-attn's kernels where model.py picked them, else SDPA / eager) with a 4-D mask we build
   (left padding, sliding windows). Their keys/values are kept ONCE per prompt, [P, H_kv, L, D] per layer.
2. decode: one token per row per step through the model's forward, with explicit position ids (0 at each row's
   first real token), logits for the last position only, and our attention function (registered with
   transformers as "eva_shared"): the n samples of a prompt read its prompt keys in one matmul, their own tokens
   from a preallocated [R, H_kv, max_new, D] buffer, one exact softmax over both. Sampling and EOS stay on device.
3. every `sync_every` steps one host sync: stop strings are checked on the decoded text, and finished rows leave
   the batch (their buffers are dropped, and a prompt's keys once all its rows are done).
`compile=True` wraps the decode step in torch.compile (meant for GPUs; untested here, this machine has none).

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
import sys
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
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


def _unnormalised_probs(x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """exp(x - top) for x [R, V] and row maxima top [R, 1]. exp() of floats below about -87 takes a slow path on
    CPUs (20x, denormals); weights below e^-80 relative to the top token are raised to e^-80 (< 2e-35, which leaves
    every fp32 sum over a vocabulary unchanged), so that path is never taken."""
    return (x - top).clamp_(min=-80.0).exp_()


def _sample_from_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, u: torch.Tensor,
                        candidates: int | None = None) -> torch.Tensor:
    """One token per row from logits [R, V] with uniforms u [R] -> [R] int64.

    The distribution is transformers' (warpers in this order): logits / temperature; keep the top_k tokens (0 = all);
    keep the most likely tokens while the mass ranked above them is below top_p (the first one always); renormalise.
    The draw is an inverse CDF over the kept tokens in descending order. A full sort of a [128, 49152] row block
    costs ~0.4 s on a CPU core pair, so without top_k the CPU path takes the top `candidates` (64) tokens, and only
    for the rows whose nucleus reaches past them 16x more, and so on up to the whole vocabulary: exact, since a row's
    nucleus is known to lie inside its candidates once their mass reaches top_p.
    """
    R, V = logits.shape
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    scaled = logits.float() / temperature  # [R, V]
    if top_k == 0 and top_p >= 1.0:  # plain temperature sampling: any fixed order works, no sort needed
        return _search(_unnormalised_probs(scaled, scaled.amax(-1, keepdim=True)).cumsum(-1), u)
    if candidates is None:
        candidates = 64 if logits.device.type == "cpu" else V  # GPUs sort fast; the check below would sync
    k = min(top_k if top_k > 0 else candidates, V)
    vals, idx = scaled.topk(k, dim=-1)  # [R, k] descending
    top = vals[:, :1]  # [R, 1] the row maximum
    log_z = top + _unnormalised_probs(vals if top_k > 0 else scaled, top).sum(-1, keepdim=True).log()  # [R, 1]
    probs = (vals - log_z).exp()  # [R, k]
    tokens = _pick_nucleus(probs, idx, top_p, u)  # [R]
    rows = torch.arange(R, device=logits.device)  # [r] rows still being resolved
    while top_k == 0 and k < V:  # rows whose nucleus reaches past the k candidates: 16x more, then all
        short = probs.sum(-1) < top_p  # [r]
        if not short.any():  # one host sync, on the CPU path only (free there)
            break
        rows, k = rows[short], min(16 * k, V)
        vals, idx = scaled[rows].topk(k, dim=-1)  # [r, k]
        probs = (vals - log_z[rows]).exp()
        tokens[rows] = _pick_nucleus(probs, idx, top_p, u[rows])
    return tokens


# ----------------------------------------------------------------------------- KV cache, masks, attention

class _Layer(CacheLayerMixin):
    """One layer's keys/values: the prompt part once per prompt, [P, H_kv, L, D], and each row's own generated
    part, [R, H_kv, D, max_new] (keys stored transposed) and [R, H_kv, max_new, D]; allocated once, filled in place.

    While `group` = (first prompt, first slot) is set, update() stores a prefill group of prompts (left-padded to
    its own length, right-aligned to slot L); afterwards each call appends one decode token per row and returns
    the rows' generated keys/values, which _shared_prefix_attention joins with the prompt part."""

    def __init__(self, prompts: int, prompt_len: int, max_new: int):
        super().__init__()
        self.prompts, self.prompt_len, self.max_new, self.generated = prompts, prompt_len, max_new, 0
        self.group: tuple[int, int] | None = None
        self.new_keys = self.new_values = None

    def lazy_initialization(self, key_states, value_states):
        _, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(self.prompts, h, self.prompt_len, d)  # [P, H_kv, L, D]
        self.values = value_states.new_zeros(self.prompts, h, self.prompt_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.group is not None:  # prefill: [p, H_kv, L_g, D] for prompts p0.. at slots off..L
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            (p0, off), p = self.group, key_states.shape[0]
            self.keys[p0:p0 + p, :, off:] = key_states
            self.values[p0:p0 + p, :, off:] = value_states
            return key_states, value_states
        if self.new_keys is None:
            r, h, _, d = key_states.shape
            self.new_keys = key_states.new_zeros(r, h, d, self.max_new)  # [R, H_kv, D, max_new]: K^T, ready to matmul
            self.new_values = value_states.new_zeros(r, h, self.max_new, value_states.shape[-1])
        t = self.generated
        self.new_keys[:, :, :, t:t + 1] = key_states.transpose(2, 3)  # [R, H_kv, D, 1]
        self.new_values[:, :, t:t + 1] = value_states
        self.generated += 1
        return self.new_keys[..., :t + 1], self.new_values[:, :, :t + 1]  # K^T [R, H_kv, D, t], V [R, H_kv, t, D]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # asked by flash-attn's prefill only
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.group is not None else self.prompt_len + self.generated

    def get_max_length(self) -> int:
        return self.prompt_len + self.max_new

    def keep(self, rows: torch.Tensor, prompts: torch.Tensor | None) -> None:
        """Drop finished rows (and prompts with no row left)."""
        if self.new_keys is not None:  # None when rows leave before the first decode step
            self.new_keys, self.new_values = self.new_keys.index_select(0, rows), self.new_values.index_select(0, rows)
        if prompts is not None:
            self.keys, self.values = self.keys.index_select(0, prompts), self.values.index_select(0, prompts)


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


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A decode step's attention; the model calls it in place of sdpa/eager/flash (registered as `eva_shared`).

    query [R, H, 1, D]; key = K^T [R, H_kv, D, t] and value [R, H_kv, t, D]: each row's generated tokens. The
    prompt keys sit once per prompt in the cache layer, [P, H_kv, L, D], and attention_mask [P, 1, 1, L] masks
    their padding (and what a sliding window has passed). The n samples of a prompt read its keys in one matmul; one softmax spans both parts, so the
    result equals attention over the concatenated keys. Soft-capping (Gemma-2) and sliding windows included."""
    ctx = kwargs["eva_shared"]
    layer, n, slot = ctx["layers"][module.layer_idx], ctx["n"], ctx["slot"]  # slot [R]: p * n + j of each row
    R, H, _, D = query.shape
    P, Hk, L, _ = layer.keys.shape
    g = H // Hk
    window, cap = kwargs.get("sliding_window"), kwargs.get("softcap")
    if window:  # the row's own tokens older than the window drop out (the prompt part is masked by the caller)
        key, value = key[..., -window:], value[:, :, -window:]

    def to_prompts(x):  # [R, H_kv, g, X] -> [P, H_kv, n * g, X]; rows that left the batch become zeros
        full = x.new_zeros(P * n, *x.shape[1:]).index_copy_(0, slot, x)
        return full.view(P, n, Hk, g, -1).transpose(1, 2).reshape(P, Hk, n * g, -1)

    def to_rows(x):  # [P, H_kv, n * g, X] -> [R, H_kv, g, X]
        return x.view(P, Hk, n, g, -1).transpose(1, 2).reshape(P * n, Hk, g, -1).index_select(0, slot)

    def scores(q, k_t):
        s = torch.matmul(q, k_t).float() * (scaling if scaling is not None else D**-0.5)
        return torch.tanh(s / cap) * cap if cap else s

    q = query.reshape(R, Hk, g, D)  # [R, H_kv, g, D]
    s_prompt = scores(to_prompts(q), layer.keys.transpose(-1, -2)) + attention_mask.float()  # [P, H_kv, n * g, L]
    s_own = to_prompts(scores(q, key))  # [P, H_kv, n * g, t]
    top = torch.maximum(s_prompt.amax(-1, keepdim=True), s_own.amax(-1, keepdim=True))  # [P, H_kv, n * g, 1]
    # exp() of a very negative float is ~20x slower on CPUs (denormals); below -80 the weight is < 2e-35 anyway
    e_prompt = (s_prompt - top).clamp_(min=-80).exp_() * (attention_mask == 0)  # masked keys: exactly 0
    e_own = (s_own - top).clamp_(min=-80).exp_()
    total = e_prompt.sum(-1, keepdim=True) + e_own.sum(-1, keepdim=True)  # [P, H_kv, n * g, 1]
    out = to_rows(torch.matmul(e_prompt.to(value.dtype), layer.values))  # [R, H_kv, g, D]
    out = (out + torch.matmul(to_rows(e_own).to(value.dtype), value)) / to_rows(total).to(value.dtype)
    return out.reshape(R, 1, H, D), None


AttentionInterface.register("eva_shared", _shared_prefix_attention)


# ----------------------------------------------------------------------------- the sampler

def is_out_of_memory(err: BaseException) -> bool:
    """An accelerator out-of-memory error, whichever class the backend raised it as."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                             and "out of memory" in str(err).lower())


def halve_on_oom(fn, batch_size: int, what: str):
    """fn(batch_size); after an out-of-memory error, free the cache and retry with half the batch, down to 1.

    Only for work whose results do not depend on the batch size (sample() seeds every prompt on its own), so
    a retry changes the speed and nothing else. Out of memory with a batch of 1 stops the run with one line. Local
    to this rank: the collectives of parallel.sharded come after fn, so the other ranks simply wait.
    """
    while True:
        try:
            return fn(batch_size)
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            message = (str(err).strip().splitlines() or [type(err).__name__])[0]
        # Out of the except block, so the traceback's frames (and the tensors they hold) are freed first.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if batch_size <= 1:
            raise SystemExit(f"error: {what}: out of memory even with a batch of 1 ({message}); lower "
                             f"--max_new_tokens or --max_prompt_tokens, or use a larger device")
        batch_size //= 2
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        print(f"[rank {rank}] {what}: out of memory ({message}); retrying with batch size {batch_size}",
              file=sys.stderr, flush=True)


def _forward(model, ids, positions, mask, cache, cache_kw: str, **extra) -> torch.Tensor:
    """Logits [B, V] (fp32) of the last position of ids [B, T]."""
    out = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache}, **extra)
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


def _prefill(model, cache, ids: list[list[int]], L: int, cfg: dict) -> torch.Tensor:
    """Run the prompts (sorted longest first) through the model in groups, each padded to its own longest prompt;
    their keys/values land right-aligned at slots < L of the cache. Returns last-position logits [P, V]."""
    device, config = cfg["device"], model.config.get_text_config()
    flash = config._attn_implementation.startswith("flash")  # flash-attn wants a 2-D padding mask
    logits, p0 = [], 0
    while p0 < len(ids):
        Lg = len(ids[p0])
        p = max(1, min(cfg["prefill_prompts"], cfg["prefill_tokens"] // Lg, len(ids) - p0))
        group = ids[p0:p0 + p]
        tokens = torch.tensor([[cfg["pad"]] * (Lg - len(x)) + x for x in group], device=device)  # [p, Lg]
        first = torch.tensor([Lg - len(x) for x in group], device=device)  # [p]
        slots = torch.arange(Lg, device=device)  # [Lg]
        mask = (slots >= first[:, None]).long() if flash else _masks(config, first, slots, Lg, cfg["dtype"])
        for layer in cache.layers:
            layer.group = (p0, L - Lg)
        logits.append(_forward(model, tokens, (slots - first[:, None]).clamp(min=0), mask, cache, cfg["cache_kw"]))
        p0 += p
    for layer in cache.layers:
        layer.group = None
    return torch.cat(logits)  # [P, V]


@torch.inference_mode()
def _sample_batch(model, tokenizer, ids: list[list[int]], keys: list[int], n: int, cfg: dict) -> list[list[int]]:
    """Token ids for the R = len(ids) * n rows (row i * n + j = sample j of prompt i), EOS and stop not cut yet.
    ids must be sorted longest first."""
    device, config = cfg["device"], model.config.get_text_config()
    max_new, stop, pad = cfg["max_new_tokens"], cfg["stop"], cfg["pad"]
    P, L = len(ids), len(ids[0])
    R = P * n
    cache = Cache(layers=[_Layer(P, L, max_new) for _ in range(config.num_hidden_layers)])
    logits = _prefill(model, cache, ids, L, cfg).repeat_interleave(n, 0)  # [R, V]
    first = torch.tensor([L - len(x) for x in ids], device=device)  # [P'] slot of each prompt's first token
    keys_t = torch.tensor(keys, dtype=torch.int64, device=device)  # [R']
    eos = torch.tensor(cfg["eos"], device=device)
    out = torch.full((R, max_new), pad, dtype=torch.long, device=device)  # [R, T] tokens, original row order
    alive = torch.arange(R, device=device)  # [R'] original row of each batch row
    slot = alive.clone()  # [R'] (position of its prompt among the prompts left) * n + sample index
    done = torch.zeros(R, dtype=torch.bool, device=device)  # [R']
    attention = config._attn_implementation
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
            if n_done >= max(1, len(done) // 8):  # drop finished rows once enough have piled up to pay the copy
                rows = (~done).nonzero().squeeze(1)  # [R'']
                kept, where = torch.unique(slot[rows] // n, return_inverse=True)  # prompts left; each row's among them
                kept = kept if len(kept) < len(first) else None
                slot = where * n + slot[rows] % n
                alive, keys_t, done, tok = alive[rows], keys_t[rows], done[rows], tok[rows]
                first = first if kept is None else first[kept]
                for layer in cache.layers:
                    layer.keep(rows, kept)
        mask = _masks(config, first, torch.tensor([L + t], device=device), L, cfg["dtype"])  # prompt part only
        ctx = dict(layers=cache.layers, n=n, slot=slot)
        config._attn_implementation = "eva_shared"
        try:
            positions = (L + t - first[slot // n])[:, None]  # [R', 1]
            logits = cfg["step"](model, tok[:, None], positions, mask, cache, cfg["cache_kw"], eva_shared=ctx)
        finally:
            config._attn_implementation = attention
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
    embed = model.get_input_embeddings().weight
    cfg = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=list(stop or []),
               eos=_eos_ids(model, tokenizer), cache_kw=_cache_kwarg(model), sync_every=sync_every,
               device=embed.device, dtype=embed.dtype, prefill_prompts=8, prefill_tokens=8192,
               pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
               # the decode step changes shape every step (keys grow, rows leave), hence dynamic shapes, no CUDA graphs
               step=torch.compile(_forward, dynamic=True) if compile else _forward)
    ids = [_encode(tokenizer, p, chat) for p in prompts]
    if any(len(x) == 0 for x in ids):
        raise ValueError(f"sample: prompt {[len(x) for x in ids].index(0)} is empty after tokenisation")
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))  # similar lengths together: less padding
    texts, tokens = [None] * len(prompts), [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    shown = batches
    if progress:
        from tqdm.auto import tqdm
        shown = tqdm(batches, desc="sample", unit="batch")
    eos, training = set(cfg["eos"]), model.training
    model.eval()  # no dropout while sampling, even when called between training steps
    try:
        rows_of = [_sample_batch(model, tokenizer, [ids[i] for i in batch],
                                 [_row_key(seeds[i], j) for i in batch for j in range(n)], n, cfg) for batch in shown]
    finally:
        model.train(training)
    for batch, rows in zip(batches, rows_of):
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
