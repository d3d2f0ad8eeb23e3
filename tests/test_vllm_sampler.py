"""--sampler vllm on the CPU: the weight hand-over (a LoRA solver's merged weights, the solver untouched), the requests
the engine gets and the mapping of its outputs to a SampleOutput, and the one-line refusals. vLLM itself needs CUDA:
the engine here is a stand-in that answers greedily with Hugging Face `generate` on the weights it was handed. vLLM's
own SamplingParams, RequestOutput and CompletionOutput are used where vllm imports (a GPU box); elsewhere a minimal
module with the same fields takes their place. The real engine runs in scripts/gpu_check.sh."""
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

import config
import generate
import model
import vllm_sampler

PROMPTS = ["Name a colour.", "Write one word about the sea, then stop.", "Count to three."]


def vllm_types():
    """(vllm module, CompletionOutput, RequestOutput): the real ones where importable, else stand-ins."""
    try:
        import vllm
        from vllm.outputs import CompletionOutput, RequestOutput
        return vllm, CompletionOutput, RequestOutput
    except ImportError:
        fake = types.ModuleType("vllm")
        fake.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
        return fake, types.SimpleNamespace, types.SimpleNamespace


VLLM, CompletionOutput, RequestOutput = vllm_types()


def completion(index: int, token_ids: list[int], finish_reason: str):
    return CompletionOutput(index=index, text="", token_ids=token_ids, cumulative_logprob=None, logprobs=None,
                            finish_reason=finish_reason)


class EngineStandIn:
    """The parts of vllm.LLM that vllm_sampler uses: a model that takes weights by checkpoint name (vLLM's
    load_weights), sleep and wake-up, and generate(), which answers each request greedily with Hugging Face
    `generate` and keeps the EOS token in the completion's token ids, as vLLM does."""

    def __init__(self, folder):
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.model.load_weights = self._load_weights
        self.events, self.requests = [], []

    def _load_weights(self, weights):
        state = dict(weights)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # lm_head is tied
        self.events.append(("load", len(state)))

    def apply_model(self, fn):
        return [fn(self.model)]

    def sleep(self, level: int):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake", tuple(tags or ())))

    def reset_prefix_cache(self):
        self.events.append(("reset",))

    def generate(self, requests, params, use_tqdm=True):
        self.requests += list(zip(requests, params))
        outputs = []
        for k, (request, p) in enumerate(zip(requests, params)):
            assert p.temperature == 0 and p.n == 1  # the stand-in answers greedily only; vLLM's greedy has n = 1
            ids = torch.tensor([request["prompt_token_ids"]])
            new = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens,
                                      do_sample=False, eos_token_id=list(p.stop_token_ids),
                                      pad_token_id=0)[0, ids.shape[1]:].tolist()
            reason = "stop" if new[-1] in p.stop_token_ids else "length"
            outputs.append(RequestOutput(request_id=str(k), prompt=None, prompt_token_ids=request["prompt_token_ids"],
                                         prompt_logprobs=None, finished=True,
                                         outputs=[completion(j, new, reason) for j in range(p.n)]))
        return outputs


def lora_solver(folder):
    solver, tok = model.load_model(str(folder), device="cpu")
    torch.manual_seed(3)  # LoRA's A is drawn at random: the same adapter whatever ran before; its greedy answers differ
    solver = model.add_lora(solver, r=4, alpha=8)
    with torch.no_grad():  # B = 0 at the start: a random B makes the adapter change the answers
        for name, p in solver.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return solver.eval(), tok


