"""Tests of creator.py: metrics, selection, templates, parsing, de-duplication, constraint steps (constraints.py),
chains, pairs, the mix, lineage (report.py), and the endpoint back-end over real HTTP against a local server.

    .venv/bin/python -m pytest tests/test_creator.py -x -q
"""
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import cleaning
import constraints
import creator
import instructions
import report

NAN = float("nan")


def seed_records() -> list[dict]:
    return [
        {"id": "s1", "prompt": "Write a short poem about the first snowfall of the year. Open with a title set "
                               "between << and >>, like <<the plan>>. Use less than 80 words in total.",
         "instruction_id_list": ["detectable_format:title", "length_constraints:number_words"],
         "kwargs": [{}, {"relation": "less than", "num_words": 80}], "parent": None, "iteration": 0, "method": None},
        {"id": "s2", "prompt": "Why do leaves change color in autumn? Leave out commas completely.",
         "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}], "parent": None, "iteration": 0,
         "method": None},
        {"id": "s3", "prompt": "Describe a busy train station at rush hour. Include the keyword \"whistle\" in your "
                               "response.", "instruction_id_list": ["keywords:existence"],
         "kwargs": [{"keywords": ["whistle"]}], "parent": None, "iteration": 0, "method": None},
    ]


# ------------------------------------------------------------------------------------------------ informativeness

REWARDS = [[1.0, 0.0, 0.5], [0.5, 0.5, 0.5], [0.2, 0.8, 0.8, 0.4], [0.7], [1.0, NAN, 0.0]]


@pytest.mark.parametrize("metric,expected", [
    ("gap", [1.0, NAN, 0.6, NAN, 1.0]),
    ("max_mean", [0.5, NAN, 0.25, NAN, 0.5]),
    ("variance", [1 / 6, NAN, 0.0675, NAN, 0.25]),
    ("mean", [0.5, NAN, 0.55, NAN, 0.5]),
    # means over the pool: 0.5, 0.5, 0.55, 0.7, 0.5 -> normalised (m - 0.5) / 0.2
    ("inv_mean", [1.0, NAN, 0.75, NAN, 1.0]),
    ("best_second", [0.5, NAN, 0.0, NAN, 1.0]),
    ("uniform", [1.0, NAN, 1.0, NAN, 1.0]),
])
def test_metrics_on_hand_examples(metric, expected):
    got = creator.informativeness(REWARDS, metric)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, expected, atol=1e-12, equal_nan=True, err_msg=metric)


def test_metric_flag_is_checked_and_default_is_gap():
    np.testing.assert_array_equal(creator.informativeness([[0, 1]]), [1.0])
    with pytest.raises(ValueError, match="metric 'spread'"):
        creator.informativeness([[0, 1]], "spread")
    assert creator.METRICS[0] == "gap" and len(creator.METRICS) == 7


def test_selection_weights_min_max_with_no_information_floor():
    np.testing.assert_allclose(creator.selection_weights(np.array([0.0, 0.5, 1.0, NAN])), [0, 0.5, 1, 0])
    # every prompt with gap exactly 1 (one-constraint rules prompts): equal non-zero weights, not 0/0
    np.testing.assert_allclose(creator.selection_weights(np.array([1.0, 1.0, NAN])), [1, 1, 0])
    np.testing.assert_allclose(creator.selection_weights(np.array([-1.0, 0.0, 1.0])), [0, 0.5, 1])


# ------------------------------------------------------------------------------------------------ selection

def test_weighted_sampling_without_replacement_ranks_like_weights():
    info = np.array([NAN, 0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, NAN, 0.0])
    counts = np.zeros(len(info))
    for seed in range(3000):
        chosen = creator.select(info, 0.25, "weighted", seed=seed)
        assert len(chosen) == 3 == len(set(chosen)), chosen  # exact fraction, without replacement
        counts[chosen] += 1
    assert counts[[0, 1, 10, 11]].sum() == 0, "zero-weight (and tied) prompts were drawn"
    freq = counts[2:10]
    assert np.all(np.diff(freq) > 0), f"inclusion frequencies do not rank like the weights: {freq}"


