"""Tests of reward.py and instructions.py: every supported IFEval rule passing and failing, edge cases, the IFEval
file, the HF reward model back-end (tiny random classifiers built here, one with ArmoRM-style remote code) and the
LLM judge over real HTTP against a local server. Run: .venv/bin/python -m pytest tests/test_reward.py -x -q
"""
import json
import math
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import endpoint
import instructions
import reward
from eval import ifeval

# (id, kwargs, a response that follows it, a response that does not)
CASES = [
    ("keywords:existence", {"keywords": ["apple", "blue sky"]},
     "I like APPLE pies under a Blue Sky.", "I like apple pies."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"},
     "The cat saw another Cat.", "The cat slept."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"},
     "One cat.", "cat and cat."),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "ugly"]},
     "A badly drawn map.", "That was BAD."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
     "Zoe zips zany things.", "A zoo."),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"},
     "A cat.", "Banana."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "One. Two!", "One. Two. Three?"),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Mr. Smith came at 3.30 pm. He sat. He left.", "Mr. Smith came. He left."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 3},
     "***\nA\n***\nB\n***\nC", "A\n***\n\n***\nB"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"},
     "one two three four five", "one two, three-four"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "a b c d", "a b c d e"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "because"},
     "First part.\n\n\"Because,\" she said.", "First.\n\nBecause.\n\nThird."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], at [address].", "Dear [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Body.\n\nP.S. thanks", "Body. PS thanks"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Body.\nP.P.S. more", "Body.\nP.S. more"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "Intro\n* a\n  * b\n- c", "* a\n* b\n**bold** line"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and **two**", "*one* and ** **"),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nintro\nSection 2\nbody", "Section 1\nintro only"),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', 'Here is JSON: {"a": 1}'),
    ("detectable_format:title", {}, "<<My Poem>>\nroses", "<< >> has no title"),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Same.\n******\nSame."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem about cats."},
     "write a poem about cats. Cats are soft.", "Sure! Write a poem about cats."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. Any other questions?\n  ", "Any other questions? Bye."),
    ("startend:quotation", {}, '"Hello there."  \n', '"Hello" there'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "This is VERY IMPORTANT.", "This is Very IMPORTANT."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "Only ONE here.", "DON'T."),  # a contraction is two tokens: DO + N'T
    ("change_case:english_capital", {}, "THIS ANSWER IS WRITTEN IN CAPITAL LETTERS.", "HELLO World"),
    ("change_case:english_capital", {}, "PLEASE READ THE WHOLE MESSAGE BEFORE YOU REPLY.",
     "CECI EST UNE RÉPONSE ÉCRITE EN MAJUSCULES."),  # capitals, but French
    ("change_case:english_lowercase", {}, "hello world, 123.", "hello World"),
    ("change_case:english_lowercase", {}, "my answer is short.", "ceci est une réponse écrite en minuscules."),
    ("language:response_language", {"language": "fr"},
     "Je suis content de vous aider avec cette question.", "I am happy to help you with this question."),
    ("punctuation:no_comma", {}, "No commas here.", "Yes, there is one."),
]


def record(instruction_id: str, kwargs: dict, rid: str = "t") -> dict:
    return {"id": rid, "prompt": "p", "instruction_id_list": [instruction_id], "kwargs": [kwargs]}


@pytest.mark.parametrize("instruction_id,kwargs,good,bad", CASES)
def test_rule_passes_and_fails(instruction_id, kwargs, good, bad):
    rec = record(instruction_id, kwargs)
    assert instructions.check_instructions(rec, good) == [True], f"{instruction_id} should pass: {good!r}"
    assert instructions.check_instructions(rec, bad) == [False], f"{instruction_id} should fail: {bad!r}"


def test_every_supported_id_is_tested_and_described():
    assert len(instructions.SUPPORTED_IDS) == 25
    assert {c[0] for c in CASES} == set(instructions.SUPPORTED_IDS)
    for instruction_id, kwargs, _, _ in CASES:
        sentence = instructions.describe_instruction(instruction_id, kwargs)
        assert sentence[0].isupper() and sentence.rstrip()[-1] in ".?\"", sentence
        for key, value in kwargs.items():
            if isinstance(value, (int, str)) and not instruction_id.endswith("repeat_prompt"):
                shown = instructions.LANGUAGES[value] if key == "language" else \
                    {"less than": "fewer than"}.get(value, str(value))
                assert shown in sentence, (instruction_id, value, sentence)
    assert instructions.describe_instruction("keywords:existence", {"keywords": ["a"]}) == \
        'Include the keyword "a" in your response.'


