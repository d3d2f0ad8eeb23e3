"""Tests of eval/: the aggregations against known figures, and every judge path over real HTTP.

The judge is a stdlib HTTP server started here that answers OpenAI-style chat completions with canned verdicts
chosen from what it is shown; answers come from the tiny random Llama with a few new tokens. Tests that read
../shared/data skip (through the shared_data fixture) when that folder is absent.
"""
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from eval import alpaca_eval, arena_hard, common, ifeval, mt_bench, winrate

GEN = ["--max_new_tokens", "4", "--batch_size", "4"]
JUDGE = ["--judge_retries", "0", "--judge_concurrency", "2", "--judge_timeout", "20"]


# ------------------------------------------------------------------------------------------------- the judge
@pytest.fixture
def judge_server():
    """(url, state): state["respond"](body) -> (http status, reply text); state["requests"] collects the bodies."""
    state = {"requests": [], "respond": lambda body: (200, "")}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state["requests"].append(body)
            status, text = state["respond"](body)
            payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                    "finish_reason": "stop"}]} if status == 200 else {"error": "boom"}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", state
    server.shutdown()
    server.server_close()


def _jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


# ------------------------------------------------------------------------------------------------- MT-Bench
def test_mt_bench_aggregation_reproduces_the_real_judgment_file(shared_data):
    rows = _jsonl(shared_data / "fixture_mt_bench_judgment_gemma-2-9b-it-sppo-iter-0_gpt-4_single.jsonl")
    result = mt_bench.aggregate(rows)
    assert round(result["turn1"], 4) == 8.8125
    assert round(result["turn2"], 4) == 8.3165
    assert round(result["overall"], 4) == 8.5660
    assert (result["n_rated"], result["n_dropped"]) == (159, 1)
    # our parser gives the score FastChat recorded for every one of the 160 real judge replies
    assert [mt_bench.parse_rating(r["judgment"]) for r in rows] == [r["score"] for r in rows]


def test_mt_bench_rating_parser():
    assert mt_bench.parse_rating("fine. Rating: [[7]]") == 7
    assert mt_bench.parse_rating("Rating: [[8.5]] and later [[3]]") == 8.5
    assert mt_bench.parse_rating("Rating: [6]") == 6  # FastChat's fallback pattern
    assert mt_bench.parse_rating("no number") == -1
    assert mt_bench.parse_rating(None) == -1


def test_mt_bench_end_to_end_over_http(tiny_llama_dir, shared_data, judge_server, tmp_path):
    url, state = judge_server
    questions = {q["question_id"]: q for q in _jsonl(shared_data / "mt_bench_questions.jsonl")}
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(questions[i]) + "\n" for i in (81, 101, 111)))  # writing, reasoning, math

    def respond(body):
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        multi = "### User:" in user
        if "Reference" in user:
            return 200, "unsure" if multi else "Rating: [[4]]"  # unparseable -> -1 -> dropped
        return 200, "Rating: [[6]]" if multi else "Rating: [[8]]"

    state["respond"] = respond
    out = tmp_path / "mt.json"
    mt_bench.main(["--model", str(tiny_llama_dir), "--questions", str(qfile),
                   "--judge_prompts", str(shared_data / "mt_bench_judge_prompts.jsonl"),
                   "--reference_answers", str(shared_data / "mt_bench_reference_answers_gpt-4.jsonl"),
                   "--judge_url", url, "--judge_model", "canned", "--out", str(out)] + GEN + JUDGE)
    result = json.loads(out.read_text())
    assert (result["turn1"], result["turn2"], result["overall"]) == (pytest.approx(16 / 3), 6.0, 5.5)
    assert (result["n_rated"], result["n_dropped"], result["failed"]) == (4, 2, [])
    answers = _jsonl(tmp_path / "mt_answers.jsonl")
    assert [len(a["choices"][0]["turns"]) for a in answers] == [2, 2, 2]
    judged = _jsonl(tmp_path / "mt_judgments.jsonl")
    assert {tuple(j["judge"]) for j in judged} == {("canned", n) for n in mt_bench.PROMPT_NAMES.values()}
    assert len(state["requests"]) == 6 and all(r["temperature"] == 0 for r in state["requests"])
    # the turn-2 prompt of the reasoning question carries both reference turns and both answer turns
    ref2 = next(j["user_prompt"] for j in judged if j["question_id"] == 101 and j["turn"] == 2)
    assert questions[101]["turns"][1] in ref2 and answers[1]["choices"][0]["turns"][1] in ref2