def test_weighted_order_puts_heavier_first_and_zero_weights_last():
    weights = np.array([0.0, 1.0, 0.0, 4.0, 2.0])
    first = np.zeros(len(weights))
    for seed in range(2000):
        order = creator.weighted_order(weights, np.random.default_rng(seed))
        assert sorted(order.tolist()) == list(range(5)) and set(order[3:].tolist()) == {0, 2}, order
        first[order[0]] += 1
    assert first[0] == first[2] == 0 and first[3] > first[4] > first[1] > 0
    np.testing.assert_allclose(first[[1, 4, 3]] / 2000, [1 / 7, 2 / 7, 4 / 7], atol=0.04)  # P(first) = w / sum w


def test_split_counts_tops_up_the_short_side():
    assert creator.split_counts(5, 0.8, 10, 10) == (4, 1)
    assert creator.split_counts(5, 0.8, 2, 10) == (2, 3), "few on side a: b makes up the rest"
    assert creator.split_counts(5, 0.8, 10, 0) == (5, 0), "nothing on side b: a makes up the rest"
    assert creator.split_counts(9, 0.5, 3, 2) == (3, 2), "more wanted than there is: everything"


def test_selection_rules_greedy_uniform_and_seeding():
    info = np.array([0.2, NAN, 0.9, 0.5, 0.9, 0.1, NAN, 0.3])
    assert creator.select(info, 0.25, "greedy") == [2, 4]
    assert creator.select(info, 0.5, "greedy") == [2, 3, 4, 7]
    assert creator.select(info, 1.0, "greedy") == [0, 2, 3, 4, 5, 7], "tied (NaN) prompts must never be picked"
    assert creator.select(info, 0.25, "weighted", seed=5) == creator.select(info, 0.25, "weighted", seed=5)
    assert len({tuple(creator.select(info, 0.5, "weighted", seed=s)) for s in range(30)}) > 1
    picked = set()
    for s in range(200):
        chosen = creator.select(info, 0.5, "uniform", seed=s)
        assert len(chosen) == 4 == len(set(chosen))
        picked |= set(chosen)
    assert picked == set(range(8)), "uniform selection is over the whole pool"
    with pytest.raises(ValueError, match="selection rule"):
        creator.select(info, 0.25, "top")
    with pytest.raises(ValueError, match="fraction"):
        creator.select(info, 1.5)


def test_n_selected_rounds_and_keeps_one():
    assert [creator.n_selected(n, 0.25) for n in (0, 1, 2, 4, 10, 100)] == [0, 1, 1, 1, 3, 25]
    assert creator.n_selected(10, 0.0) == 0


def test_weighted_takes_only_positive_weights_when_too_few():
    assert creator.select(np.array([1.0, NAN, NAN, NAN]), 1.0, "weighted") == [0]


def test_summarize_info():
    s = report.summarize_info([0.0, 0.5, 1.0, NAN])
    assert s["n"] == 4 and s["informative"] == 2 and s["median"] == 0.5 and s["max"] == 1.0
    json.dumps(s)


# ------------------------------------------------------------------------------------------------ templates

def test_every_method_renders_with_its_own_instruction():
    assert sum(m.kind == "depth" for m in creator.EVOLVE_METHODS.values()) == 5
    assert sum(m.kind == "breadth" for m in creator.EVOLVE_METHODS.values()) == 5
    prompt = "Explain how a rainbow forms {with braces}."
    texts = set()
    for name, method in creator.EVOLVE_METHODS.items():
        text = creator.render(name, prompt)
        assert prompt in text and method.instruction in text, name
        assert "answer" in text and "as long as the original" in text and "real user" in text, name
        assert "{" not in text.replace("{with braces}", ""), f"{name}: unfilled placeholder"
        texts.add(text)
    assert len(texts) == 10
    assert set(creator.methods_for("depth")) == {"add_constraints", "deepen", "concretise", "reasoning", "expand"}
    assert set(creator.methods_for("breadth")) == {"persona", "shift_in_domain", "shift_out_domain", "mix_domains",
                                                   "abstract"}
    with pytest.raises(ValueError, match="kinds"):
        creator.methods_for("wide")
    with pytest.raises(ValueError, match="evolve method"):
        creator.render("shorten", prompt)


# ------------------------------------------------------------------------------------------------ parsing

GOAL = "Write a poem about a lighthouse keeper who is afraid of the dark."