def test_empty_and_whitespace_responses_follow_nothing():
    # Even rules a blank text would satisfy vacuously (no commas, no forbidden words) fail, as in strict IFEval.
    rec = {"id": "e", "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "keywords:forbidden_words"],
           "kwargs": [{}, {"forbidden_words": ["x"]}]}
    for response in ("", "   \n\t"):
        assert instructions.check_instructions(rec, response) == [False, False]
        assert reward.rules_reward(rec, response) == 0.0


def test_edge_cases():
    lower = record("change_case:english_lowercase", {})
    # The official checker looks at the whole text: uppercase inside a code block breaks "all lowercase".
    assert instructions.check_instructions(lower, "here is code:\n```sql\nSELECT 1;\n```") == [False]
    assert instructions.check_instructions(lower, "trailing whitespace is fine   \n") == [True]
    # Short all-caps text is not English to langdetect (Somali here), in eva as in the official checker.
    assert instructions.check_instructions(record("change_case:english_capital", {}), "HELLO WORLD") == [False]
    end = record("startend:end_checker", {"end_phrase": "Bye now."})
    assert instructions.check_instructions(end, '"Well, bye now."\n') == [True]  # quotes and case are ignored at the end
    quote = record("startend:quotation", {})
    assert instructions.check_instructions(quote, '"') == [False]
    paragraphs = record("length_constraints:number_paragraphs", {"num_paragraphs": 2})
    assert instructions.check_instructions(paragraphs, "A * * * B") == [False]
    assert instructions.check_instructions(paragraphs, "A\n***\nB\n***\n") == [True]  # a trailing divider is dropped
    sections = record("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2})
    assert instructions.check_instructions(sections, "Section 1 a Section 2 b") == [False]  # the splitter is case-exact
    assert instructions.check_instructions(record("detectable_format:json_format", {}), "") == [False]
    assert instructions.check_instructions(record("detectable_format:json_format", {}), "```\n[1, 2]\n```") == [True]


def test_text_utilities():
    assert instructions.count_words("It's 3.5 well-known") == 6  # It, s, 3, 5, well, known (as RegexpTokenizer(r"\w+"))
    assert instructions.split_sentences("Hello world. This is Dr. Smith! Is it 3.14? Yes") == \
        ["Hello world.", "This is Dr. Smith!", "Is it 3.14?", "Yes"]
    assert instructions.count_sentences('He said "hi." Then J. K. Rowling left...') == 2
    assert instructions.count_sentences("1. First item\n2. Second item.") == 1
    assert instructions.count_sentences("") == 0 and instructions.count_sentences(" ... ") == 0
    assert instructions.word_tokens("DON'T say \"HELLO,\" to the U.S.A. WELL-KNOWN") == \
        ["DO", "N'T", "say", "HELLO", "to", "the", "U.S.A", "WELL-KNOWN"]


def test_reward_is_fraction_and_accuracies():
    rec = {"id": "r", "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase",
                                                              "detectable_format:title"], "kwargs": [{}, {}, {}]}
    assert reward.rules_reward(rec, "no commas and lowercase") == pytest.approx(2 / 3)
    one = record("startend:quotation", {})
    # The loose variant drops a chatty first line, so it passes where strict fails.
    acc = ifeval.ifeval_accuracy([rec, one], ["<<t>> all, lower", 'Sure:\n"quoted"'])
    assert acc["n_prompts"] == 2 and acc["n_instructions"] == 4
    assert acc["prompt_level"] == 0.0 and acc["instruction_level"] == pytest.approx(2 / 4)
    assert acc["prompt_level_loose"] == 0.5 and acc["instruction_level_loose"] == pytest.approx(3 / 4)
    assert acc["per_instruction"]["detectable_format:title"] == 1.0
    assert reward.load_reward("rules").score([rec, one], ["<<T>>", '"x"']) == [pytest.approx(2 / 3), 1.0]


