"""The constraint catalogue the creator draws from: which verifiable rules can live together in one prompt, how to
add one or tighten one, and a prompt as its task plus one sentence per rule (instructions.py checks them).

    compatible(ids, kwargs)                          True when one answer can meet them all (as far as these rules know)
    constraint_step(task, ids, kwargs, rng)          add one compatible constraint or tighten one (the creator's step)
    split_task(record), compose_prompt(task, ids, kwargs)   a prompt as its task plus constraint sentences, and back
    drop_rule_sentences(text)                        text without the sentences that read like answer-format rules
"""
import re

import numpy as np

import instructions

MAX_CONSTRAINTS = 4
# Never added in code and, when a prompt already has one, nothing is added beside it: each of them fixes the whole
# shape of the answer (a JSON object, one of three fixed sentences, two answers, the prompt repeated first).
EXCLUSIVE_IDS = frozenset({"detectable_format:json_format", "detectable_format:constrained_response",
                           "combination:two_responses", "combination:repeat_prompt"})
_CONFLICT_GROUPS = (
    {"change_case:english_lowercase", "change_case:english_capital", "change_case:capital_word_frequency"},
    {"length_constraints:number_paragraphs", "length_constraints:nth_paragraph_first_word",
     "detectable_format:multiple_sections"},
    {"length_constraints:number_words", "length_constraints:number_sentences"},
    {"startend:end_checker", "detectable_content:postscript"},
    {"language:response_language", "change_case:english_lowercase", "change_case:english_capital"},  # English only
)
_END_PHRASES = ("Hope this helps.", "That is all for now.", "Thanks for reading.", "Let me know if you have questions.")
_LETTERS = "eatonsr"
_GENERIC_WORDS = ("light", "journey", "window", "garden", "promise", "quiet", "river", "morning")
_STOPWORDS = frozenset(
    "about above after again against also among and another answer any are around because been before being below "
    "between both but can could does doing down during each even every explain few for from give have having her "
    "here hers him his how into its itself just like little make many more most much must need only other our out "
    "over own please reply response same she short should some such tell than that the their them then there these "
    "they this those through too under until very want what when where which while who whom why will with within "
    "would write your yours describe story poem haiku limerick something someone things thing using used".split())


def content_words(text: str) -> list[str]:
    """Lower-case words of four or more letters that are not stop words, unique, in order of appearance."""
    seen = []
    for w in re.findall(r"[A-Za-z]{4,}", text):
        w = w.lower()
        if w not in _STOPWORDS and w not in seen:
            seen.append(w)
    return seen


def _required_strings(ids: list[str], kwargs: list[dict]) -> list[str]:
    out = []
    for iid, kw in zip(ids, kwargs):
        out += list(kw.get("keywords") or []) + [kw[k] for k in ("keyword", "end_phrase", "first_word") if k in kw]
    return out


def compatible(ids: list[str], kwargs: list[dict]) -> bool:
    """True when a set of constraints can all be met by one answer (as far as these rules know)."""
    if len(set(ids)) != len(ids):
        return False
    if len(ids) > 1 and EXCLUSIVE_IDS & set(ids):
        return False
    if any(len(group & set(ids)) > 1 for group in _CONFLICT_GROUPS):
        return False
    required = _required_strings(ids, kwargs)
    if "punctuation:no_comma" in ids and any("," in s for s in required):
        return False
    forbidden = {w.lower() for kw in kwargs for w in kw.get("forbidden_words") or []}
    required_words = {w.lower() for s in required for w in re.findall(r"\w+", s)}
    return not forbidden & required_words