# ------------------------------------------------------------------------------------------------- Arena-Hard
PATTERN = r"\[\[([AB<>=]+)\]\]"


def test_arena_verdict_parsing():
    assert arena_hard.parse_verdict("My final verdict: [[A>B]]", PATTERN) == ("A>B", False)
    assert arena_hard.parse_verdict("[[B>>A]] ... so [[B>>A]]", PATTERN) == ("B>>A", False)
    assert arena_hard.parse_verdict("[[A>B]] or maybe [[B>A]]", PATTERN) == (None, False)  # conflict: no retry
    assert arena_hard.parse_verdict("no label at all", PATTERN) == (None, True)  # ask the judge to finish


def test_arena_aggregation_by_hand_and_bradley_terry():
    verdicts = [("B>>A", "A>B"),   # game 1 baseline is A: model strongly better (3 wins); game 2 model is A: 1 win
                ("A=B", "A=B"),    # two ties
                ("A>B", "B>>A"),   # baseline better: 1 loss, then strongly: 3 losses
                ("B>A", None)]     # one win; game 2 unparsed counts for nothing
    outcomes = [o for g1, g2 in verdicts for o in arena_hard.battle_outcomes(g1, g2)]
    assert outcomes == [1, 1, 1, 1, 0.5, 0.5, 0, 0, 0, 0, 1]
    result = arena_hard.arena_score(outcomes)
    assert result["score"] == pytest.approx(100 * 6 / 11) and result["n_battles"] == 11
    assert result["ci_low"] <= result["score"] <= result["ci_high"] and result["ci_high"] - result["ci_low"] > 10
    assert arena_hard.arena_score(outcomes) == result  # seeded
    battles = [("gpt-4-0314", "mine", 1 - o) for o in outcomes]  # outcome for model_a = the baseline
    ratings = arena_hard.bradley_terry(battles, anchor="gpt-4-0314")
    assert ratings["gpt-4-0314"] == 1000
    assert arena_hard.bt_win_rate(ratings, "mine", "gpt-4-0314") == pytest.approx(6 / 11, abs=1e-9)


def test_bradley_terry_recovers_known_strengths():
    # strengths 9 : 3 : 1 give P(a>b) = 3/4, P(b>c) = 3/4, P(a>c) = 9/10; data in exactly those proportions
    battles = [("a", "b", 1.0)] * 3 + [("a", "b", 0.0)] + [("b", "c", 1.0)] * 3 + [("c", "b", 1.0)] \
        + [("a", "c", 1.0)] * 9 + [("a", "c", 0.0)]
    r = arena_hard.bradley_terry(battles, anchor="c")
    assert r["a"] - r["c"] == pytest.approx(400 * math.log10(9), abs=1e-6)
    assert r["b"] - r["c"] == pytest.approx(400 * math.log10(3), abs=1e-6)


def test_arena_end_to_end_over_http(tiny_llama_dir, shared_data, judge_server, tmp_path):
    url, state = judge_server
    questions = _jsonl(shared_data / "arena_hard_v0.1_questions.jsonl")[:3]
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    baseline = {a["question_id"]: a["choices"][0]["turns"][0]["content"]
                for a in _jsonl(shared_data / "arena_hard_v0.1_gpt-4-0314_baseline_answers.jsonl")}
    first, second, third = (q["turns"][0]["content"] for q in questions)

    def respond(body):
        user = body["messages"][1]["content"]
        baseline_is_a = "Assistant A's Answer|>\n" + baseline[next(q["question_id"] for q in questions
                                                                 if q["turns"][0]["content"] in user)] in user
        if third in user:
            return 500, ""  # this question's judge always fails
        if second in user and len(body["messages"]) == 2:
            return 200, "I need to think more."  # no label: the judge is asked to finish
        return 200, "[[B>>A]]" if baseline_is_a else "[[A>>B]]"  # the model is always much better

    state["respond"] = respond
    out = tmp_path / "ah.json"
    arena_hard.main(["--model", str(tiny_llama_dir), "--questions", str(qfile),
                     "--baseline_answers", str(shared_data / "arena_hard_v0.1_gpt-4-0314_baseline_answers.jsonl"),
                     "--judge_config", str(shared_data / "arena_hard_v0.1_judge_config.json"),
                     "--judge_url", url, "--out", str(out)] + GEN + JUDGE)
    result = json.loads(out.read_text())
    assert result["score"] == 100.0 and result["n_battles"] == 12  # 2 questions x 2 games x 3 battles
    assert result["failed"] == [questions[2]["question_id"]] and result["unparsed_games"] == 0
    assert result["judge"] == "gpt-4-1106-preview"  # from the config when --judge_model is not given
    follow_ups = [r for r in state["requests"] if len(r["messages"]) == 4]
    assert len(follow_ups) == 2 and follow_ups[0]["messages"][3]["content"] == arena_hard.CONTINUE
    assert all(r["max_tokens"] == 4096 and r["temperature"] == 0 for r in state["requests"])
    judgments = _jsonl(tmp_path / "ah_judgments.jsonl")
    assert [g["score"] for g in judgments[0]["games"]] == ["B>>A", "A>>B"]
    answers = _jsonl(tmp_path / "ah_answers.jsonl")
    assert answers[0]["choices"][0]["turns"][0]["token_len"] >= 0 and answers[0]["question_id"] == questions[0][
        "question_id"]


