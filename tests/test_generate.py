"""Tests of generate.py: token-exact greedy decoding against transformers' generate, seeds, stops, the sampling law.

    .venv/bin/python -m pytest tests/test_generate.py -x -q
"""
import sys
from pathlib import Path

import pytest
import torch

import generate
import model
import onednn
from generate import _sample_from_logits, _uniforms, sample

PROMPTS = ["Hi", "Tell me a long story about a dragon and a knight who become friends.", "2+2?"]


@pytest.fixture(scope="module")
def tok():
    return model.load_tokenizer("default")


def tiny(tok, arch: str, seed: int = 0):
    """A 2-layer random model of the given family with SmolLM2's tokenizer; untied head, wide init, so greedy varies.
    Qwen3 (norms on queries and keys) is a family _decode_step does not know: it decodes through the model's forward."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config, AutoModelForCausalLM
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  initializer_range=0.2)
    config = {"llama": lambda: LlamaConfig(**common),
              # window 6 < prompt lengths, so the sliding mask matters; Gemma-2 soft-caps, so it runs eager attention
              "gemma2": lambda: Gemma2Config(**common, head_dim=8, sliding_window=6, attn_implementation="eager"),
              "qwen2": lambda: Qwen2Config(**common, use_sliding_window=True, sliding_window=6, max_window_layers=1),
              "mistral": lambda: MistralConfig(**common, sliding_window=6),
              "qwen3": lambda: Qwen3Config(**common, head_dim=8)}[arch]()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def hf_greedy(model, tok, prompts, max_new_tokens, eos):
    """transformers' own greedy decoding of a left-padded batch; per prompt, tokens before the first EOS."""
    ids = [generate.encode_prompt(tok, p, True) for p in prompts]
    L = max(map(len, ids))
    inp = torch.tensor([[tok.pad_token_id] * (L - len(x)) + x for x in ids])
    attn = (torch.arange(L)[None] >= torch.tensor([L - len(x) for x in ids])[:, None]).long()
    with torch.no_grad():
        out = model.generate(input_ids=inp, attention_mask=attn, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)
    rows = []
    for row in out[:, L:].tolist():
        end = next((k for k, x in enumerate(row) if x in eos), len(row))
        rows.append(row[:end])
    return rows


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2", "mistral"])
def test_greedy_matches_hf_generate(tok, arch):
    m = tiny(tok, arch)
    eos = generate.eos_ids(m, tok)
    ref = hf_greedy(m, tok, PROMPTS, 16, eos)
    out = sample(m, tok, PROMPTS, n=2, max_new_tokens=16, temperature=0, sync_every=3)
    for i in range(len(PROMPTS)):
        assert len(ref[i]) == 16, "the random model should not hit EOS in 16 tokens"
        assert out.token_ids[i] == [ref[i], ref[i]], f"{arch} prompt {i}: greedy differs from transformers"



def test_gemma2_end_of_turn_ends_a_row(toy_gemma2_dir):
    """Gemma-2's turns end with <end_of_turn>, an EOS of its generation config but not tokenizer.eos_token (<eos>):
    a row that emits it ends there, as "stop". Swapping the head rows of <end_of_turn> and the token greedy picks at
    step k leaves steps < k unchanged and makes step k emit <end_of_turn>."""
    m, t = model.load_model(str(toy_gemma2_dir))
    end_of_turn = t.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn != t.eos_token_id and end_of_turn in generate.eos_ids(m, t)
    free = sample(m, t, PROMPTS[1:2], max_new_tokens=12, temperature=0)
    row = free.token_ids[0][0]
    assert len(row) == 12 and free.finish[0][0] == "length"
    k = next(k for k in range(2, len(row)) if row[k] not in row[:k])
    head = m.lm_head.weight.detach().clone()  # untied from the input embeddings, which the prompt reads
    head[[row[k], end_of_turn]] = head[[end_of_turn, row[k]]]
    m.lm_head.weight = torch.nn.Parameter(head)
    out = sample(m, t, PROMPTS[1:2], max_new_tokens=12, temperature=0)
    assert out.token_ids[0][0] == row[:k] and out.finish[0][0] == "stop", "<end_of_turn> did not end the row"