@pytest.mark.parametrize("raw", [
    GOAL,
    f"  \"{GOAL}\"  ",
    f"Rewritten prompt: {GOAL}",
    f"**Rewritten Prompt:** {GOAL}",
    f"New request:\n{GOAL}",
    f"Sure! Here is the rewritten request:\n\n\"{GOAL}\"",
    f"<request>\n{GOAL}\n</request>",
    f"\u201c{GOAL}\u201d",
    f"```\n{GOAL}\n```",
    f"{GOAL}\n\nNote: I made the keeper afraid of the dark to add tension.",
    f"Original request: Write a poem about a lighthouse.\nNew request: {GOAL}",
    f"[INST] {GOAL} [/INST]",
])
def test_parse_messy_creator_outputs(raw):
    assert cleaning.parse_rewrite(raw) == GOAL


def test_echo_markers_come_from_every_template():
    assert len(creator.ECHO_MARKERS) >= 3
    for name in creator.EVOLVE_METHODS:
        message = creator.render(name, "Write a haiku about rain.").lower()
        assert all(marker in message for marker in creator.ECHO_MARKERS), name
    echo = "Each new request is one a person could really answer. Write a haiku about rain."
    assert cleaning.clean_rewrite("Write a poem about rain.", echo, echoes=creator.ECHO_MARKERS)[1] == "echo"
    assert cleaning.clean_rewrite("Write a poem about rain.", echo)[1] == "ok", "without markers it is a request"


@pytest.mark.parametrize("raw,reason", [
    (None, "failed"),
    ("", "empty"),
    ("<request></request>", "empty"),
    ("Rewritten prompt: Poem.", "too_short"),
    ("Write a poem, worded the way a real user would write it.", "echo"),
    ("write a POEM   about a lighthouse!", "copy"),
    ("Write a poem about a lighthouse " + "and the sea and the wind " * 20, "too_long"),
    ("Sure! The lighthouse stood tall against the night sky, its beam sweeping the waves.", "answer"),
    ("The lighthouse stood tall against the night sky.\nIts beam swept the waves.", "answer"),
    ("The ocean is a land of endless beauty, where stars shine bright and the sea is magic.", "answer"),
    ("That was a request to write a poem. I'd be happy to explain the process of writing one.", "meta"),
    ("I'm ready to assist. What's the question you'd like to discuss?", "meta"),
    ("Write a poem about a lighthouse keeper's last night on duty.", "ok"),
    ("As a fisherman, what would you want a lighthouse to do in a storm?", "ok"),
])
def test_clean_rewrite_reasons(raw, reason):
    text, why = cleaning.clean_rewrite("Write a poem about a lighthouse.", raw, echoes=creator.ECHO_MARKERS)
    assert why == reason, (raw, text)
    assert (text is None) == (reason != "ok")


# ------------------------------------------------------------------------------------------------ de-duplication

def test_dedup_catches_respaced_recased_copy_and_near_copies():
    pool = [{"id": "a", "prompt": "Write a short poem about the first snowfall of the year."}]
    cands = [{"id": "b", "prompt": "  WRITE a short   poem about the first\nsnowfall of the YEAR"},  # re-spaced
             {"id": "c", "prompt": "Write a short poem about the first snowfalls of the year."},  # near
             {"id": "d", "prompt": "Describe a busy train station at rush hour."},
             {"id": "e", "prompt": "describe a busy train station at rush hour"}]  # copy of an earlier candidate
    index = cleaning.new_index()
    cleaning.index_add(index, pool[0])
    found = []
    for c in cands:  # as evolve does: each kept child joins the index
        found.append(cleaning.index_find(index, c, 0.85))
        if found[-1] is None:
            cleaning.index_add(index, c)
    assert found == ["duplicate", "near_duplicate", None, "duplicate"]
    assert cleaning.similarity(pool[0]["prompt"], cands[1]["prompt"]) > 0.85
    assert cleaning.similarity(pool[0]["prompt"], cands[2]["prompt"]) < 0.1