# ------------------------------------------------------------------------------------------------- AlpacaEval
def _lengths(rng, n):
    return rng.integers(100, 3000, n), rng.integers(100, 3000, n)


def test_alpaca_head2head_matches_alpaca_evals_definition():
    result = alpaca_eval.head2head([2.0, 1.0, 1.5, 2.0, 0, float("nan")])
    assert result["win_rate"] == pytest.approx(100 * (1 + 0 + 0.5 + 1 + 0.5) / 5)
    assert (result["n_wins"], result["n_wins_base"], result["n_draws"], result["n_total"]) == (2, 1, 2, 5)
    assert result["standard_error"] == pytest.approx(100 * np.std([1, 0, .5, 1, .5], ddof=1) / np.sqrt(5))


def test_alpaca_lc_glm_recovers_a_known_length_bias():
    rng = np.random.default_rng(0)
    len_model, len_base = _lengths(rng, 805)
    delta = (len_base - len_model) / np.std(len_base - len_model, ddof=1)
    p = 1 / (1 + np.exp(-(0.4 - 1.2 * np.tanh(delta))))  # a judge that likes long answers, quality 0.4
    prefs = list(1.0 + (rng.random(805) < p))
    result = alpaca_eval.length_controlled(prefs, len_model, len_base)
    coef = result["coefficients"]
    assert coef["np.tanh(std_delta_len)"] == pytest.approx(-1.2, abs=0.25)
    assert coef["not_gamed_baseline.astype(float)"] == pytest.approx(0.4, abs=0.2)
    assert result["length_controlled_winrate"] == pytest.approx(100 / (1 + math.exp(-0.4)), abs=4)
    assert result["C"] in alpaca_eval.CS


def test_alpaca_lc_equals_raw_without_length_differences_and_fit_is_an_l1_optimum():
    rng = np.random.default_rng(1)
    prefs = list(1.0 + (rng.random(200) < 0.7))
    same = np.full(200, 500)
    result = alpaca_eval.length_controlled(prefs, same, same, cv=False)
    assert result["length_controlled_winrate"] == pytest.approx(alpaca_eval.head2head(prefs)["win_rate"], abs=1e-6)
    # KKT conditions of min |b|_1 + C * loss: gradient = -sign(b) where b != 0, |gradient| <= 1 where b == 0
    len_model, len_base = _lengths(rng, 200)
    X, y = alpaca_eval._features(prefs, len_model, len_base, rng.normal(size=200), True)
    w = np.ones(200)
    for C in (0.003, 0.05, 1.0):
        b = alpaca_eval.fit_logistic(X, y, w, C=C)
        grad = C * X.T @ (w * (1 / (1 + np.exp(-X @ b)) - y))
        for bj, gj in zip(b, grad):
            assert (abs(gj) <= 1 + 1e-6) if bj == 0 else gj == pytest.approx(-np.sign(bj), abs=1e-5)


def test_alpaca_judge_prompt_and_config_parse(shared_data):
    messages = alpaca_eval.chat_messages(
        (shared_data / "alpaca_eval_2.0_weighted_gpt4_turbo_judge_prompt.txt").read_text())
    assert [m["role"] for m in messages] == ["system", "user"]
    filled = alpaca_eval.fill(messages, dict(instruction="I?", output_1="one {output_2}", output_2="two"))
    assert "one {output_2}" in filled[1]["content"] and '"""two"""' in filled[1]["content"]
    config = common.read_config(shared_data / "alpaca_eval_2.0_weighted_gpt4_turbo_annotator_config.yaml")
    args = type("A", (), dict(judge_model=None, judge_max_tokens=None, judge_temperature=None))()
    settings = alpaca_eval.judge_settings(args, config)
    assert settings == dict(annotator="weighted_alpaca_eval_gpt4_turbo", first="m", tokens=["m", "M"],
                            temperature=1.0, max_tokens=1, model="gpt-4-1106-preview")