def test_sliding_window_is_honoured(tok):
    """The window changes the tokens (so the test above can fail if our mask ignored it)."""
    m = tiny(tok, "mistral")
    windowed = sample(m, tok, PROMPTS[1:2], max_new_tokens=16, temperature=0).token_ids
    m.config.sliding_window = None
    assert sample(m, tok, PROMPTS[1:2], max_new_tokens=16, temperature=0).token_ids != windowed


def test_eos_ends_one_row_not_the_others(tok, monkeypatch):
    m = tiny(tok, "llama")
    first = sample(m, tok, PROMPTS, max_new_tokens=16, temperature=0).token_ids
    eos_tok = first[1][0][4]  # make prompt 1 end early; the others may or may not contain this token
    cut = first[1][0].index(eos_tok)
    m.generation_config.eos_token_id = eos_tok
    eos = generate.eos_ids(m, tok)
    ref = hf_greedy(m, tok, PROMPTS, 16, eos)
    rows_per_step = []
    real_step = generate._decode_step
    monkeypatch.setattr(generate, "_decode_step", lambda m, tokens, *a: (rows_per_step.append(len(tokens)),
                                                                          real_step(m, tokens, *a))[1])
    out = sample(m, tok, PROMPTS, n=2, max_new_tokens=16, temperature=0, sync_every=2)
    assert out.token_ids[1] == [first[1][0][:cut]] * 2, "row did not stop at its EOS (or kept the EOS)"
    assert [r[0] for r in out.token_ids] == ref, "EOS handling differs from transformers"
    assert any(len(r[0]) == 16 for r in out.token_ids), "some other row should run to max_new_tokens"
    assert out.finish[1] == ["stop", "stop"], "a row that ended by EOS is not 'stop'"
    assert all(f == ("length" if len(s) == 16 else "stop") for r, fs in zip(out.token_ids, out.finish)
               for s, f in zip(r, fs)), f"finish reasons {out.finish} do not match the row lengths"
    assert rows_per_step[0] == 6 and min(rows_per_step) < 6, "finished rows never left the batch"


def test_finished_rows_leaving_does_not_change_samples(tok):
    """Rows of one prompt end at different steps (EOS = every 10th token id); dropping them from the batch early or
    never gives the same samples."""
    m = tiny(tok, "qwen2")
    m.generation_config.eos_token_id = list(range(0, len(tok), 10))
    kw = dict(n=4, max_new_tokens=16, temperature=1.0, seed=2)
    never = sample(m, tok, PROMPTS, sync_every=1000, **kw)
    lengths = [len(s) for r in never.token_ids for s in r]
    assert len(set(lengths)) > 3 and max(lengths) == 16, f"need rows ending at different steps: {lengths}"
    assert sample(m, tok, PROMPTS, sync_every=1, **kw) == never


def test_bundled_greedy_matches_hf_generate(bundled):
    m, t = bundled
    prompts = ["What is the capital of France?", "Write one sentence about the sea, please, in a calm tone."]
    eos = generate.eos_ids(m, t)
    ref = hf_greedy(m, t, prompts, 20, eos)
    out = sample(m, t, prompts, max_new_tokens=20, temperature=0)
    assert [r[0] for r in out.token_ids] == ref
    assert out.texts[0][0] == t.decode(ref[0], skip_special_tokens=True)


def test_seeds_reproducible_and_independent_of_batch(tok):
    m = tiny(tok, "llama")
    kw = dict(n=3, max_new_tokens=10, temperature=1.0, top_p=0.95)
    a = sample(m, tok, PROMPTS, seed=5, **kw)
    assert a == sample(m, tok, PROMPTS, seed=5, **kw), "same seed, different samples"
    assert a != sample(m, tok, PROMPTS, seed=6, **kw), "the seed has no effect"
    for samples in a.token_ids:
        assert len({tuple(s) for s in samples}) == 3, "the n samples of a prompt should differ at temperature 1"
    alone = sample(m, tok, [PROMPTS[2]], seeds=[5 * 1_000_003 + 2], **kw)
    assert alone.token_ids[0] == a.token_ids[2], "samples depend on the other prompts of the batch"
    small_batches = sample(m, tok, PROMPTS, seed=5, batch_size=1, **kw)
    assert small_batches == a, "samples depend on batch_size"