def test_near_duplicates_must_share_constraints():
    base = {"id": "a", "prompt": "Write a poem about snow. Answer with fewer than 80 words.",
            "instruction_id_list": ["length_constraints:number_words"],
            "kwargs": [{"relation": "less than", "num_words": 80}]}
    tighter = {**base, "id": "b", "prompt": "Write a poem about snow. Answer with fewer than 60 words.",
               "kwargs": [{"relation": "less than", "num_words": 60}]}
    assert cleaning.similarity(base["prompt"], tighter["prompt"]) > 0.85
    index = cleaning.new_index()
    cleaning.index_add(index, base)
    assert cleaning.index_find(index, tighter, 0.85) is None, "a tightened constraint is a new task, not a copy"
    assert cleaning.index_find(index, {**base, "id": "c", "prompt": base["prompt"] + "!"}, 0.85) == "duplicate"


# ------------------------------------------------------------------------------------------------ constraints

def test_split_task_keeps_the_request_and_drops_rule_sentences():
    r = seed_records()
    assert constraints.split_task(r[0]) == "Write a short poem about the first snowfall of the year."
    assert constraints.split_task(r[1]) == "Why do leaves change color in autumn?"
    assert constraints.split_task({**r[1], "task": "Own task."}) == "Own task."
    assert constraints.split_task(r[1], verifiable=False) == r[1]["prompt"]
    interleaved = {**r[1], "prompt": "I get nervous before job interviews. The word \"practice\" should appear 2 or "
                                     "more times. What can I do?"}
    assert constraints.split_task(interleaved) == "I get nervous before job interviews. What can I do?"


def test_tightening_number_words():
    rng = np.random.default_rng(0)
    ids, kwargs = ["length_constraints:number_words"], [{"relation": "less than", "num_words": 80}]
    out = constraints.constraint_step("Write a poem.", ids, kwargs, rng, max_constraints=1)
    assert out == (ids, [{"relation": "less than", "num_words": 60}], "tightened length_constraints:number_words")


def test_constraint_steps_stay_valid_compatible_and_bounded():
    actions = set()
    task = "Write a short poem about the first snowfall of the year."
    for s in range(200):
        rng = np.random.default_rng(s)
        starts = [(["change_case:english_lowercase"], [{}]), ([], []),
                  (["punctuation:no_comma", "detectable_format:title"], [{}, {}])]
        ids, kwargs = starts[s % 3]
        for step in range(12):
            out = constraints.constraint_step(task, ids, kwargs, rng)
            if out is None:  # only once the set is full and every constraint is at its bound
                assert step >= 4 and len(ids) == constraints.MAX_CONSTRAINTS, (step, ids, kwargs)
                assert all(constraints._tightened(i, k, task, ids, kwargs) is None for i, k in zip(ids, kwargs))
                break
            ids, kwargs, action = out
            actions.add(action.split()[0])
            assert len(ids) <= constraints.MAX_CONSTRAINTS and constraints.compatible(ids, kwargs), (ids, kwargs)
            instructions.validate_record({"id": "x", "instruction_id_list": ids, "kwargs": kwargs})
            if s % 3 == 0:
                assert "change_case:english_capital" not in ids and "change_case:capital_word_frequency" not in ids
    assert actions == {"added", "tightened"}


def test_compatible_rules():
    assert not constraints.compatible(["change_case:english_lowercase", "change_case:english_capital"], [{}, {}])
    assert not constraints.compatible(["detectable_format:json_format", "detectable_format:title"], [{}, {}])
    assert not constraints.compatible(["punctuation:no_comma", "startend:end_checker"], [{}, {"end_phrase": "Yes, bye."}])
    assert not constraints.compatible(["keywords:existence", "keywords:forbidden_words"],
                                 [{"keywords": ["snow"]}, {"forbidden_words": ["snow"]}])
    assert constraints.compatible(["punctuation:no_comma", "detectable_format:title"], [{}, {}])


# ------------------------------------------------------------------------------------------------ evolve

def numbered_completer(log: list | None = None):
    """A fake creator that always writes a new, valid request (and records what it was asked)."""
    topics = ["a lighthouse keeper", "a beekeeper in the city", "an old violin", "a desert train", "a lost kite",
              "a night market", "a chess club", "a glacier", "a bakery at dawn", "a moon base", "a river ferry",
              "a snowed-in cabin", "a street musician", "a tiny robot", "a sunflower field", "a haunted library"]
    n = [0]

    def complete(messages):
        if log is not None:
            log.extend(messages)
        out = []
        for _ in messages:
            out.append(f"Rewritten prompt: Describe {topics[n[0] % len(topics)]} in rich detail, case {n[0]}.")
            n[0] += 1
        return out

    return complete


