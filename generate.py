"""Batched sampling: n responses for each of many prompts, from any causal LM that Hugging Face loads.

One batch of P prompts (R = P * n rows), in the order of this file's last section:
  _prefill          the prompts, longest first, through the model's own forward in padded groups; their keys and
                    values are kept ONCE per prompt in a preallocated cache (_Layer), beside a block per sample
  _decode_n_tokens  one token per row per step: draw it (_sample_from_logits, with uniforms hashed from the row's
                    seed and the step), run the decoder on it (_decode_one_token); every sync_every steps check stop
                    strings and let finished rows leave the batch
Attention (_attend) reads a prompt's keys once for all its n samples, with one exact softmax over prompt and own
tokens. Llama, Mistral, Qwen2 and Gemma-2 decode through _decode_step (the decoder written out from the model's own
modules); other families through their forward with eva's attention function ("eva_decode").

    out = sample(model, tok, ["Write a haiku about rain."], n=4, temperature=0.7, top_p=0.9, max_new_tokens=128)
    out.texts[0], out.token_ids[0], out.finish[0]   # 4 strings, 4 token id lists, 4 of "stop" | "length"
    python generate.py --model default --prompt "Write a haiku about rain." -n 4 --temperature 0.7 --top_p 0.9
"""
import argparse
import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

import onednn


@dataclass
class SampleOutput:
    texts: list[list[str]]  # [prompt][sample]
    token_ids: list[list[list[int]]]  # [prompt][sample][token]
    finish: list[list[str]]  # [prompt][sample]: "stop" (EOS or a stop string) or "length" (cut at max_new_tokens)


# ----------------------------------------------------------------------------- randomness and sampling

_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (xor-shift-multiply); the same on Python ints and int64 tensors (no overflow: c < 2^27)."""
    x = x & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def _row_key(seed: int, sample_index: int) -> int:
    """A row's 32-bit random key: its draws depend on (seed, sample index) only, never on the batch it is in."""
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
    CPUs (denormals); weights below e^-80 relative to the top token are raised to e^-80 (< 2e-35, which leaves
    every fp32 sum over a vocabulary unchanged), so that path is never taken."""
    return (x - top).clamp_(min=-80.0).exp_()


def _topk(x: torch.Tensor, k: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k) for x [R, V] (values descending, indices), reading most of x only once: the k largest entries lie
    in the k blocks of `block` entries with the largest maxima (a block holding one of them has a maximum at least
    as large, and only k - 1 entries are larger), so a top-k of the block maxima and one of those k blocks do it;
    entries past the last whole block are always candidates. Faster than torch's topk on large CPU blocks; ties
    between equal values may be broken differently."""
    R, V = x.shape
    blocks = V // block
    if blocks <= 2 * k:  # too few blocks to pay off
        return x.topk(k, dim=-1)
    best = x[:, :blocks * block].view(R, blocks, block).amax(-1).topk(k, dim=-1).indices  # [R, k]
    candidates = (best[:, :, None] * block + torch.arange(block, device=x.device)).view(R, k * block)  # [R, k * b]
    if blocks * block < V:
        candidates = torch.cat([candidates, torch.arange(blocks * block, V, device=x.device).expand(R, -1)], 1)
    vals, pos = x.gather(1, candidates).topk(k, dim=-1)  # [R, k]
    return vals, candidates.gather(1, pos)