def test_alpaca_end_to_end_over_http(tiny_llama_dir, shared_data, judge_server, tmp_path):
    url, state = judge_server
    data = shared_data
    baseline = json.loads((data / "alpaca_eval_2.0_gpt4_1106_preview_baseline_outputs.json").read_text())[:6]
    base_out = {b["instruction"]: b["output"] for b in baseline}
    want = {b["instruction"]: (i % 2 == 0) for i, b in enumerate(baseline)}  # the model wins on even items

    def respond(body):
        user = body["messages"][1]["content"]
        instruction = next(i for i in want if f'"""{i}"""' in user)
        if instruction == baseline[5]["instruction"]:
            return 500, ""
        first_is_baseline = user.index(base_out[instruction]) < user.index('"M"')
        model_token, base_token = ("M", "m") if first_is_baseline else ("m", "M")
        return 200, model_token if want[instruction] else base_token

    state["respond"] = respond
    out = tmp_path / "ae.json"
    alpaca_eval.main(["--model", str(tiny_llama_dir), "--baseline_outputs",
                      str(data / "alpaca_eval_2.0_gpt4_1106_preview_baseline_outputs.json"),
                      "--judge_prompt", str(data / "alpaca_eval_2.0_weighted_gpt4_turbo_judge_prompt.txt"),
                      "--annotator_config", str(data / "alpaca_eval_2.0_weighted_gpt4_turbo_annotator_config.yaml"),
                      "--gamed", str(data / "alpaca_eval_2.0_gpt4_1106_preview_concise_gamed_outputs.json"),
                      "--limit", "6", "--judge_url", url, "--out", str(out)] + GEN + JUDGE)
    result = json.loads(out.read_text())
    assert result["failed"] == [5] and result["unparsed"] == []
    assert result["preferences"][:5] == [2.0, 1.0, 2.0, 1.0, 2.0]  # order swaps undone
    assert result["win_rate"] == pytest.approx(60.0) and result["n_total"] == 5
    assert 0 < result["length_controlled_winrate"] < 100
    assert (tmp_path / "ae_gamed_alpaca_eval_2.0_gpt4_1106_preview_concise_gamed_outputs.json").is_file()
    assert all(r["max_tokens"] == 1 and r["temperature"] == 1 for r in state["requests"])
    outputs = json.loads((tmp_path / "ae_outputs.json").read_text())
    assert [o["instruction"] for o in outputs] == [b["instruction"] for b in baseline]


# ------------------------------------------------------------------------------------------------- IFEval
def test_ifeval_official_file_and_coverage(shared_data):
    records = ifeval.read_records(shared_data / "ifeval_input_data.jsonl")
    cov = ifeval.coverage(records)
    assert cov["prompts"] == cov["prompts_scored"] == 541 and cov["instructions_scored"] == 834
    assert cov["unsupported_ids"] == {}


def test_ifeval_end_to_end(tiny_llama_dir, shared_data, tmp_path, capsys):
    lines = (shared_data / "ifeval_input_data.jsonl").read_text().splitlines()
    language = next(line for line in lines if "language:response_language" in line)
    # An id from outside IFEval's 25 (another benchmark's file): that prompt is answered but left out of the scores.
    foreign = json.dumps({"key": 9999, "prompt": "Write a limerick.", "instruction_id_list": ["custom:rhymes"],
                          "kwargs": [{}]})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(lines[:3] + [language, foreign]) + "\n")
    out = tmp_path / "if.json"
    ifeval.main(["--model", str(tiny_llama_dir), "--prompts", str(prompts), "--out", str(out)] + GEN)
    result = json.loads(out.read_text())
    assert result["n_prompts"] == 4 and result["coverage"]["prompts"] == 5
    assert "language:response_language" in result["per_instruction"]
    assert 0 <= result["prompt_level"] <= result["instruction_level"] <= 1
    assert "IFEval coverage: 4/5 prompts" in capsys.readouterr().out
    assert len(_jsonl(tmp_path / "if_responses.jsonl")) == 5