def test_bad_records_give_one_line_errors():
    with pytest.raises(ValueError, match=r"pool.jsonl:3 prompt 7: unknown instruction id 'keywords:nope'"):
        instructions.validate_record(record("keywords:nope", {}, rid="7"), "pool.jsonl:3")
    with pytest.raises(ValueError, match="'language:response_language' kwarg 'language' must be a code langdetect "
                                         "can tell .*got 'zh'"):
        instructions.check_instructions(record("language:response_language", {"language": "zh"}), "你好")
    with pytest.raises(ValueError, match="needs kwarg 'num_words'"):
        instructions.validate_record(record("length_constraints:number_words", {"relation": "at least"}))
    with pytest.raises(ValueError, match="kwarg 'relation' must be one of"):
        instructions.describe_instruction("length_constraints:number_words", {"relation": "at most", "num_words": 3})
    with pytest.raises(ValueError, match="takes no kwarg 'colour'"):
        instructions.validate_record(record("punctuation:no_comma", {"colour": "red"}))
    with pytest.raises(ValueError, match="item 1 prompt b: unknown instruction id 'x:y'"):
        reward.load_reward("rules").score([record("punctuation:no_comma", {}), record("x:y", {}, rid="b")],
                                          ["a", "b"])
    with pytest.raises(ValueError, match="unknown reward back-end 'armorm'"):
        reward.load_reward("armorm")
    # None values (the Hugging Face copy of IFEval lists every kwarg of every id) mean "absent".
    rec = record("punctuation:no_comma", {"num_words": None, "keywords": None})
    assert instructions.check_instructions(rec, "fine") == [True]


def test_ifeval_file_coverage(shared_data):
    records = [json.loads(line) for line in (shared_data / "ifeval_input_data.jsonl").read_text().splitlines()]
    assert len(records) == 541
    assert all(instructions.is_supported(r) for r in records), "every official prompt is scored by the rules"
    for r in records:
        instructions.validate_record(r, "ifeval_input_data.jsonl")
    scorer = reward.load_reward("rules")
    for response in ("", "a short answer, with a comma.", records[0]["prompt"]):
        rewards = scorer.score(records, [response] * len(records))
        assert all(0.0 <= x <= 1.0 for x in rewards)
    acc = ifeval.ifeval_accuracy(records, [r["prompt"] for r in records])
    assert acc["n_prompts"] == 541 and acc["n_instructions"] == 834 and acc["n_skipped"] == 0
    assert 0.0 < acc["instruction_level"] < 1.0
    # Echoing an English prompt back fails every request for another language.
    assert acc["per_instruction"]["language:response_language"] == 0.0


# (text, its language): clear examples in five scripts and languages
LANGUAGE_TEXTS = [
    ("The weather is lovely today, so we are going for a long walk in the park.", "en"),
    ("Il fait très beau aujourd'hui, alors nous allons faire une longue promenade dans le parc.", "fr"),
    ("Das Wetter ist heute herrlich, deshalb machen wir einen langen Spaziergang im Park.", "de"),
    ("आज मौसम बहुत अच्छा है, इसलिए हम पार्क में लंबी सैर करने जा रहे हैं।", "hi"),
    ("오늘은 날씨가 아주 좋아서 우리는 공원에서 오래 산책을 할 거예요.", "ko"),
]


@pytest.mark.parametrize("text,language", LANGUAGE_TEXTS)
def test_response_language(text, language):
    assert instructions.detect_language(text) == language
    for _, other in LANGUAGE_TEXTS:
        rec = record("language:response_language", {"language": other})
        assert instructions.check_instructions(rec, text) == [other == language], (other, text)


def test_response_language_without_letters_counts_as_followed():
    # langdetect raises when a text has no letters; the official checker then counts the instruction as followed.
    rec = record("language:response_language", {"language": "ko"})
    for text in ("12345 678", "!!! ... ???", "-> 3.14 <-"):
        assert instructions.detect_language(text) is None
        assert instructions.check_instructions(rec, text) == [True]
    assert instructions.check_instructions(rec, "  ") == [False]  # but an empty response follows nothing (strict)