def _sample_from_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, u: torch.Tensor,
                        candidates: int | None = None) -> torch.Tensor:
    """One token per row from logits [R, V] with uniforms u [R] -> [R] int64.

    The distribution is transformers' (warpers in this order): logits / temperature; keep the top_k tokens (0 = all);
    keep the most likely tokens while the mass ranked above them is below top_p (the first one always); renormalise.
    The draw is an inverse CDF over the kept tokens in descending order. A full sort of the vocabulary is slow on a
    CPU, so without top_k the CPU path takes the top `candidates` (64) tokens, and only for the rows whose nucleus
    reaches past them 16x more, and so on up to the whole vocabulary: exact, since a row's nucleus is known to lie
    inside its candidates once their mass reaches top_p.
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
    vals, idx = _topk(scaled, k)  # [R, k] descending
    if top_k > 0:  # the k kept tokens, renormalised
        weights = _unnormalised_probs(vals, vals[:, :1])  # [R, k]
        return _pick_nucleus(weights / weights.sum(-1, keepdim=True), idx, top_p, u)
    full = torch.softmax(scaled, dim=-1)  # [R, V] one fused pass: cheaper than exp and sum of the whole row here
    probs = full.gather(1, idx)  # [R, k]
    tokens = _pick_nucleus(probs, idx, top_p, u)  # [R]
    rows = torch.arange(R, device=logits.device)  # [r] rows still being resolved
    while k < V:  # rows whose nucleus reaches past the k candidates: 16x more, then all
        short = probs.sum(-1) < top_p  # [r]
        if not short.any():  # one host sync, on the CPU path only (free there)
            break
        rows, k = rows[short], min(16 * k, V)
        idx = _topk(scaled[rows], k)[1]  # [r, k]
        probs = full[rows[:, None], idx]  # [r, k]
        tokens[rows] = _pick_nucleus(probs, idx, top_p, u[rows])
    return tokens


# ----------------------------------------------------------------------------- KV cache, masks, attention

class _Layer(CacheLayerMixin):
    """One layer's keys and values for P prompts with n samples each, allocated once and filled in place: the
    prompt part ONCE per prompt, keys_t [P, H_kv, D, L] (transposed, ready to matmul) and values
    [P, H_kv, L, D], left-padded (right-aligned to slot L); and each sample's own tokens, own_keys and own_values
    [P * n, H_kv, max_new, D] (not transposed: a step writes one contiguous row each), block p * n + j for sample j
    of prompt p (the row's slot), so a row that leaves the batch costs no copy.

    While `group` = (first prompt, first slot) is set, update() stores a prefill group (the model's own forward).
    Otherwise update() and store() write one decode token per row: row b's to block slot[b], column t, where
    `slot` [R'] and `t` are set by the decode loop before each step (_decode_one_token)."""

    def __init__(self, prompts: int, prompt_len: int, n: int, max_new: int):
        super().__init__()
        self.prompts, self.prompt_len, self.n, self.max_new = prompts, prompt_len, n, max_new
        self.group: tuple[int, int] | None = None
        self.slot: torch.Tensor | None = None
        self.t = 0

    def lazy_initialization(self, key_states, value_states):
        P, (_, h, _, d), n, T = self.prompts, key_states.shape, self.n, self.max_new
        # The prompt part is zeros, not empty: a masked slot still meets its (zero) weight in the matmul, and
        # 0 * NaN garbage is NaN. The own blocks need no zeroing: a live row reads only columns it wrote, and what a
        # row that left the batch reads from unwritten ones is dropped with it.
        self.keys_t = key_states.new_zeros(P, h, d, self.prompt_len)  # [P, H_kv, D, L]
        self.values = value_states.new_zeros(P, h, self.prompt_len, value_states.shape[-1])  # [P, H_kv, L, D]
        self.own_keys = key_states.new_empty(P * n, h, T, d)  # [P * n, H_kv, T, D]
        self.own_values = value_states.new_empty(P * n, h, T, value_states.shape[-1])  # [P * n, H_kv, T, D]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.group is not None:  # prefill: [p, H_kv, L_g, D] for prompts p0.. at slots off..L
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            (p0, off), p = self.group, key_states.shape[0]
            self.keys_t[p0:p0 + p, :, :, off:] = key_states.transpose(2, 3)
            self.values[p0:p0 + p, :, off:] = value_states
            return key_states, value_states
        self.store(key_states[:, :, 0], value_states[:, :, 0])  # decode through the model's forward: [R', H_kv, D]
        return key_states, value_states  # unused: our attention function reads the buffers

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values [R', H_kv, D]: row b's token of step t goes to block slot[b], column t."""
        self.own_keys[:, :, self.t].index_copy_(0, self.slot, keys)
        self.own_values[:, :, self.t].index_copy_(0, self.slot, values)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # asked by flash-attn's prefill only
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.group is not None else self.prompt_len

    def get_max_length(self) -> int:
        return self.prompt_len + self.max_new

    def keep(self, prompts: torch.Tensor) -> None:
        """Keep only these prompts (the others have no sample left)."""
        self.keys_t, self.values = self.keys_t.index_select(0, prompts), self.values.index_select(0, prompts)
        blocks = (prompts[:, None] * self.n + torch.arange(self.n, device=prompts.device)).flatten()  # [P'' * n]
        self.own_keys, self.own_values = self.own_keys.index_select(0, blocks), self.own_values.index_select(0, blocks)


def _additive_masks(config, allowed: torch.Tensor, distance: torch.Tensor, dtype: torch.dtype):
    """Additive masks [B, 1, Q, S] from allowed [B, Q, S] (bool) and distance [B, Q, S] (query position minus key
    position). Returns one mask, or {layer type: mask} for models that mix full and sliding-window layers (Gemma-2,
    Qwen2 with a window)."""
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or [])

    def additive(ok):
        return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)[:, None]

    if "sliding_attention" in types:
        return {"full_attention": additive(allowed), "sliding_attention": additive(allowed & (distance < window))}
    if window and not types:  # Mistral: every layer slides
        return additive(allowed & (distance < window))
    return additive(allowed)


def _prefill_masks(config, first: torch.Tensor, length: int, dtype: torch.dtype):
    """Causal masks [p, 1, Lg, Lg] for a left-padded prefill group; row b's real tokens start at first[b]. A padding
    query may see itself only (so no row is fully masked and no NaN reaches the cache)."""
    slots = torch.arange(length, device=first.device)  # [Lg]
    q, kv = slots[:, None], slots[None]  # [Lg, 1], [1, Lg]
    allowed = ((kv >= first[:, None, None]) & (kv <= q)) | (kv == q)  # [p, Lg, Lg]
    return _additive_masks(config, allowed, (q - kv).expand_as(allowed), dtype)


def _decode_masks(config, first: torch.Tensor, L: int, t: int, dtype: torch.dtype):
    """Masks [P', 1, 1, L] of the prompt slots at decode step t (all samples of a prompt are at the same position):
    the prompt's real tokens, within the window on sliding-window layers. A sample's own tokens need no mask."""
    slots = torch.arange(L, device=first.device)[None, None]  # [1, 1, L]
    allowed = slots >= first[:, None, None]  # [P', 1, L]
    return _additive_masks(config, allowed, (L + t - slots).expand_as(allowed), dtype)


def _attend(layer: _Layer, query: torch.Tensor, mask: torch.Tensor, scaling: float, softcap: float | None,
            window: int | None):
    """One decode step's attention for one layer: query [R', H, D] -> [R', H * D].

    The rows are gathered by prompt, [P', H_kv, n * g, D] (g = H / H_kv query heads per key head; a row that has
    left the batch is a zero query), so that a prompt's keys are read once for all its samples (one matmul), and
    each sample's own keys by its block (a batched matmul); one exact softmax spans both. A sliding window drops
    own tokens older than it (the prompt part is masked by the caller). Soft-capping (Gemma-2) included."""
    slot, n, t = layer.slot, layer.n, layer.t  # slot [R']: p * n + j, ascending
    R, H, D = query.shape
    P, Hk, _, L = layer.keys_t.shape
    g, full = H // Hk, R == P * n  # full: no row has left, so slot is 0..R-1
    start = max(0, t + 1 - window) if window else 0
    # [P' * n, H_kv, g, D]; rows that left the batch are zero queries here
    by_slot = (query if full else query.new_zeros(P * n, H, D).index_copy_(0, slot, query)).view(P * n, Hk, g, D)

    def own_to_prompts(x):  # [P' * n, H_kv, g, X] <-> [P', H_kv, n * g, X]
        return x.view(P, n, Hk, g, -1).transpose(1, 2).reshape(P, Hk, n * g, -1)

    def prompts_to_own(x):
        return x.reshape(P, Hk, n, g, -1).transpose(1, 2).reshape(P * n, Hk, g, -1)

    s_prompt = torch.matmul(own_to_prompts(by_slot), layer.keys_t)  # [P', H_kv, n * g, L]
    own_keys, own_values = layer.own_keys[:, :, start:t + 1], layer.own_values[:, :, start:t + 1]  # [P'n, H_kv, t', D]
    s_own = own_to_prompts(torch.matmul(by_slot, own_keys.transpose(2, 3)))  # [P', H_kv, n * g, t']
    scores = torch.cat([s_prompt, s_own], dim=-1).float().mul_(scaling)  # [P', H_kv, n * g, L + t']
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores[..., :L] += mask
    weights = torch.softmax(scores, dim=-1).to(query.dtype)  # masked prompt slots: exactly 0
    out = prompts_to_own(torch.matmul(weights[..., :L], layer.values))  # [P' * n, H_kv, g, D]
    out += torch.matmul(prompts_to_own(weights[..., L:]), own_values)
    out = out.reshape(P * n, H * D)
    return out if full else out.index_select(0, slot)  # [R', H * D]


def _eva_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """_attend as a transformers attention function (registered as `eva_decode`), for decoding through the model's
    own forward: query [R', H, 1, D]; key/value (this step's) are already stored by _Layer.update."""
    layer = kwargs["eva_decode"][module.layer_idx]
    R, H, _, D = query.shape
    scaling = scaling if scaling is not None else D**-0.5
    out = _attend(layer, query[:, :, 0], attention_mask, scaling, kwargs.get("softcap"), kwargs.get("sliding_window"))
    return out.view(R, 1, H, D), None


AttentionInterface.register("eva_decode", _eva_attention)


# ----------------------------------------------------------------------------- the decode step

DECODE_FAMILIES = ("llama", "mistral", "qwen2", "gemma2")  # model_type values _decode_step knows


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-split convention (transformers'): x [R', heads, D]; cos [R', 1, D]; signed_sin is sin
    with its first half negated, so that x * cos + (x2, x1) * signed_sin = x * cos + (-x2, x1) * sin, bit for bit."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def _attention_options(config, attn, index: int, masks) -> tuple:
    """(mask, scaling, softcap, window) that _attend takes for layer `index` with attention module attn: the mask of
    its layer type where models mix full and sliding-window layers, its window where windows vary by layer."""
    mask = masks[config.layer_types[index]] if isinstance(masks, dict) else masks
    window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
    return mask, attn.scaling, getattr(attn, "attn_logit_softcapping", None), window


def _decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, masks, cache) -> torch.Tensor:
    """Logits [R', V] (fp32) of the next token for one new token per row, tokens and positions [R'].

    The decoder of the families in DECODE_FAMILIES written out: the model's own modules (embedding, norms, rotary
    tables, projections, head; LoRA adapters and 4-bit layers work unchanged; on a CPU the linear layers run as
    onednn.packed_linears swapped them) without the per-layer glue of its forward (mask construction, cache
    bookkeeping, attention dispatch), which at decode batch sizes costs a good part of a step on a CPU. Other
    families decode through the model's forward (_forward)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, config = base.model, base.config
    R = tokens.shape[0]

    h = body.embed_tokens(tokens)  # [R', E] (Gemma-2's embedding scales itself)
    cos, sin = body.rotary_emb(h, positions[:, None])  # [R', 1, D] each
    half = sin.shape[-1] // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # signed, see _rope
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        x = layer.input_layernorm(h)  # [R', E]
        q = _rope(attn.q_proj(x).view(R, -1, attn.head_dim), cos, sin)  # [R', H, D]
        k = _rope(attn.k_proj(x).view(R, -1, attn.head_dim), cos, sin)  # [R', H_kv, D]
        cache.layers[i].store(k, attn.v_proj(x).view(R, -1, attn.head_dim))
        a = attn.o_proj(_attend(cache.layers[i], q, *_attention_options(config, attn, i, masks)))  # [R', E]
        gemma = hasattr(layer, "pre_feedforward_layernorm")  # Gemma-2 also normalises attention's and MLP's outputs
        h = h + (layer.post_attention_layernorm(a) if gemma else a)
        x = layer.pre_feedforward_layernorm(h) if gemma else layer.post_attention_layernorm(h)
        x = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))  # [R', E]
        h = h + (layer.post_feedforward_layernorm(x) if gemma else x)
    logits = base.lm_head(body.norm(h)).float()  # [R', V]
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


# ----------------------------------------------------------------------------- the sampler

def eos_ids(model, tokenizer) -> list[int]:
    """The token ids that end a turn: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted(set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a user turn in the chat template, ready for the assistant's answer (chat=False: plain text)."""
    if chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=False)
        return tokenizer(prompt, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def _cut_at_stop(tokenizer, tokens: list[int], stop: list[str]) -> tuple[str, list[int], bool]:
    """(text before the first stop string, tokens up to the one that completes it, whether a stop string was found).
    That last token can carry a few characters beyond the stop string, which the text drops."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    hits = [text.find(s) for s in stop if s in text]
    if not hits:
        return text, tokens, False
    cut = min(hits)
    lo, hi = 1, len(tokens)  # the shortest prefix whose text contains a stop string (containment is monotone)
    while lo < hi:
        mid = (lo + hi) // 2
        prefix = tokenizer.decode(tokens[:mid], skip_special_tokens=True)
        lo, hi = (lo, mid) if any(s in prefix for s in stop) else (mid + 1, hi)
    return text[:cut], tokens[:lo], True


@dataclass(frozen=True)
class _Sampling:
    """The settings of one sample() call that every batch shares."""
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    eos: tuple[int, ...]
    pad: int
    sync_every: int


@functools.cache
def _cache_kwarg(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _forward(model, ids, positions, mask, cache, **extra) -> torch.Tensor:
    """Logits [B, V] (fp32) of the last position of ids [B, T], through the model's own forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    out = model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, logits_to_keep=1,
                **{_cache_kwarg(type(base)): cache}, **extra)
    return out.logits[:, -1].float()


def _model_step(model, tokens: torch.Tensor, positions: torch.Tensor, masks, cache) -> torch.Tensor:
    """_decode_step for the other families: the model's forward, whose attention modules call _eva_attention
    (_sample_batch sets the attention implementation to "eva_decode" around the decode loop)."""
    return _forward(model, tokens[:, None], positions[:, None], masks, cache, eva_decode=cache.layers)


def _prefill(model, cache, ids: list[list[int]], pad: int, group_prompts: int = 8,
             group_tokens: int = 8192) -> torch.Tensor:
    """Run the prompts (sorted longest first) through the model in groups, each padded to its own longest prompt;
    their keys/values land right-aligned at slots < L of the cache. Returns last-position logits [P, V]."""
    embed, config = model.get_input_embeddings().weight, model.config.get_text_config()
    device, L = embed.device, len(ids[0])
    flash = config._attn_implementation.startswith("flash")  # flash-attn wants a 2-D padding mask
    logits, p0 = [], 0
    while p0 < len(ids):
        Lg = len(ids[p0])
        p = max(1, min(group_prompts, group_tokens // Lg, len(ids) - p0))
        group = ids[p0:p0 + p]
        tokens = torch.tensor([[pad] * (Lg - len(x)) + x for x in group], device=device)  # [p, Lg]
        first = torch.tensor([Lg - len(x) for x in group], device=device)  # [p]
        slots = torch.arange(Lg, device=device)  # [Lg]
        mask = (slots >= first[:, None]).long() if flash else _prefill_masks(config, first, Lg, embed.dtype)
        for layer in cache.layers:
            layer.group = (p0, L - Lg)
        logits.append(_forward(model, tokens, (slots - first[:, None]).clamp(min=0), mask, cache))
        p0 += p
    for layer in cache.layers:
        layer.group = None
    return torch.cat(logits)  # [P, V]


def _decode_one_token(model, step, cache, tokens: torch.Tensor, slot: torch.Tensor, first: torch.Tensor,
                      t: int) -> torch.Tensor:
    """Logits [R', V] after each row's token of step t, tokens [R']; slot [R'] is each row's block in the cache,
    first [P'] the slot of each prompt's first real token."""
    layer0 = cache.layers[0]
    for layer in cache.layers:  # where store() writes and what _attend reads this step
        layer.slot, layer.t = slot, t
    dtype = model.get_input_embeddings().weight.dtype
    masks = _decode_masks(model.config.get_text_config(), first, layer0.prompt_len, t, dtype)
    positions = layer0.prompt_len + t - first[slot // layer0.n]  # [R']
    return step(model, tokens, positions, masks, cache)


def _drop_prompts(cache, first: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Once a quarter of the prompts have no row left, copy the cache without them. Returns (first, slot)."""
    n = cache.layers[0].n
    kept, where = torch.unique(slot // n, return_inverse=True)  # prompts left; each row's among them
    if len(kept) > len(first) * 3 // 4:  # too few gone to be worth a copy: rows only index the cache
        return first, slot
    for layer in cache.layers:
        layer.keep(kept)
    return first[kept], where * n + slot % n


def _decode_n_tokens(model, tokenizer, step, cache, logits: torch.Tensor, first: torch.Tensor, keys: torch.Tensor,
                     s: _Sampling) -> torch.Tensor:
    """Tokens [R, max_new_tokens] (pad after a row ends) drawn from the prefill's logits [R, V] onwards; keys [R] are
    the rows' random keys, first [P] the slot of each prompt's first real token."""
    R, device = len(keys), logits.device
    eos = torch.tensor(s.eos, device=device)
    out = torch.full((R, s.max_new_tokens), s.pad, dtype=torch.long, device=device)  # [R, T], original row order
    alive = torch.arange(R, device=device)  # [R'] original row of each batch row
    slot = alive.clone()  # [R'] its block in the cache: (position of its prompt among those left) * n + sample index
    done = torch.zeros(R, dtype=torch.bool, device=device)  # [R']
    for t in range(s.max_new_tokens):
        tok = _sample_from_logits(logits, s.temperature, s.top_p, s.top_k, _uniforms(keys, t))  # [R']
        tok = torch.where(done, s.pad, tok)
        out[alive, t] = tok
        done |= torch.isin(tok, eos)
        if t == s.max_new_tokens - 1:
            break
        if (t + 1) % s.sync_every == 0:  # the only host syncs of the loop
            for b in (~done).nonzero().squeeze(1).tolist() if s.stop else []:  # stop strings, on the text so far
                text = tokenizer.decode(out[alive[b], :t + 1].tolist(), skip_special_tokens=True)
                if any(x in text for x in s.stop):
                    done[b] = True
            n_done = int(done.sum())
            if n_done == len(done):
                break
            if n_done:  # finished rows leave the batch
                rows = (~done).nonzero().squeeze(1)  # [R'']
                alive, keys, slot, tok, done = alive[rows], keys[rows], slot[rows], tok[rows], done[rows]
                first, slot = _drop_prompts(cache, first, slot)
        logits = _decode_one_token(model, step, cache, tok, slot, first, t)
    return out


@torch.inference_mode()
def _sample_batch(model, tokenizer, step, ids: list[list[int]], keys: list[int], n: int,
                  s: _Sampling) -> list[list[int]]:
    """Token ids for the R = len(ids) * n rows (row i * n + j = sample j of prompt i), EOS and stop not cut yet.
    ids must be sorted longest first; keys [R] are the rows' random keys (_row_key)."""
    config, device = model.config.get_text_config(), model.get_input_embeddings().weight.device
    P, L = len(ids), len(ids[0])
    cache = Cache(layers=[_Layer(P, L, n, s.max_new_tokens) for _ in range(config.num_hidden_layers)])
    logits = _prefill(model, cache, ids, s.pad).repeat_interleave(n, 0)  # [R, V]
    first = torch.tensor([L - len(x) for x in ids], device=device)  # [P] slot of each prompt's first token
    keys = torch.tensor(keys, dtype=torch.int64, device=device)  # [R]
    saved = config._attn_implementation
    if config.model_type not in DECODE_FAMILIES:  # prefill ran the model's own attention; decoding runs eva's
        config._attn_implementation = "eva_decode"
    try:
        return _decode_n_tokens(model, tokenizer, step, cache, logits, first, keys, s).tolist()
    finally:
        config._attn_implementation = saved


def finish_rows(tokenizer, rows: list[list[int]], eos, stop) -> tuple[list[str], list[list[int]], list[str]]:
    """(texts, token ids, finish reasons) of sampled rows: cut at EOS (dropped) or at a stop string."""
    texts, tokens, finish = [], [], []
    for row in rows:
        end = next((k for k, x in enumerate(row) if x in eos), len(row))
        text, kept, stopped = _cut_at_stop(tokenizer, row[:end], list(stop))
        texts.append(text)
        tokens.append(kept)
        finish.append("stop" if stopped or end < len(row) else "length")
    return texts, tokens, finish


def sample(model, tokenizer, prompts: list[str], n: int = 1, *, max_new_tokens: int = 256, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, stop: list[str] | None = None, seed: int = 0,
           seeds: list[int] | None = None, chat: bool = True, batch_size: int = 16, progress: bool = False,
           sync_every: int | None = None, compile: bool = False) -> SampleOutput:
    """n samples for each prompt; batch_size prompts (batch_size * n rows) are decoded together.

    A sample depends only on its prompt's seed (seeds[i], else made from seed and i) and its index j, never on the
    batch (up to float rounding of batched matmuls). A row ends at EOS (not returned), at max_new_tokens, or at a
    stop string: its text is cut before it, its token ids end with the token that completed it. Every sync_every
    steps (default: every step on a CPU, where it costs nothing; 8 on accelerators) stop strings are checked and
    finished rows leave the batch. compile=True wraps the decode step in torch.compile (meant for GPUs).
    model.sample_with, where set (vllm_sampler.use), answers instead."""
    embed = model.get_input_embeddings().weight
    sync_every = (1 if embed.device.type == "cpu" else 8) if sync_every is None else sync_every
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))] if seeds is None else list(seeds)
    if n < 1 or max_new_tokens < 1 or batch_size < 1 or sync_every < 1:
        raise ValueError(f"sample: n, max_new_tokens, batch_size, sync_every must be >= 1, got "
                         f"{n}, {max_new_tokens}, {batch_size}, {sync_every}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"sample: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got "
                         f"{temperature}, {top_p}, {top_k}")
    if len(seeds) != len(prompts):
        raise ValueError(f"sample: {len(seeds)} seeds for {len(prompts)} prompts")
    if any(s == "" for s in stop or []):
        raise ValueError("sample: an empty stop string would stop every row at once")
    if getattr(model, "sample_with", None) is not None:  # a sampler of its own: --sampler vllm (vllm_sampler.use)
        return model.sample_with(model, tokenizer, prompts, n, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, top_k=top_k, stop=list(stop or []), seeds=seeds, chat=chat,
                                 progress=progress)
    settings = _Sampling(max_new_tokens, temperature, top_p, top_k, stop=tuple(stop or []),
                         eos=tuple(eos_ids(model, tokenizer)), sync_every=sync_every,
                         pad=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    step = _decode_step if model.config.get_text_config().model_type in DECODE_FAMILIES else _model_step
    # the decode step changes shape every step (keys grow, rows leave), hence dynamic shapes, no CUDA graphs
    step = torch.compile(step, dynamic=True) if compile else step
    ids = [encode_prompt(tokenizer, p, chat) for p in prompts]
    if any(len(x) == 0 for x in ids):
        raise ValueError(f"sample: prompt {[len(x) for x in ids].index(0)} is empty after tokenisation")
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))  # similar lengths together: less padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = tqdm(batches, desc="sample", unit="batch", disable=not progress)
    texts, tokens, finish = [None] * len(prompts), [None] * len(prompts), [None] * len(prompts)
    training = model.training
    model.eval()  # no dropout while sampling, even when called between training steps
    try:
        # inductor cannot lower the oneDNN linear op: a compiled step calls the modules, as compiled
        with contextlib.nullcontext() if compile else onednn.packed_linears(model):
            for batch in batches:
                rows = _sample_batch(model, tokenizer, step, [ids[i] for i in batch],
                                     [_row_key(seeds[i], j) for i in batch for j in range(n)], n, settings)
                for b, i in enumerate(batch):
                    texts[i], tokens[i], finish[i] = finish_rows(tokenizer, rows[b * n:(b + 1) * n], settings.eos,
                                                                  settings.stop)
    finally:
        model.train(training)
    return SampleOutput(texts=texts, token_ids=tokens, finish=finish)


def main() -> None:
    ap = argparse.ArgumentParser(description="Sample n responses per prompt from a model.")
    ap.add_argument("--model", default="default", help="'default', a hub id, a model folder or an adapter folder")
    ap.add_argument("--prompt", action="append", required=True, help="a user message; repeat for several")
    for flag, kind, default in (("-n", int, 1), ("--max_new_tokens", int, 256), ("--temperature", float, 0.7),
                                ("--top_p", float, 0.9), ("--top_k", int, 0)):
        ap.add_argument(flag, type=kind, default=default)
    ap.add_argument("--stop", action="append", default=None, help="a stop string; repeat for several")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no_chat", action="store_true", help="send the prompt as raw text, no chat template")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--load_in_4bit", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (GPU)")
    args = ap.parse_args()
    import model
    lm, tokenizer = model.load_model(args.model, device=args.device, load_in_4bit=args.load_in_4bit)
    out = sample(lm, tokenizer, args.prompt, args.n, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, stop=args.stop, seed=args.seed,
                 chat=not args.no_chat, compile=args.compile)
    for prompt, texts in zip(args.prompt, out.texts):
        print(f"### prompt: {prompt}" + "".join(f"\n--- sample {j}\n{text}" for j, text in enumerate(texts)))


if __name__ == "__main__":
    main()