def test_chain_of_depth_k_yields_k_children_with_lineage():
    parents = seed_records()
    log = []
    children, stats = creator.evolve(parents, numbered_completer(log), depth=4, seed=1, iteration=2, pool=parents)
    assert len(children) == 12 and stats["kept"] == 12
    assert len({c["id"] for c in children}) == 12
    for p in parents:
        chain = [c for c in children if c["root"] == p["id"]]
        assert [c["step"] for c in chain] == [1, 2, 3, 4]
        assert chain[0]["parent"] == p["id"]
        assert [c["parent"] for c in chain[1:]] == [c["id"] for c in chain[:-1]]
        for c in chain:
            assert c["iteration"] == 2 and c["method"] in creator.EVOLVE_METHODS
            instructions.validate_record(c, "test")
            # the constraint sentences are all there, intact, after the task
            sentences = [instructions.describe_instruction(i, k) for i, k in zip(c["instruction_id_list"], c["kwargs"])]
            assert c["prompt"].endswith(" ".join(sentences)), c["prompt"]
            assert c["prompt"].startswith(c["task"].rstrip("."))
    # the creator LLM only ever saw tasks, never the constraint sentences
    assert log and not any("Leave out commas" in m or "angular" in m for m in log)
    assert stats["creator_calls"] == len(log)
    assert sum(stats["per_method"].values()) == 12 and sum(stats["rejected"].values()) == 0
    json.dumps(stats)


def test_rejected_rewrites_fall_back_to_the_constraint_step():
    parents = seed_records()
    children, stats = creator.evolve(parents, lambda ms: ["Sure! Here is a lovely poem about snow."] * len(ms),
                                     depth=4, seed=0, pool=parents)
    assert len(children) == 12, "chains must still grow when every LLM rewrite is rejected"
    assert all(c["method"] == "add_constraints" for c in children)
    assert stats["fallback"] == stats["rejected"]["answer"] == sum(1 for c in children if c["fallback_from"])
    assert stats["constraints_added"] + stats["constraints_tightened"] == 12
    for c in children:
        parent = next(p for p in parents + children if p["id"] == c["parent"])
        assert c["instruction_id_list"][:len(parent["instruction_id_list"])] == parent["instruction_id_list"]
        assert c["kwargs"] != parent["kwargs"], "a constraint step must add or tighten something"


def test_breadth_only_gets_no_fallback_and_shorter_chains():
    parents = seed_records()
    outputs = iter(["Write a haiku about a fox who runs a small post office."] + [None] * 100)
    children, stats = creator.evolve(parents, lambda ms: [next(outputs) for _ in ms], depth=3, kinds="breadth",
                                     seed=0)
    assert len(children) == 1 and children[0]["method"] in creator.methods_for("breadth")
    assert stats["fallback"] == 0 and stats["rejected"]["failed"] == 8


def test_evolve_without_verifiable_rewards_rewrites_whole_prompts():
    parents = seed_records()
    log = []
    children, stats = creator.evolve(parents, numbered_completer(log), depth=2, seed=0, verifiable=False)
    assert len(children) == 6 and all(c["instruction_id_list"] == [] for c in children)
    assert any("Leave out commas completely" in m for m in log), "without rules the creator sees the whole prompt"
    assert all(c["prompt"].startswith("Describe ") for c in children)


def test_evolve_is_deterministic_and_dedups_against_the_pool():
    parents = seed_records()
    a, _ = creator.evolve(parents, numbered_completer(), depth=3, seed=7)
    b, _ = creator.evolve(parents, numbered_completer(), depth=3, seed=7)
    assert a == b
    c, _ = creator.evolve(parents, numbered_completer(), depth=3, seed=8)
    assert [x["method"] for x in a] != [x["method"] for x in c]
    # a creator that returns the same request every time: the first is kept, the copies are rejected
    children, stats = creator.evolve(parents[1:2], lambda ms: ["Why do maple leaves turn red in October?"] * len(ms),
                                     depth=3, kinds="breadth", seed=0)
    assert len(children) == 1 and stats["rejected"]["duplicate"] + stats["rejected"]["copy"] == 2
    with pytest.raises(ValueError, match="same parent id"):
        creator.evolve(parents + parents[:1], numbered_completer())