def test_engine_takes_the_merged_weights_and_answers_as_eva_does(tiny_llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", VLLM)
    solver, tok = lora_solver(tiny_llama_dir)
    kwargs = dict(n=2, max_new_tokens=12, temperature=0.0, seeds=[11, 12, 2**64 - 1])
    # a token that one prompt's greedy answer alone emits becomes an EOS: that row stops, the others run to the length
    first = [rows[0] for rows in generate.sample(solver, tok, PROMPTS, **kwargs).token_ids]
    own = next(x for i, row in enumerate(first) for x in row[1:] if all(x not in r for r in first[:i] + first[i + 1:]))
    solver.get_base_model().generation_config.eos_token_id = own
    expected = generate.sample(solver, tok, PROMPTS, **kwargs)  # eva's own sampler on the LoRA solver
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert generate.sample(base, tok, PROMPTS, **kwargs).token_ids != expected.token_ids  # the adapter matters

    engine = EngineStandIn(tiny_llama_dir)
    vllm_sampler.use(solver, engine)
    out = generate.sample(solver, tok, PROMPTS, **kwargs)
    assert out == expected  # texts, token ids (EOS dropped) and finish reasons
    assert {"stop", "length"} <= {f for fs in out.finish for f in fs}

    merged = model.add_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), r=4, alpha=8)
    merged.load_state_dict(solver.state_dict())
    merged = merged.merge_and_unload().state_dict()
    for name, tensor in engine.model.state_dict().items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=1e-6, msg=name)
    assert not any(getattr(m, "merged", False) for m in solver.modules())  # merged aside, not in the solver
    assert generate.sample(solver, tok, PROMPTS[:1], **{**kwargs, "seeds": [11]}).token_ids == expected.token_ids[:1]
    # woken for the weights, then the KV cache; asleep again once sampled
    assert [e[0] for e in engine.events] == ["wake", "load", "wake", "reset", "sleep"] * 2
    assert engine.events[:3] == [("wake", ("weights",)), ("load", len(merged) - 1), ("wake", ("kv_cache",))]
    request, params = engine.requests[0]
    assert request["prompt_token_ids"] == generate.encode_prompt(tok, PROMPTS[0])  # the chat template, as eva's
    assert [p.seed for _, p in engine.requests[:3]] == [11, 12, 2**63 - 1]  # each prompt's own seed
    assert (params.n, params.max_tokens, list(params.stop_token_ids)) == (1, 12, generate.eos_ids(solver, tok))


def test_outputs_are_cut_as_eva_cuts_its_rows(tiny_llama_dir):
    tok = model.load_tokenizer(str(tiny_llama_dir))
    eos = [tok.eos_token_id]
    words = tok("Red and blue. END more", add_special_tokens=False).input_ids
    upto_end = next(k for k in range(1, len(words) + 1) if "END" in tok.decode(words[:k]))
    outputs = [RequestOutput(request_id="0", prompt=None, prompt_token_ids=[1], prompt_logprobs=None, finished=True,
                             outputs=[completion(1, words[:3], "length"),  # listed out of order: index decides
                                      completion(0, words[:2] + eos, "stop")]),
               RequestOutput(request_id="1", prompt=None, prompt_token_ids=[1], prompt_logprobs=None, finished=True,
                             outputs=[completion(0, words[:upto_end], "stop"), completion(1, words, "length")])]
    out = vllm_sampler.to_sample_output(tok, outputs, 2, eos, ["END"])
    assert out.token_ids == [[words[:2], words[:3]], [words[:upto_end], words[:upto_end]]]
    assert out.finish == [["stop", "length"], ["stop", "stop"]]
    assert out.texts[1] == ["Red and blue. ", "Red and blue. "] and out.texts[0][0] == tok.decode(words[:2])
    aborted = [RequestOutput(request_id="7", prompt=None, prompt_token_ids=[1], prompt_logprobs=None, finished=True,
                             outputs=[completion(0, words, "abort")])]
    with pytest.raises(RuntimeError, match="vLLM request 7: 1 of 2 completions"):
        vllm_sampler.to_sample_output(tok, aborted, 2, eos, [])


def test_bad_combinations_are_one_line_before_any_model_loads(monkeypatch):
    with pytest.raises(ValueError, match=r"^--sampler vllm with --load_in_4bit"):
        config.parse_config(["--sampler", "vllm", "--load_in_4bit"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--sampler vllm needs a CUDA GPU"):
        config.parse_config(["--sampler", "vllm"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(vllm_sampler.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"^--sampler vllm: the vllm package is not installed"):
        config.parse_config(["--sampler", "vllm"])
    with pytest.raises(ValueError, match=r"--vllm_gpu_memory 1.5: must be in \(0, 1\)"):
        config.parse_config(["--vllm_gpu_memory", "1.5"])
    with pytest.raises(ValueError, match="--sampler sglang: choose one of eva, vllm"):
        config.parse_config(["--sampler", "sglang"])
