"""Checks on the seed and held-out prompt files the project ships (data/*.jsonl).

Run: .venv/bin/python -m pytest tests/test_data.py -x -q
The format data/README.md describes, IFEval argument names, no overlap between the two files, constraints that a
~90-word answer can meet, no self-contradicting constraint pairs, every record accepted by instructions.validate_record.
"""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SEED = DATA / "seed_prompts.jsonl"
HELDOUT = DATA / "heldout_prompts.jsonl"
SHARED_DATA = ROOT.parent / "shared" / "data"

# The ids the demo prompts may use, with the exact IFEval argument names each one takes.
ARGS = {
    "keywords:existence": {"keywords"},
    "keywords:frequency": {"keyword", "frequency", "relation"},
    "keywords:forbidden_words": {"forbidden_words"},
    "keywords:letter_frequency": {"letter", "let_frequency", "let_relation"},
    "length_constraints:number_sentences": {"num_sentences", "relation"},
    "length_constraints:number_paragraphs": {"num_paragraphs"},
    "length_constraints:number_words": {"num_words", "relation"},
    "length_constraints:nth_paragraph_first_word": {"num_paragraphs", "nth_paragraph", "first_word"},
    "detectable_content:number_placeholders": {"num_placeholders"},
    "detectable_content:postscript": {"postscript_marker"},
    "detectable_format:number_bullet_lists": {"num_bullets"},
    "detectable_format:constrained_response": set(),
    "detectable_format:number_highlighted_sections": {"num_highlights"},
    "detectable_format:multiple_sections": {"section_spliter", "num_sections"},
    "detectable_format:json_format": set(),
    "detectable_format:title": set(),
    "combination:two_responses": set(),
    "combination:repeat_prompt": {"prompt_to_repeat"},
    "startend:end_checker": {"end_phrase"},
    "startend:quotation": set(),
    "change_case:capital_word_frequency": {"capital_frequency", "capital_relation"},
    "change_case:english_capital": set(),
    "change_case:english_lowercase": set(),
    "punctuation:no_comma": set(),
}
RELATIONS = {"less than", "at least"}
FIELDS = {"id": str, "prompt": str, "instruction_id_list": list, "kwargs": list, "iteration": int}

# Pairs no response can satisfy together (or only by gaming one of them), given IFEval's checkers.
CONFLICTS = {frozenset(p) for p in [
    ("change_case:english_capital", "change_case:english_lowercase"),
    ("change_case:capital_word_frequency", "change_case:english_capital"),
    ("change_case:capital_word_frequency", "change_case:english_lowercase"),
    ("detectable_format:constrained_response", "change_case:english_lowercase"),  # the phrase is case-sensitive
    ("detectable_format:constrained_response", "change_case:english_capital"),
    ("detectable_format:multiple_sections", "change_case:english_lowercase"),     # so is the section splitter
    ("detectable_format:multiple_sections", "change_case:english_capital"),
    ("detectable_content:postscript", "change_case:english_lowercase"),
    ("detectable_content:postscript", "startend:end_checker"),
    ("startend:quotation", "startend:end_checker"),
    ("startend:quotation", "combination:repeat_prompt"),
    ("startend:quotation", "combination:two_responses"),
    ("combination:repeat_prompt", "combination:two_responses"),
    ("combination:repeat_prompt", "change_case:english_lowercase"),
    ("combination:repeat_prompt", "change_case:english_capital"),
    ("combination:repeat_prompt", "keywords:forbidden_words"),  # the repeated request names the forbidden word
    ("combination:two_responses", "startend:end_checker"),
    ("combination:two_responses", "detectable_format:number_bullet_lists"),  # bullets of both answers add up
    ("combination:two_responses", "length_constraints:number_paragraphs"),
    ("combination:two_responses", "length_constraints:nth_paragraph_first_word"),
    ("combination:two_responses", "detectable_format:multiple_sections"),
    ("length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word"),
    ("length_constraints:number_paragraphs", "detectable_format:multiple_sections"),
    ("length_constraints:nth_paragraph_first_word", "detectable_format:title"),  # a title line is a paragraph
    ("length_constraints:nth_paragraph_first_word", "detectable_content:postscript"),
    ("length_constraints:nth_paragraph_first_word", "detectable_format:multiple_sections"),
] + [("detectable_format:json_format", other) for other in [
    "detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections",
    "detectable_format:title", "detectable_format:multiple_sections", "detectable_format:constrained_response",
    "length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word",
    "detectable_content:postscript", "startend:end_checker", "startend:quotation", "combination:two_responses",
    "combination:repeat_prompt", "punctuation:no_comma", "length_constraints:number_sentences"]]}