def test_rule_sentences_in_rewrites_are_dropped():
    parents = seed_records()[1:2]
    children, stats = creator.evolve(
        parents, lambda ms: ["Why do maple leaves turn red in October? Answer in all capital letters."] * len(ms),
        depth=1, kinds="breadth", seed=0)
    assert children[0]["task"] == "Why do maple leaves turn red in October?"
    assert "capital" not in children[0]["prompt"] and stats["rule_sentences_dropped"] == 1


# ------------------------------------------------------------------------------------------------ pairs and mix

def test_make_pairs_best_worst_and_sppo_win_probabilities():
    prompts = seed_records()
    samples = [{"prompt_id": "s1", "responses": ["a", "b", "c"], "rewards": [0.5, 1.0, 0.0], "info": 1.0},
               {"prompt_id": "s2", "responses": ["a", "b"], "rewards": [0.5, 0.5], "info": 0.0},
               {"prompt_id": "s3", "responses": ["x", "y", "z"], "rewards": [NAN, 1.0, 0.0], "info": 1.0}]
    pairs = creator.make_pairs(prompts, samples, source="original")
    assert [p["prompt_id"] for p in pairs] == ["s1", "s3"]
    p = pairs[0]
    assert (p["chosen"], p["rejected"], p["chosen_reward"], p["rejected_reward"]) == ("b", "c", 1.0, 0.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert p["p_chosen"] == pytest.approx((sig(0.5) + 0.5 + sig(1.0)) / 3)
    assert p["p_rejected"] == pytest.approx((sig(-0.5) + sig(-1.0) + 0.5) / 3)
    assert p["prompt"] == prompts[0]["prompt"] and p["source"] == "original"
    assert pairs[1]["p_chosen"] == pytest.approx((0.5 + sig(1.0)) / 2), "NaN-rewarded responses do not count"
    with pytest.raises(ValueError, match="no prompt record"):
        creator.make_pairs(prompts, [{"prompt_id": "zz", "responses": ["a"], "rewards": [1.0]}], "original")


def test_mix_fractions_and_top_up():
    ev = [{"prompt_id": f"e{i}"} for i in range(40)]
    og = [{"prompt_id": f"o{i}"} for i in range(30)]
    out = creator.mix(ev, og, seed=0)
    assert sum(p["source"] == "evolved" for p in out) == 40 and sum(p["source"] == "original" for p in out) == 10
    assert creator.mix(ev, og, seed=0) == out and creator.mix(ev, og, seed=1) != out
    out = creator.mix(ev, og, total=20, seed=0)
    assert sum(p["source"] == "evolved" for p in out) == 16 and len(out) == 20
    out = creator.mix(ev[:5], og, total=20, seed=0)  # evolved side short: topped up from the original pool
    assert sum(p["source"] == "evolved" for p in out) == 5 and len(out) == 20
    out = creator.mix(ev, og[:2], total=20, seed=0)  # original side short: topped up from evolved
    assert sum(p["source"] == "original" for p in out) == 2 and len(out) == 20
    assert len(creator.mix([], og, seed=0)) == 30, "no evolved pairs: train on the original ones"
    assert len({p["prompt_id"] for p in creator.mix(ev, og, total=70, seed=3)}) == 70


def test_report_lineage_counts_and_chains():
    parents = seed_records()
    kids1, _ = creator.evolve(parents, numbered_completer(), depth=2, seed=0, iteration=1, pool=parents)
    kids2, _ = creator.evolve(kids1[:1], numbered_completer(), depth=2, seed=0, iteration=2, pool=parents + kids1)
    lineage = report.report_lineage(parents + kids1 + kids2, examples=2)
    assert lineage["evolved"] == 8 and lineage["original"] == 3
    assert lineage["per_iteration"] == {1: 6, 2: 2} and sum(lineage["per_method"].values()) == 8
    assert lineage["roots"] == 3 and len(lineage["examples"]) == 2
    longest = lineage["examples"][0]
    assert len(longest) == 4 and longest[0]["method"] is None and [x["iteration"] for x in longest] == [0, 1, 2, 2]
    json.dumps(lineage)


# ------------------------------------------------------------------------------------------------ endpoint back-end

class _ChatHandler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 (the stdlib's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        message = body["messages"][0]["content"]
        _ChatHandler.seen.append((self.path, body["model"], message))
        topic = message.rsplit("\nRequest: ", 1)[1].removesuffix("\nNew request:")  # the request to rewrite
        if "rainbow" in topic:  # one request the server refuses: it must come back as a "failed" rewrite
            self.send_response(400)
            self.end_headers()
            return
        reply = {"choices": [{"message": {"role": "assistant",
                                          "content": f"New request: {topic[:-1]} and how it changes by night?"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_endpoint_backend_over_http():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        complete = creator.endpoint_completer(url, "creator-model", retries=0, timeout=10)
        parents = [{"id": "a", "prompt": "Describe a busy train station.", "instruction_id_list": [], "kwargs": []},
                   {"id": "b", "prompt": "Explain how a rainbow forms.", "instruction_id_list": [], "kwargs": []}]
        children, stats = creator.evolve(parents, complete, depth=1, kinds="breadth", seed=0, verifiable=False)
        assert [c["prompt"] for c in children] == ["Describe a busy train station and how it changes by night?"]
        assert stats["rejected"]["failed"] == 1 and stats["creator_calls"] == 2
        assert {path for path, _, _ in _ChatHandler.seen} == {"/v1/chat/completions"}
        assert {model for _, model, _ in _ChatHandler.seen} == {"creator-model"}
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------------------ local back-end

def test_local_completer_with_a_tiny_model(tiny_llama_dir):
    pytest.importorskip("generate")
    import model
    mdl, tok = model.load_model(str(tiny_llama_dir))
    complete = creator.local_completer(mdl, tok, max_new_tokens=6, temperature=1.0, seed=3)
    messages = [creator.render("deepen", "Explain how a rainbow forms."), creator.render("persona", "Describe a cat.")]
    first = complete(messages)
    assert len(first) == 2 and all(len(c) == 1 and isinstance(c[0], str) for c in first)
    again = creator.local_completer(mdl, tok, max_new_tokens=6, temperature=1.0, seed=3)
    assert again(messages) == first, "same seed, same call number: same rewrites"


def test_cli_prints_the_lineage_of_a_run(tmp_path, capsys):
    parents = seed_records()
    kids, _ = creator.evolve(parents, numbered_completer(), depth=2, seed=0, iteration=1, pool=parents)
    for folder, name, records in (("iter_0", "pool.jsonl", parents), ("iter_1", "evolved.jsonl", kids)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    report.main([str(tmp_path), "--lineage"])
    lineage = json.loads(capsys.readouterr().out)
    assert lineage["evolved"] == 6 and lineage["per_iteration"] == {"1": 6}
    with pytest.raises(FileNotFoundError, match="no iter_"):
        report.main([str(tmp_path / "missing"), "--lineage"])


# ------------------------------------------------------------------------------------------------ candidates

def test_templates_show_worked_examples_and_end_at_the_label():
    for name, method in creator.EVOLVE_METHODS.items():
        text = creator.render(name, "Describe a busy train station.")
        assert 1 <= len(method.examples) <= 2, name
        for request, rewrite in method.examples:
            assert f"Request: {request}\nNew request: {rewrite}\n\n" in text, name
        assert text.endswith("\nRequest: Describe a busy train station.\nNew request:"), name
        # the model's line ends at a stop string before it could start the next example
        assert any(f"{rewrite}{stop}" in text for stop in creator.STOP for _, rewrite in method.examples)
    # a rewrite that copies a worked example is rejected, however it is spaced or cased
    request, rewrite = creator.EVOLVE_METHODS["persona"].examples[0]
    examples = creator.EVOLVE_METHODS["persona"].examples[0]
    assert cleaning.clean_rewrite("Write a poem about a lighthouse.", rewrite.upper(), examples=examples)[1] == "example"
    assert cleaning.clean_rewrite("Write a poem about a lighthouse.", "Write a poem about a lighthouse keeper's "
                                 "last night on duty.", examples=examples)[1] == "ok"


def candidate_completer(per_message, log=None):
    """A fake completer returning, for the i-th message of a call, per_message(i, message): a list of candidates."""
    def complete(messages):
        if log is not None:
            log.append(len(messages))
        return [per_message(i, m) for i, m in enumerate(messages)]
    return complete


def test_the_first_passing_candidate_is_kept():
    parents = seed_records()
    answer = "Sure! Here is a lovely poem about snow."
    calls = []
    topics = iter(["a night market", "a chess club", "a glacier", "a bakery at dawn", "a moon base", "a river ferry",
                   "a snowed-in cabin", "a street musician", "a tiny robot"])

    def per_message(i, message):
        topic = next(topics)
        return [None, answer, f"Describe {topic} with its lanterns at a winter fair.",
                f"Why would anyone visit {topic} twice?"]

    children, stats = creator.evolve(parents, candidate_completer(per_message, calls), depth=3, kinds="breadth",
                                     seed=0, pool=parents)
    assert len(children) == 9 and stats["fallback"] == 0 and stats["written"] == 9
    assert all("with its lanterns" in c["task"] for c in children), "the third candidate is the first that passes"
    assert stats["creator_calls"] == 9 and stats["candidates"] == 36
    table = stats["creator_per_method"]
    assert sum(row["links"] for row in table.values()) == 9
    assert sum(row["candidates"] for row in table.values()) == 36
    assert sum(row["accepted"] for row in table.values()) == 9
    assert sum(row["passed"] for row in table.values()) == 18, "every candidate is checked, not only up to the first"
    assert sum(row["rejected"].get("failed", 0) for row in table.values()) == 9 == stats["rejected"]["failed"]
    assert sum(row["rejected"].get("answer", 0) for row in table.values()) == 9 == stats["rejected"]["answer"]
    for name, row in table.items():
        assert row["candidates"] == row["passed"] + sum(row["rejected"].values()), name
        assert row["accepted"] == stats["per_method"][name], name
    json.dumps(stats)


def test_the_constraint_step_only_when_every_candidate_fails():
    parents = seed_records()
    topics = iter(["a night market", "a chess club", "a glacier", "a bakery at dawn", "a moon base", "a river ferry"])

    # chain s1's candidates all fail (its task is the only one about a poem); the others' last candidate passes
    def per_message(i, message):
        if "poem" in message.rsplit("\nRequest: ", 1)[1]:
            return ["Sure! Here is a poem.", "", "A poem."]
        return ["Sure! Here is a poem.", "", f"Why do stars twinkle over {next(topics)} on a cold night?"]

    children, stats = creator.evolve(parents, candidate_completer(per_message), depth=2, seed=3, pool=parents)
    assert len(children) == 6
    for c in children:
        if c["method"] == "add_constraints" and c["fallback_from"]:
            assert c["root"] == "s1" and c["fallback_from"] in creator.EVOLVE_METHODS
    written = [c for c in children if c["method"] != "add_constraints"]
    assert stats["written"] == len(written) and all("stars twinkle" in c["task"] for c in written)
    assert stats["fallback"] == sum(1 for c in children if c["fallback_from"]) >= 1
    assert stats["written"] + stats["constraints_added"] + stats["constraints_tightened"] == 6
    table = stats["creator_per_method"]
    assert sum(row["links"] - row["accepted"] for row in table.values()) == stats["fallback"]
    assert stats["rejected"]["answer"] == stats["rejected"]["empty"] == stats["creator_calls"]
    assert stats["rejected"]["too_short"] == stats["fallback"]


def test_local_completer_samples_candidates_in_one_batch(tiny_llama_dir):
    import model as modeling
    mdl, tok = modeling.load_model(str(tiny_llama_dir))
    messages = [creator.render("deepen", "Explain how a rainbow forms."), creator.render("persona", "Describe a cat.")]
    complete = creator.local_completer(mdl, tok, max_new_tokens=6, temperature=1.0, seed=3, candidates=3)
    out = complete(messages)
    assert len(out) == 2 and all(len(c) == 3 and all(isinstance(t, str) for t in c) for c in out)
    assert not any(s in t for c in out for t in c for s in creator.STOP), "candidates are cut at the stop strings"
    with pytest.raises(ValueError, match="candidates"):
        creator.local_completer(mdl, tok, candidates=0)