def test_evaluate_ifeval_in_process(tiny_llama_dir):
    import model
    solver, tokenizer = model.load_model(str(tiny_llama_dir))
    records = [dict(id="a", prompt="Say hi.", instruction_id_list=["punctuation:no_comma"], kwargs=[{}])] * 2
    result = ifeval.evaluate_ifeval(solver, tokenizer, records, max_new_tokens=3)
    assert result["n_prompts"] == 2 and len(result["responses"]) == 2
    assert result["responses"][0] == result["responses"][1]  # greedy by default


# ------------------------------------------------------------------------------------------------- win rate
def test_win_rate_by_hand():
    result = winrate.win_rate([1.0, 0.5, 0.0, 1.0, 0.2], [0.0, 0.5, 1.0, float("nan"), 0.1], n_boot=500)
    assert (result["wins"], result["ties"], result["losses"], result["n"], result["n_dropped"]) == (2, 1, 1, 4, 1)
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    assert result["ci_low"] < result["win_rate"] < result["ci_high"]
    assert winrate.win_rate([1.0, 0.5, 0.0, 1.0, 0.2], [0.0, 0.5, 1.0, float("nan"), 0.1], n_boot=500) == result
    sure = winrate.win_rate([1, 1, 1], [0, 0, 0])
    assert (sure["win_rate"], sure["ci_low"], sure["ci_high"]) == (1.0, 1.0, 1.0)


def test_winrate_end_to_end_same_model_ties(tiny_llama_dir, tmp_path):
    out = tmp_path / "wr.json"
    winrate.main(["--model_a", str(tiny_llama_dir), "--model_b", str(tiny_llama_dir), "--limit", "3",
                  "--out", str(out)] + GEN)
    result = json.loads(out.read_text())
    assert (result["win_rate"], result["ties"], result["n"]) == (0.5, 3, 3)
    assert [p["answer_a"] == p["answer_b"] for p in result["per_prompt"]] == [True] * 3


# ------------------------------------------------------------------------------------------------- files
def test_question_files_parse(shared_data):
    questions = arena_hard.read_questions(shared_data / "arena_hard_v0.1_questions.jsonl")
    baseline = arena_hard.read_answers(shared_data / "arena_hard_v0.1_gpt-4-0314_baseline_answers.jsonl")
    assert len(questions) == 500 and {q["question_id"] for q in questions} == set(baseline)
    config = common.read_config(shared_data / "arena_hard_v0.1_judge_config.json")
    assert config["number_of_judgment_attempts"] == 2 and config["regex_pattern"] == PATTERN
    mt = mt_bench.read_by_id(shared_data / "mt_bench_questions.jsonl", "questions", mt_bench._check_question)
    assert len(mt) == 80
    for name in ("gpt-4", "gpt-4-1106-preview"):
        refs = mt_bench.read_by_id(shared_data / f"mt_bench_reference_answers_{name}.jsonl", "refs",
                                   mt_bench._check_answer)
        assert {q for q, r in mt.items() if r["category"] in mt_bench.NEED_REF} <= set(refs)
    names = {json.loads(line)["name"] for line in open(shared_data / "mt_bench_judge_prompts.jsonl")}
    assert set(mt_bench.PROMPT_NAMES.values()) <= names
    for f in ("baseline", "concise_gamed", "verbose_gamed"):
        rows = alpaca_eval.read_outputs(shared_data / f"alpaca_eval_2.0_gpt4_1106_preview_{f}_outputs.json")
        assert len(rows) == 805
    assert len(ifeval.read_records(ifeval.DEFAULT_PROMPTS)) > 0


def test_bad_input_is_one_line_naming_file_and_line(tmp_path, capsys):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "turns": [{"content": "hi"}]}\n\n{"question_id": 2, oops}\n')
    with pytest.raises(SystemExit) as exit_info:
        common.run(arena_hard.main, ["--questions", str(bad), "--answers", str(tmp_path / "a.jsonl")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:3:" in err
    with pytest.raises(SystemExit):
        common.run(mt_bench.main, ["--show", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_render_chat_leaves_one_bos():
    class Tok:  # a Gemma-like tokenizer: the template writes <bos> and tokenizing adds one too
        bos_token, bos_token_id = "<bos>", 2

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "<bos>" + "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<model>"

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [2, 7] if add_special_tokens else [7]}

    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    assert common.render_chat(Tok(), conv) == "<user>hi<assistant>yo<user>?<model>"
    Tok.__call__ = lambda self, text, add_special_tokens=True: {"input_ids": [7]}  # a tokenizer that adds none
    assert common.render_chat(Tok(), conv).startswith("<bos><user>")