def test_language_detection_is_repeatable():
    # Short texts sit near langdetect's decision boundaries; unseeded, these come out differently from call to call.
    for text in ("bonjour", "Ciao, come stai?", "hello"):
        assert len({instructions.detect_language(text) for _ in range(30)}) == 1, text


def test_language_prompts_are_valid_seeds_and_the_creator_adds_no_english_rule():
    import numpy as np
    import constraints
    seed = {"id": "s", "prompt": "Write a riddle. Your entire response should be in Hindi.",
            "instruction_id_list": ["language:response_language"], "kwargs": [{"language": "hi"}]}
    instructions.validate_record(seed, "seeds.jsonl:1")
    ids, kwargs = seed["instruction_id_list"], seed["kwargs"]
    assert not constraints.compatible(ids + ["change_case:english_lowercase"], kwargs + [{}])
    added = {constraints.constraint_step("Write a riddle.", ids, kwargs, np.random.default_rng(i))[2]
             for i in range(40)}
    assert added and not any("english" in action for action in added), added
    assert "Hindi" in constraints.compose_prompt("Write a riddle.", ids, kwargs)


def test_language_codes_are_langdetects():
    from langdetect import detector_factory
    assert set(instructions.LANGUAGES) == set(os.listdir(detector_factory.PROFILES_DIRECTORY))


# ------------------------------------------------------------------------------------------ Hugging Face back-end

WORDS = ("the a is of and to in it you i what how why write poem story answer good bad yes no cat dog "
         "hello world . , ? !").split()
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} "
                 "{% endfor %}")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "user", "assistant", ":"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    folder = tmp_path_factory.mktemp("tiny_rm")
    tok = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=1,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


PROMPTS = [{"id": "1", "prompt": "write a poem"}, {"id": "2", "prompt": "what is a cat ?"},
           {"id": "3", "prompt": "hello"}]
RESPONSES = ["the cat is good and the dog is good", "a cat is a cat", "hello world !"]


def test_hf_reward_model_by_path(tiny_rm):
    scorer = reward.load_reward(f"hf:{tiny_rm}", batch_size=2)
    rewards = scorer.score(PROMPTS, RESPONSES)
    assert len(rewards) == 3 and all(math.isfinite(x) for x in rewards)
    assert len(set(rewards)) == 3, "different conversations should get different random-model rewards"
    # Length-sorted, right-padded batches give what one-at-a-time scoring gives, in the caller's order.
    single = reward.load_reward(f"hf:{tiny_rm}", batch_size=1).score(PROMPTS, RESPONSES)
    assert rewards == pytest.approx(single, abs=1e-5)
    flipped = scorer.score(PROMPTS[::-1], RESPONSES[::-1])
    assert flipped == pytest.approx(rewards[::-1], abs=1e-5)
    # The same response under another prompt is another conversation: the chat template carries the prompt.
    assert scorer.score([PROMPTS[0]], [RESPONSES[2]])[0] != pytest.approx(rewards[2], abs=1e-6)


def test_hf_truncation_is_counted(tiny_rm, capsys):
    scorer = reward.load_reward(f"hf:{tiny_rm}", max_length=12)
    long = " ".join(["good"] * 40)
    rewards = scorer.score([PROMPTS[0], PROMPTS[2]], [long, "yes"])
    assert all(math.isfinite(x) for x in rewards)
    assert scorer.info["truncated"] == 1 and "truncated 1/2 conversations to 12 tokens" in capsys.readouterr().err
    assert reward.load_reward(f"hf:{tiny_rm}").info["max_length"] == 64  # the model's own limit


REMOTE_CONFIG = '''from transformers import PretrainedConfig


class TinyRMConfig(PretrainedConfig):
    model_type = "tiny_armo"

    def __init__(self, vocab_size=64, hidden_size=8, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''
REMOTE_MODEL = '''from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_tiny_armo import TinyRMConfig


@dataclass
class TinyRMOutput(ModelOutput):
    rewards: torch.FloatTensor = None
    score: torch.FloatTensor = None