def test_top_k_one_is_greedy(tok):
    m = tiny(tok, "llama")
    greedy = sample(m, tok, PROMPTS, n=2, max_new_tokens=8, temperature=0)
    assert sample(m, tok, PROMPTS, n=2, max_new_tokens=8, temperature=1.0, top_k=1, seed=3) == greedy


def test_stop_string_spanning_tokens_ends_only_its_row(tok):
    m = tiny(tok, "llama")
    kw = dict(n=2, max_new_tokens=16, temperature=1.0, seed=1, sync_every=4)
    free = sample(m, tok, PROMPTS, **kw)
    row = free.token_ids[1][0]
    # a stop string that starts inside token 3 and ends inside token 5 of one row
    t3, t4, t5 = (tok.decode([x]) for x in row[3:6])
    stop = t3[-2:] + t4 + t5[:1]
    text = free.texts[1][0]
    assert stop in text and text.index(stop) > 0
    out = sample(m, tok, PROMPTS, stop=[stop], **kw)
    assert out.texts[1][0] == text[:text.index(stop)], "text not cut just before the stop string"
    assert out.token_ids[1][0] == row[:6], "token ids should end with the token that completes the stop string"
    assert out.finish[1][0] == "stop", "a row cut by a stop string is not 'stop'"
    for i in range(len(PROMPTS)):
        for j in range(2):
            if stop not in free.texts[i][j]:
                assert out.token_ids[i][j] == free.token_ids[i][j], f"row {i},{j} without the stop string changed"
                assert len(out.token_ids[i][j]) == 16, "max_new_tokens not respected exactly"
                assert out.finish[i][j] == "length", f"row {i},{j} ran to max_new_tokens but is not 'length'"


def test_max_new_tokens_exact(tok):
    m = tiny(tok, "llama")
    for k in (1, 5):
        out = sample(m, tok, PROMPTS, n=2, max_new_tokens=k, temperature=1.0)
        assert all(len(s) == k for r in out.token_ids for s in r), f"max_new_tokens={k} not respected"
        assert all(f == "length" for r in out.finish for f in r), f"max_new_tokens={k}: rows cut are not 'length'"