def _tightened(iid: str, kw: dict, task: str, ids: list[str], kwargs: list[dict]) -> dict | None:
    """A strictly harder version of one constraint's kwargs, or None when it has none (or is at its bound)."""
    kw = dict(kw)
    less = kw.get("relation", kw.get("let_relation", kw.get("capital_relation"))) == "less than"
    if iid == "length_constraints:number_words":
        n = kw["num_words"]
        new = max(20, int(n * 0.75)) if less else n + max(10, n // 4)
        ok = new < n if less else new <= 400
        return {**kw, "num_words": new} if ok else None
    if iid == "length_constraints:number_sentences":
        n = kw["num_sentences"]
        return ({**kw, "num_sentences": n - 1} if n - 1 >= 2 else None) if less else (
            {**kw, "num_sentences": n + 1} if n + 1 <= 12 else None)
    bumps = {"length_constraints:number_paragraphs": ("num_paragraphs", 5),
             "detectable_format:number_bullet_lists": ("num_bullets", 7),
             "detectable_format:number_highlighted_sections": ("num_highlights", 5),
             "detectable_content:number_placeholders": ("num_placeholders", 5),
             "detectable_format:multiple_sections": ("num_sections", 5)}
    if iid in bumps:
        key, top = bumps[iid]
        return {**kw, key: kw[key] + 1} if kw[key] + 1 <= top else None
    if iid == "keywords:frequency":
        n = kw["frequency"]
        return ({**kw, "frequency": n - 1} if n - 1 >= 2 else None) if less else (
            {**kw, "frequency": n + 1} if n + 1 <= 6 else None)
    if iid == "keywords:letter_frequency":
        n = kw["let_frequency"]
        return ({**kw, "let_frequency": n - 2} if n - 2 >= 3 else None) if less else (
            {**kw, "let_frequency": n + 3} if n + 3 <= 30 else None)
    if iid == "change_case:capital_word_frequency":
        n = kw["capital_frequency"]
        return ({**kw, "capital_frequency": n - 1} if n - 1 >= 2 else None) if less else (
            {**kw, "capital_frequency": n + 1} if n + 1 <= 10 else None)
    if iid in ("keywords:existence", "keywords:forbidden_words"):
        key = "keywords" if iid == "keywords:existence" else "forbidden_words"
        if len(kw[key]) >= 4:
            return None
        taken = {w.lower() for s in _required_strings(ids, kwargs) for w in re.findall(r"\w+", s)}
        taken |= {w.lower() for k in kwargs for w in k.get("forbidden_words") or []}
        words = [w for w in content_words(task) + list(_GENERIC_WORDS) if w not in taken]
        # A forbidden word should be one the answer would naturally use: only the task's own words qualify.
        if key == "forbidden_words":
            words = [w for w in content_words(task) if w not in taken]
        return {**kw, key: kw[key] + [words[0]]} if words else None
    return None


def _addable(task: str, ids: list[str], kwargs: list[dict], rng: np.random.Generator) -> list[tuple[str, dict]]:
    """New constraints that suit a short answer and conflict with none of (ids, kwargs); parameters drawn by rng."""
    words = [w for w in content_words(task)
             if w not in {x.lower() for s in _required_strings(ids, kwargs) for x in re.findall(r"\w+", s)}]

    def pick(options):
        return options[int(rng.integers(len(options)))]

    candidates = [
        ("punctuation:no_comma", {}),
        ("change_case:english_lowercase", {}),
        ("change_case:english_capital", {}),
        ("detectable_format:title", {}),
        ("startend:quotation", {}),
        ("startend:end_checker", {"end_phrase": pick(_END_PHRASES)}),
        ("detectable_content:postscript", {"postscript_marker": pick(("P.S.", "P.P.S"))}),
        ("length_constraints:number_words", {"relation": "less than", "num_words": int(pick((60, 80, 100, 120)))}),
        ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": int(pick((4, 5, 6)))}),
        ("length_constraints:number_paragraphs", {"num_paragraphs": int(pick((2, 3)))}),
        ("detectable_format:number_bullet_lists", {"num_bullets": int(pick((2, 3, 4)))}),
        ("detectable_format:number_highlighted_sections", {"num_highlights": int(pick((1, 2, 3)))}),
        ("detectable_content:number_placeholders", {"num_placeholders": int(pick((1, 2)))}),
        ("keywords:existence", {"keywords": [pick(words or list(_GENERIC_WORDS))]}),
        ("keywords:frequency", {"keyword": pick(words or list(_GENERIC_WORDS)), "relation": "at least",
                                "frequency": 2}),
        ("keywords:letter_frequency", {"letter": pick(_LETTERS), "let_relation": "at least",
                                       "let_frequency": int(pick((3, 5, 8)))}),
    ]
    if words:
        candidates.append(("keywords:forbidden_words", {"forbidden_words": [pick(words)]}))
    return [(i, k) for i, k in candidates if i not in ids and compatible(ids + [i], kwargs + [k])]


def constraint_step(task: str, ids: list[str], kwargs: list[dict], rng: np.random.Generator,
                    max_constraints: int = MAX_CONSTRAINTS, tighten: bool = True
                    ) -> tuple[list[str], list[dict], str] | None:
    """Add one verifiable constraint or tighten one: (new ids, new kwargs, "added <id>" / "tightened <id>"),
    or None when neither is possible. Adding and tightening are equally likely when both are possible; the new
    set is always compatible(), never longer than max_constraints, and a full set keeps a tightenable constraint."""
    tightenings = []
    for j, (iid, kw) in enumerate(zip(ids, kwargs) if tighten else ()):
        new = _tightened(iid, kw, task, ids, kwargs)
        if new is not None and compatible(ids, kwargs[:j] + [new] + kwargs[j + 1:]):
            tightenings.append((j, new))
    additions = _addable(task, ids, kwargs, rng) if len(ids) < max_constraints else []
    if len(ids) + 1 >= max_constraints and not tightenings:
        # The set is about to be full: keep something in it that can still be tightened, so later links of the
        # chain (and later iterations) still have a constraint step to take.
        additions = [(i, k) for i, k in additions if _tightened(i, k, task, ids + [i], kwargs + [k]) is not None]
    if not tightenings and not additions:
        return None
    if additions and (not tightenings or rng.random() < 0.5):
        iid, kw = additions[int(rng.integers(len(additions)))]
        return ids + [iid], kwargs + [kw], f"added {iid}"
    j, new = tightenings[int(rng.integers(len(tightenings)))]
    return ids, kwargs[:j] + [new] + kwargs[j + 1:], f"tightened {ids[j]}"


# Sentences that read like an answer-format rule rather than the task itself (used to split seed prompts and to drop
# rules a creator LLM slipped into a rewritten task: the constraints are owned by code).
_NUM = r"(?:\d+|one|a single|two|three|four|five|six|seven|eight|nine|ten|twelve|fifteen|twenty|thirty|fifty)"
_RULE_CUES = re.compile(
    r"\byour (?:entire |whole |full )?(?:response|answer|reply|output)\b"
    rf"|\b(?:less|fewer|more) than {_NUM}\b|\bat (?:least|most) {_NUM}\b|\bexactly {_NUM}\b"
    rf"|\b{_NUM} or (?:more|fewer|less)\b"
    rf"|\b{_NUM} (?:words|sentences?|paragraphs?|bullet|bullets|sections|placeholders?|times)\b|\bunder {_NUM} words\b"
    r"|\b(?:lower ?case|upper ?case|capital letters|capitali[sz]ed|all caps|capitals)\b|\bcommas?\b|<<|>>"
    r"|\bjson\b|\bbullet|\bhighlight|\bplaceholders?\b|\bp\.\s?p?\.?\s?s\b|\bpostscript\b|\*{3,}|\basterisks?\b"
    r"|\bquotation marks?\b|\bdouble quotes?\b|\b(?:word|words|letter|keyword|keywords)\s+[\"\u201c]"
    r"|\bkeywords?\b|\bword for word\b|\brestat|\brepeat (?:the|my) request\b|\bmarkdown\b|\bsquare brackets\b"
    r"|\btitle\b|\b(?:two|2) different (?:responses|versions|answers)\b|\bemphasis\b|\bmy answer is\b"
    r"|\b(?:first|second|third|last|\d+(?:st|nd|rd|th)) paragraph\b"
    r"|\b(?:end|finish|close|start|begin) (?:your|with|by)\b|\bexact (?:phrases?|words)\b", re.I)


def split_task(record: dict, verifiable: bool = True) -> str | None:
    """The task part of a prompt (the request without its constraint sentences), or None when none can be found.

    A record's own "task" field wins. Without verifiable constraints the task is the whole prompt. Otherwise the
    task is the prompt's sentences that match none of the rule cues, in order (constraint sentences may come before,
    between or after the task sentences, as in IFEval).
    """
    if isinstance(record.get("task"), str) and record["task"].strip():
        return record["task"].strip()
    text = record["prompt"].strip()
    if not verifiable or not record.get("instruction_id_list"):
        return text
    task = [s for s in instructions.split_sentences(text) if not _RULE_CUES.search(s)]
    return " ".join(task) if task else None


def drop_rule_sentences(text: str) -> str:
    """text without the sentences that read like answer-format rules."""
    return " ".join(s for s in instructions.split_sentences(text) if not _RULE_CUES.search(s)).strip()


def compose_prompt(task: str, ids: list[str], kwargs: list[dict]) -> str:
    """The prompt a user would send: the task, then one sentence per constraint."""
    task = task.strip()
    if task and task[-1] not in ".!?:;\"')]":
        task += "."
    return " ".join([task] + [instructions.describe_instruction(i, k) for i, k in zip(ids, kwargs)])