class TinyArmoRM(PreTrainedModel):
    config_class = TinyRMConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.regression_layer = torch.nn.Linear(config.hidden_size, 3)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)
        rewards = self.regression_layer(pooled)
        return TinyRMOutput(rewards=rewards, score=rewards.sum(-1, keepdim=True) + 100.0)
'''


def test_hf_remote_code_head_is_detected(tmp_path):
    import importlib
    import sys
    folder = tmp_path / "tiny_armo"
    folder.mkdir()
    (folder / "configuration_tiny_armo.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny_armo.py").write_text(REMOTE_MODEL)
    sys.path.insert(0, str(folder.parent))
    try:
        config_module = importlib.import_module("tiny_armo.configuration_tiny_armo")
        model_module = importlib.import_module("tiny_armo.modeling_tiny_armo")
    finally:
        sys.path.remove(str(folder.parent))
    tok = make_tokenizer()
    config = config_module.TinyRMConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    config.auto_map = {"AutoConfig": "configuration_tiny_armo.TinyRMConfig",
                       "AutoModelForSequenceClassification": "modeling_tiny_armo.TinyArmoRM"}
    config.architectures = ["TinyArmoRM"]
    torch.manual_seed(0)
    model_module.TinyArmoRM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    rewards = reward.load_reward(f"hf:{folder}?trust_remote_code=1").score(PROMPTS, RESPONSES)  # opt-in only
    assert all(90 < x < 110 for x in rewards), f"the remote model's .score (around 100) was not used: {rewards}"


def test_hf_bad_folders(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = make_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "lm")
    with pytest.raises(ValueError, match=r"hf:.*lm: no sequence-classification head \(architectures \['Llama"):
        reward.load_reward(f"hf:{tmp_path / 'lm'}")
    with pytest.raises(FileNotFoundError, match="hf:.*missing: no model folder"):
        reward.load_reward(f"hf:{tmp_path / 'missing'}")


# ------------------------------------------------------------------------------------------ LLM judge over HTTP

class JudgeHandler(BaseHTTPRequestHandler):
    """Rates by the response text: 'slow' sleeps once, 'flaky' fails once with 500, 'broken' always 500,
    'mumble' gives no rating; otherwise 'Rating: <number of words in the response>'."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send(200, {"data": []})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        prompt = body["messages"][0]["content"]
        response = prompt.split("[Assistant response]\n")[-1].split("\n[End of assistant response]")[0]
        with server.lock:
            server.calls[response] = server.calls.get(response, 0) + 1
            calls = server.calls[response]
            server.auth.append(self.headers.get("Authorization"))
            server.models.append(body["model"])
        if "slow" in response and calls == 1:
            time.sleep(4.0)  # far past the client's timeout, so a loaded machine cannot blur the two
        if "broken" in response or ("flaky" in response and calls == 1):
            return self._send(500, {"error": "boom"})
        text = "I cannot judge this." if "mumble" in response else f"Fine.\nRating: {len(response.split())}"
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on a slow reply


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    server.daemon_threads = True
    server.lock, server.calls, server.auth, server.models = threading.Lock(), {}, [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_scores_over_http(judge_server, monkeypatch, capsys):
    server, url = judge_server
    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    scorer = reward.load_reward(f"judge:{url}?model=tiny-judge&key_env=JUDGE_KEY&timeout=1.5&retries=2",
                                backoff=0.01)
    responses = ["one two three", "slow reply of five words", "flaky reply", "broken reply", "mumble mumble",
                 " ".join(["w"] * 12)]
    rewards = scorer.score([{"prompt": "q"}] * len(responses), responses)
    assert rewards[:3] == [3.0, 5.0, 2.0], "slow and 500 replies should be retried and then rated"
    assert math.isnan(rewards[3]) and math.isnan(rewards[4]), "unrateable responses must be NaN, never 0"
    assert math.isnan(rewards[5]), "a rating outside 1-10 is not a rating"
    assert [i for i, _ in scorer.info["unrated"]] == [3, 4, 5]
    assert "3/6 responses unrated" in capsys.readouterr().err
    assert server.calls["broken reply"] == 3 and server.calls["slow reply of five words"] == 2
    assert set(server.auth) == {"Bearer sekrit"} and set(server.models) == {"tiny-judge"}


def test_judge_template_and_errors(judge_server, tmp_path, monkeypatch):
    _, url = judge_server
    template = tmp_path / "judge.txt"
    template.write_text("Q: {prompt}\n[Assistant response]\n{response}\n[End of assistant response]\n")
    monkeypatch.setenv("EVA_JUDGE_MODEL", "env-judge")
    scorer = reward.load_reward(f"judge:{url}", template=str(template))
    assert scorer.score(["q"], ["a b c d"]) == [4.0]
    assert reward.fill_template("P={prompt} R={response}", "use {response}", "{prompt}!") == \
        "P=use {response} R={prompt}!"
    bad = tmp_path / "bad.txt"
    bad.write_text("Rate {response}")
    with pytest.raises(ValueError, match="bad.txt: missing the placeholder {prompt}"):
        reward.load_reward(f"judge:{url}?template={bad}")
    monkeypatch.delenv("EVA_JUDGE_MODEL")
    with pytest.raises(ValueError, match="no judge model name"):
        reward.load_reward(f"judge:{url}")
    with pytest.raises(ValueError, match="unknown option 'temp'"):
        reward.load_reward(f"judge:{url}?model=m&temp=1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    with pytest.raises(endpoint.EndpointError, match=f"endpoint http://127.0.0.1:{port}/v1 unreachable"):
        reward.load_reward(f"judge:http://127.0.0.1:{port}/v1?model=m")


def test_parse_rating():
    assert reward.parse_rating("Good.\nRating: 7") == 7.0
    assert reward.parse_rating("Rating: [[8.5]]") == 8.5
    assert reward.parse_rating("**9**") == 9.0
    assert reward.parse_rating("I'd give it 6/10, then Rating: 4") == 4.0
    assert reward.parse_rating("score 6 out of 10") == 6.0
    for unrateable in (None, "", "Rating: 0", "Rating: 11", "no number here", "3 apples"):
        assert reward.parse_rating(unrateable) is None, unrateable


def test_score_sharded_and_command_line(tmp_path):
    prompts = [record("punctuation:no_comma", {}, rid="a"), record("startend:quotation", {}, rid="b")]
    scorer = reward.load_reward("rules")
    assert reward.score_sharded(scorer, prompts, ["x, y", '"q"']) == [0.0, 1.0]  # one process: a plain call
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    samples = [{"prompt_id": "a", "responses": ["no comma", "a, b"]}, {"prompt_id": "b", "responses": ['"x"']}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    out = tmp_path / "scored.jsonl"
    reward.main(["--prompts", str(tmp_path / "pool.jsonl"), "--samples", str(tmp_path / "samples.jsonl"),
                 "--out", str(out)])
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["rewards"] for s in scored] == [[1.0, 0.0], [1.0]] and all("info" not in s for s in scored)


def test_hf_bf16_scores_match_fp32(tiny_rm):
    # The GPU path loads in bf16; the rewards must come back as plain floats close to fp32's.
    fp32 = reward.load_reward(f"hf:{tiny_rm}").score(PROMPTS, RESPONSES)
    bf16 = reward.load_reward(f"hf:{tiny_rm}", dtype=torch.bfloat16).score(PROMPTS, RESPONSES)
    assert all(isinstance(x, float) for x in bf16) and bf16 == pytest.approx(fp32, abs=0.05)


def test_hf_without_pad_token_reads_the_last_real_token(tmp_path):
    # No pad id in the config: batched scoring must equal the model on each lone, unpadded conversation.
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
    tok = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=1,
                         pad_token_id=None)
    tok.pad_token = None  # and no pad token at all: eos ends every turn, so it cannot serve as padding
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rewards = reward.load_reward(f"hf:{tmp_path}", batch_size=3).score(PROMPTS, RESPONSES)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    for prompt, response, got in zip(PROMPTS, RESPONSES, rewards):
        text = tok.apply_chat_template([{"role": "user", "content": prompt["prompt"]},
                                        {"role": "assistant", "content": response}], tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])  # [1, T]
        with torch.no_grad():
            assert got == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