def expected_law(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """The target distribution [V], written independently of generate.py: sort, cut, renormalise."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):
        if top_k and rank >= top_k:
            break
        keep[i] = True
    p = torch.where(keep, p, 0.0)
    p /= p.sum()
    out = torch.zeros_like(p)
    for i in p.argsort(descending=True).tolist():
        if mass >= top_p or p[i] == 0:
            break
        out[i], mass = p[i], mass + p[i].item()
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_p,top_k,candidates",
                         [(1.0, 1.0, 0, None), (0.5, 1.0, 0, None), (1.0, 0.7, 0, None), (2.0, 0.9, 0, 2),
                          (1.0, 0.8, 3, None), (1.5, 1.0, 4, None)])
def test_sampling_law_histogram(temperature, top_p, top_k, candidates):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    draws = 40_000
    u = torch.rand(draws, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tokens = _sample_from_logits(logits.expand(draws, -1), temperature, top_p, top_k, u, candidates=candidates)
    freq = torch.bincount(tokens, minlength=len(logits)).double() / draws
    want = expected_law(logits, temperature, top_p, top_k)
    assert (freq[want == 0] == 0).all(), f"tokens outside top-k/top-p were drawn: {freq} vs {want}"
    assert torch.allclose(freq, want, atol=0.012), f"frequencies {freq} vs law {want}"


def test_uniforms_look_uniform_and_differ():
    keys = torch.tensor([generate._row_key(s, j) for s in range(50) for j in range(40)])
    u = torch.stack([_uniforms(keys, t) for t in range(20)])  # [T, R]
    assert u.min() > 0 and u.max() < 1
    assert u.unique().numel() == u.numel(), "two (row, step) pairs share a uniform"
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.01, f"uniforms are not uniform: {hist}"
    assert torch.equal(_uniforms(keys[7:9], 3), u[3, 7:9]), "a row's uniform depends on the other rows"


def test_model_histogram_temperature_and_top_p(tok):
    """First-token frequencies of a tiny model (head scaled so its distribution is peaked) follow the law."""
    m = tiny(tok, "llama")
    with torch.no_grad():
        m.lm_head.weight.mul_(5)
        ids = torch.tensor([generate.encode_prompt(tok, PROMPTS[0], True)])
        logits = m(input_ids=ids).logits[0, -1]
    for temperature, top_p in [(0.7, 0.9), (1.3, 1.0)]:
        want = expected_law(logits, temperature, top_p, 0)
        assert 3 <= (want > 0.01).sum() <= 50, "the tiny model's law is not a useful test case"
        firsts = []
        for seed in range(5):  # 5 x 1000 rows keeps the [rows, vocab] logits small
            out = sample(m, tok, [PROMPTS[0]], n=1000, max_new_tokens=1, temperature=temperature, top_p=top_p,
                         seed=seed)
            firsts += [s[0] for s in out.token_ids[0]]
        freq = torch.bincount(torch.tensor(firsts), minlength=len(want)).double() / len(firsts)
        if top_p < 1:
            assert (freq[want == 0] == 0).all(), "a token outside the nucleus was drawn"
        assert (freq - want).abs().max() < 0.03, f"T={temperature} top_p={top_p}: frequencies off the law"


def test_lora_adapter_greedy_matches_hf(tok, tiny_llama_dir):
    m, t = model.load_model(str(tiny_llama_dir))
    m = model.add_lora(m, r=4)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-trivial adapter
    m.eval()
    eos = generate.eos_ids(m, t)
    assert sample(m, t, PROMPTS, max_new_tokens=8, temperature=0).token_ids == [[r] for r in
                                                                               hf_greedy(m, t, PROMPTS, 8, eos)]


def test_cli_prints_samples(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["generate.py", "--model", str(tiny_llama_dir), "--prompt", "Hello there",
                                      "-n", "2", "--max_new_tokens", "4", "--device", "cpu"])
    generate.main()
    printed = capsys.readouterr().out
    assert "### prompt: Hello there" in printed and "--- sample 1" in printed


def test_bad_arguments_raise(tok):
    m = tiny(tok, "llama")
    for bad in (dict(n=0), dict(top_p=0.0), dict(temperature=-1.0), dict(seeds=[1, 2]), dict(stop=[""])):
        with pytest.raises(ValueError):
            sample(m, tok, ["a"], max_new_tokens=2, **bad)


def test_training_mode_is_restored(tok):
    m = tiny(tok, "llama")
    want = sample(m, tok, PROMPTS[:1], max_new_tokens=4, temperature=0)
    m.train()
    assert sample(m, tok, PROMPTS[:1], max_new_tokens=4, temperature=0) == want
    assert m.training, "sample() left the model in eval mode"


def test_other_families_decode_through_the_model_forward(tok, monkeypatch):
    """A family _decode_step does not know (Qwen3: norms on queries and keys) decodes through the model's own forward
    with our attention function, still token-exact."""
    m = tiny(tok, "qwen3")
    monkeypatch.setattr(generate, "_decode_step", lambda *a: pytest.fail("qwen3 is not a DECODE_FAMILIES model"))
    ref = hf_greedy(m, tok, PROMPTS, 12, generate.eos_ids(m, tok))
    out = sample(m, tok, PROMPTS, n=2, max_new_tokens=12, temperature=0, sync_every=3)
    assert [r[0] for r in out.token_ids] == ref and [r[1] for r in out.token_ids] == ref


@pytest.mark.skipif(not onednn.AVAILABLE, reason="oneDNN linear layers are used on x86 CPUs only")
def test_packed_linears_equal_the_modules(tiny_llama_dir):
    """Weights reordered once (for 128 rows) give the modules' products up to float rounding for any row count, a
    row's product does not depend on the rows beside it, LoRA adapters are included (merged into the weight) and
    disable_adapter() is followed; inside packed_linears the modules call them, and afterwards their own forward."""
    m, _ = model.load_model(str(tiny_llama_dir))
    m = model.add_lora(m, r=4)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    m.eval()
    q_proj = m.get_base_model().model.layers[0].self_attn.q_proj  # a LoRA layer
    for context in (torch.no_grad, m.disable_adapter):
        with context():
            packed = onednn.pack_linears(m)
            assert q_proj in packed and m.get_base_model().lm_head in packed
            assert q_proj.base_layer not in packed and q_proj.lora_A["default"] not in packed
            for module, fn in packed.items():
                x = torch.randn(300, module.in_features)
                together = fn(x)
                torch.testing.assert_close(together, module(x), atol=1e-5, rtol=1e-5)
                for rows in (1, 5, 128):
                    assert torch.equal(fn(x[:rows]), together[:rows]), f"{rows} rows differ from the same rows in 300"
    x = torch.randn(3, q_proj.in_features)
    with torch.no_grad(), onednn.packed_linears(m):
        assert "forward" in vars(q_proj)
        inside = q_proj(x)
    assert "forward" not in vars(q_proj), "packed_linears left its forward on the module"
    with torch.no_grad():
        torch.testing.assert_close(inside, q_proj(x), atol=1e-5, rtol=1e-5)


def test_topk_equals_torch():
    torch.manual_seed(0)
    for rows, vocab, k in ((3, 49152, 64), (5, 50001, 64), (2, 300, 64), (4, 70000, 1024)):
        x = torch.randn(rows, vocab)
        want, got = x.topk(k, dim=-1), generate._topk(x, k)
        assert torch.equal(want.values, got[0]) and torch.equal(want.indices, got[1]), (rows, vocab, k)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_bench_attention_rate_calls_generates_attention(tok, arch):
    """bench_generate's attention-alone figure drives generate._attend through its cache and masks (Gemma-2: a mask
    per layer type, soft-capping, a window); it must keep working as they change."""
    calls, real = [], generate._attend
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
        from bench_generate import attention_rate
        mp.setattr(generate, "_attend", lambda *args: calls.append(args[0]) or real(*args))
        rate = attention_rate(tiny(tok, arch), prompts=2, n=3, prompt_len=5, new_tokens=8, stride=4)
    assert 0 < rate < float("inf")
    assert len(calls) == 2 * 2 * 2, "two timed passes x two steps (t = 0, 4) x two layers"


@pytest.mark.skipif(not onednn.AVAILABLE, reason="oneDNN linear layers are used on x86 CPUs only")
def test_packed_linears_in_bf16(tiny_llama_dir):
    """A bf16 model on the CPU samples through oneDNN's bf16 GEMM too where the CPU has it: LoRA deltas merged in
    bf16, products as the modules' up to bf16 rounding; elsewhere its layers are left as they are. sample() runs."""
    m, tokenizer = model.load_model(str(tiny_llama_dir), dtype=torch.bfloat16)
    m = model.add_lora(m, r=4).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    m.eval()
    with torch.no_grad():
        packed = onednn.pack_linears(m)
        q_proj = m.get_base_model().model.layers[0].self_attn.q_proj
        if not onednn.BF16:  # e.g. an AVX2-only CPU: oneDNN refuses bf16 weights there
            assert packed == {}
        else:
            assert q_proj in packed and len(packed) == sum(1 for x in m.modules() if hasattr(x, "lora_A")) + 1
        for module, fn in packed.items():
            x = torch.randn(7, module.in_features, dtype=torch.bfloat16)
            assert fn(x).dtype == torch.bfloat16
            torch.testing.assert_close(fn(x), module(x), atol=0.05, rtol=0.02)
    out = generate.sample(m, tokenizer, ["Say hi."], n=2, max_new_tokens=6, temperature=0.7, seed=1)
    assert len(out.texts[0]) == 2 and all(out.finish[0])