def _read(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            assert line.strip(), f"{path.name}:{n}: blank line"
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise AssertionError(f"{path.name}:{n}: not JSON ({e})") from e
    return records


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _all() -> list[tuple[str, dict]]:
    return [("seed", r) for r in _read(SEED)] + [("heldout", r) for r in _read(HELDOUT)]


def _pairs(record: dict):
    return zip(record["instruction_id_list"], record["kwargs"])


@pytest.fixture(scope="module")
def records() -> list[tuple[str, dict]]:
    return _all()


def test_counts_and_id_prefixes(records):
    seed = [r for which, r in records if which == "seed"]
    held = [r for which, r in records if which == "heldout"]
    assert len(seed) >= 160, f"seed_prompts.jsonl has {len(seed)} records, want >= 160"
    assert len(held) >= 64, f"heldout_prompts.jsonl has {len(held)} records, want >= 64"
    for which, r in records:
        assert re.fullmatch(rf"{which}-\d{{4}}", r["id"]), f"{which}: bad id {r['id']!r}"


def test_ids_unique_across_files(records):
    ids = [r["id"] for _, r in records]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, f"duplicate ids: {sorted(dupes)}"


def test_no_prompt_shared_between_or_within_files(records):
    seen: dict[str, str] = {}
    for _, r in records:
        key = _norm(r["prompt"])
        assert key not in seen, f"{r['id']} repeats the prompt of {seen[key]}"
        seen[key] = r["id"]
    # the task text (before the first constraint sentence) must differ too, not only the constraint wording
    seed_tasks = {_norm(r["prompt"]).split(". ")[0] for w, r in records if w == "seed"}
    for which, r in records:
        if which == "heldout":
            assert _norm(r["prompt"]).split(". ")[0] not in seed_tasks, f"{r['id']}: task text also in the seed set"


def test_record_fields_and_types(records):
    for _, r in records:
        for name, typ in FIELDS.items():
            assert isinstance(r.get(name), typ) and not isinstance(r.get(name), bool), \
                f"{r.get('id')}: field {name!r} missing or not {typ.__name__}"
        assert r["prompt"].strip(), f"{r['id']}: empty prompt"
        assert "parent" in r and r["parent"] is None, f"{r['id']}: seed prompts have parent null"
        assert "method" in r and r["method"] is None, f"{r['id']}: seed prompts have method null"
        assert r["iteration"] == 0, f"{r['id']}: seed prompts have iteration 0"
        assert 1 <= len(r["instruction_id_list"]) <= 3, f"{r['id']}: wants 1-3 constraints"
        assert len(r["instruction_id_list"]) == len(r["kwargs"]), f"{r['id']}: ids and kwargs differ in length"
        assert len(set(r["instruction_id_list"])) == len(r["instruction_id_list"]), f"{r['id']}: repeated id"
        assert all(isinstance(k, dict) for k in r["kwargs"]), f"{r['id']}: kwargs entries must be objects"


def test_ids_allowed_and_kwargs_use_ifeval_names(records):
    for _, r in records:
        for iid, kw in _pairs(r):
            assert iid in ARGS, f"{r['id']}: instruction id {iid!r} is not allowed"
            assert set(kw) == ARGS[iid], f"{r['id']}: {iid} kwargs {sorted(kw)} != {sorted(ARGS[iid])}"
            for rel in ("relation", "let_relation", "capital_relation"):
                if rel in kw:
                    assert kw[rel] in RELATIONS, f"{r['id']}: {iid} {rel}={kw[rel]!r}"


def test_every_allowed_id_is_used_in_both_files(records):
    for which in ("seed", "heldout"):
        used = {i for w, r in records if w == which for i in r["instruction_id_list"]}
        assert used == set(ARGS), f"{which}: ids never used: {sorted(set(ARGS) - used)}"


def test_constraint_mix(records):
    # about half one constraint, a third two, the rest three (as the demo's seed set is meant to be)
    n = [len(r["instruction_id_list"]) for _, r in records]
    share = {k: n.count(k) / len(n) for k in (1, 2, 3)}
    assert 0.4 <= share[1] <= 0.6 and 0.25 <= share[2] <= 0.42 and 0.1 <= share[3] <= 0.25, f"mix {share}"


def test_constraints_feasible_for_short_answers(records):
    # the demo solver writes at most ~128 new tokens (~90 words); every constraint must fit in ~80 words
    for _, r in records:
        rid = r["id"]
        for iid, kw in _pairs(r):
            if iid == "length_constraints:number_words":
                lo, hi = (20, 100) if kw["relation"] == "less than" else (10, 60)
                assert lo <= kw["num_words"] <= hi, f"{rid}: {iid} {kw}"
            elif iid == "length_constraints:number_sentences":
                lo, hi = (2, 6) if kw["relation"] == "less than" else (1, 5)
                assert lo <= kw["num_sentences"] <= hi, f"{rid}: {iid} {kw}"
            elif iid == "length_constraints:number_paragraphs":
                assert 2 <= kw["num_paragraphs"] <= 3, f"{rid}: {iid} {kw}"
            elif iid == "length_constraints:nth_paragraph_first_word":
                assert 2 <= kw["num_paragraphs"] <= 3 and 1 <= kw["nth_paragraph"] <= kw["num_paragraphs"], \
                    f"{rid}: {iid} {kw}"
                assert re.fullmatch(r"[a-z]+", kw["first_word"]), f"{rid}: first_word must be one lowercase word"
            elif iid == "detectable_format:number_bullet_lists":
                assert 1 <= kw["num_bullets"] <= 4, f"{rid}: {iid} {kw}"
            elif iid == "detectable_format:number_highlighted_sections":
                assert 1 <= kw["num_highlights"] <= 3, f"{rid}: {iid} {kw}"
            elif iid == "detectable_content:number_placeholders":
                assert 1 <= kw["num_placeholders"] <= 2, f"{rid}: {iid} {kw}"
            elif iid == "detectable_format:multiple_sections":
                assert 2 <= kw["num_sections"] <= 3, f"{rid}: {iid} {kw}"
                assert re.fullmatch(r"[A-Za-z]+", kw["section_spliter"]), f"{rid}: {iid} {kw}"
            elif iid == "keywords:frequency":
                ok = kw["frequency"] <= 3 if kw["relation"] == "at least" else kw["frequency"] >= 2
                assert ok and re.fullmatch(r"[a-z]+", kw["keyword"]), f"{rid}: {iid} {kw}"
            elif iid == "keywords:letter_frequency":
                ok = kw["let_frequency"] <= 12 if kw["let_relation"] == "at least" else kw["let_frequency"] >= 2
                assert ok and re.fullmatch(r"[a-z]", kw["letter"]), f"{rid}: {iid} {kw}"
            elif iid == "change_case:capital_word_frequency":
                ok = kw["capital_frequency"] <= 3 if kw["capital_relation"] == "at least" else kw["capital_frequency"] >= 2
                assert ok, f"{rid}: {iid} {kw}"
            elif iid == "startend:end_checker":
                assert 1 <= len(kw["end_phrase"].split()) <= 8, f"{rid}: end phrase too long"
            elif iid == "combination:repeat_prompt":
                assert len(kw["prompt_to_repeat"].split()) <= 45, f"{rid}: the request to repeat is too long"
            elif iid in ("keywords:existence", "keywords:forbidden_words"):
                words = kw["keywords" if iid == "keywords:existence" else "forbidden_words"]
                assert 1 <= len(words) <= 2 and all(isinstance(w, str) and w for w in words), f"{rid}: {iid} {kw}"
            elif iid == "detectable_content:postscript":
                assert kw["postscript_marker"] in ("P.S.", "P.P.S"), f"{rid}: {iid} {kw}"


def test_no_contradictory_constraints(records):
    for _, r in records:
        ids = r["instruction_id_list"]
        kws = dict(_pairs(r))
        for a in ids:
            for b in ids:
                assert frozenset((a, b)) not in CONFLICTS or a == b, f"{r['id']}: {a} contradicts {b}"
        forbidden = {w.lower() for w in kws.get("keywords:forbidden_words", {}).get("forbidden_words", [])}
        wanted = {w.lower() for w in kws.get("keywords:existence", {}).get("keywords", [])}
        if "keywords:frequency" in kws and kws["keywords:frequency"]["relation"] == "at least":
            wanted.add(kws["keywords:frequency"]["keyword"])
        assert not forbidden & wanted, f"{r['id']}: a word is both required and forbidden"
        if "punctuation:no_comma" in kws:
            for iid, key in (("startend:end_checker", "end_phrase"), ("combination:repeat_prompt", "prompt_to_repeat")):
                assert "," not in kws.get(iid, {}).get(key, ""), f"{r['id']}: {iid} text has a comma, no_comma too"
        if "change_case:english_lowercase" in kws:
            assert kws.get("startend:end_checker", {}).get("end_phrase", "").islower() or \
                "startend:end_checker" not in kws, f"{r['id']}: end phrase has capitals but lowercase is asked"


def test_constraints_are_stated_in_the_prompt(records):
    # IFEval style: the prompt itself asks for each constraint in words, so its arguments appear in the text
    numbers = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

    def stated(n: int, text: str) -> bool:
        words = {1: ("one", "once", "single")}.get(n, (numbers.get(n, "#"),))
        return bool(re.search(rf"\b{n}\b", text)) or any(re.search(rf"\b{w}\b", text.lower()) for w in words)

    for _, r in records:
        text, low = r["prompt"], r["prompt"].lower()
        for iid, kw in _pairs(r):
            # "less than 3 sentences" may be asked as "at most two sentences"
            less = "less than" in (kw.get("relation"), kw.get("let_relation"), kw.get("capital_relation"))
            for key, value in kw.items():
                if key in ("relation", "let_relation", "capital_relation"):
                    continue
                if key == "prompt_to_repeat":
                    assert text.startswith(value) and len(text) > len(value), f"{r['id']}: request to repeat"
                elif key == "nth_paragraph":
                    assert ("first", "second", "third")[value - 1] in low, f"{r['id']}: {iid} ordinal"
                elif isinstance(value, int):
                    assert stated(value, text) or (less and stated(value - 1, text)), \
                        f"{r['id']}: {iid} number {value} not stated"
                else:
                    for v in value if isinstance(value, list) else [value]:
                        assert v.lower() in low, f"{r['id']}: {iid} {key}={v!r} not stated in the prompt"


def test_no_text_copied_from_public_prompt_sets(records):
    # the project's prompts are its own: none may equal a prompt of IFEval or the self-instruct seed tasks
    files = [SHARED_DATA / "ifeval_input_data.jsonl", SHARED_DATA / "self_instruct_seed_tasks.jsonl"]
    if not all(f.exists() for f in files):
        pytest.skip("../shared/data is not present")
    theirs = set()
    for f in files:
        for r in _read(f):
            theirs.add(_norm(r.get("prompt") or r.get("instruction", "")))
    for _, r in records:
        assert _norm(r["prompt"]) not in theirs, f"{r['id']}: prompt equals a public dataset prompt"
        assert _norm(r["prompt"]).split(". ")[0] + "." not in theirs, f"{r['id']}: task text equals a public prompt"


def test_records_pass_reward_validate_record(records):
    import instructions

    missing = set(ARGS) - set(instructions.SUPPORTED_IDS)
    assert not missing, f"instructions.SUPPORTED_IDS lacks {sorted(missing)}"
    for which, r in records:
        instructions.validate_record(r, where=f"{which}_prompts.jsonl {r['id']}")
