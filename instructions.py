"""Verifiable instructions in IFEval's format: the checkers, the sentence that asks for each, and the constraint
catalogue the creator draws from. A record is {"prompt", "instruction_id_list", "kwargs"}, IFEval's input format.

    check_instructions(record, response) -> [bool]   one per instruction, strict (loose=True: IFEval's loose)
    validate_record(record, where)                    one-line ValueError unless every instruction can be checked
    describe_instruction(id, kwargs) -> str           the sentence a user would write to ask for an instruction
    split_task(record), compose_prompt(task, ids, kwargs)   a prompt as its task plus constraint sentences, and back
    constraint_step(task, ids, kwargs, rng)           add one compatible constraint or tighten one (the creator's step)

SUPPORTED_IDS: 24 of IFEval's 25 (language:response_language needs a language detector and is refused). Differences
from the official checkers (google-research/instruction_following_eval):
  - kwargs must be complete (the official code draws a missing one at random); None values count as absent.
  - keywords, forbidden words, section splitters and postscript markers match literally, not as regexes.
  - sentences come from a rule-based splitter (split_sentences), not nltk's punkt: . ! or ? (closing quotes or
    brackets included) before white space or the end, except after common abbreviations, single-letter initials
    and "1." list markers; newlines alone end no sentence; a tail with a letter or digit counts.
  - capital_word_frequency counts all-caps tokens of word_tokens (contractions split, as nltk.word_tokenize).
  - english_capital / english_lowercase check the case only (str.isupper / islower), not langdetect's language.
Like the official strict evaluation, an empty (whitespace-only) response follows no instruction.
"""
import json
import re
import string
from typing import Callable

import numpy as np

# ----------------------------------------------------------------------------------------------- text utilities

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs inc ltd co e.g i.e cf al fig approx capt lt col gen sgt mt dept est ph.d u.s"
    " a.m p.m jan feb mar apr jun jul aug sep sept oct nov dec".split())
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence splitter (see the module docstring for how it differs from nltk's punkt)."""
    sentences, start = [], 0
    for mark in _SENTENCE_END.finditer(text):
        if mark.group()[0] == "." and mark.group().count(".") == 1:
            before = text[start:mark.start()]
            last = re.search(r"(\S+)$", before)
            word = last.group(1).lower().lstrip("(\"'\u201c\u2018") if last else ""
            at_line_start = re.search(r"(^|\n)[ \t]*\S+$", before) is not None
            if (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())
                    or re.fullmatch(r"(?:[a-z]\.)+[a-z]", word) or (word.isdigit() and at_line_start)):
                continue  # a period that belongs to the word, not the sentence
        piece = text[start:mark.end()].strip()
        if re.search(r"\w", piece):
            sentences.append(piece)
        start = mark.end()
    tail = text[start:].strip()
    if re.search(r"\w", tail):
        sentences.append(tail)
    return sentences


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


_CONTRACTION = re.compile(r"(?i)^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")


def word_tokens(text: str) -> list[str]:
    """Whitespace tokens without surrounding punctuation, contractions split (DON'T -> DO, N'T)."""
    tokens = []
    for chunk in text.replace("\u2019", "'").split():
        core = chunk.strip(string.punctuation.replace("'", "") + "\u201c\u201d\u2018")
        core = core.strip("'") if core.count("'") != 1 else core
        if not core:
            continue
        parts = _CONTRACTION.match(core)
        tokens.extend(parts.groups() if parts else (core,))
    return tokens


def _compare(count: int, relation: str, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


def _relation_words(relation: str) -> str:
    return "fewer than" if relation == "less than" else "at least"


def _quoted_list(words: list[str], noun: str) -> str:
    quoted = [f'"{w}"' for w in words]
    if len(quoted) == 1:
        return f"the {noun} {quoted[0]}"
    return f"the {noun}s " + ", ".join(quoted[:-1]) + " and " + quoted[-1]


# ----------------------------------------------------------------------------------------------- the checkers
# Each checker takes (response, kwargs) and returns whether the response follows the instruction; semantics are
# those of the official IFEval checker of the same id unless the module docstring says otherwise.

def _keywords_existence(r: str, kw: dict) -> bool:
    return all(re.search(re.escape(k), r, flags=re.IGNORECASE) for k in kw["keywords"])


def _keywords_frequency(r: str, kw: dict) -> bool:
    count = len(re.findall(re.escape(kw["keyword"].strip()), r, flags=re.IGNORECASE))
    return _compare(count, kw["relation"], kw["frequency"])


def _forbidden_words(r: str, kw: dict) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", r, flags=re.IGNORECASE) for w in kw["forbidden_words"])


def _letter_frequency(r: str, kw: dict) -> bool:
    count = r.lower().count(kw["letter"].strip().lower())
    return _compare(count, kw["let_relation"], kw["let_frequency"])


def _number_sentences(r: str, kw: dict) -> bool:
    return _compare(count_sentences(r), kw["relation"], kw["num_sentences"])


def _number_paragraphs(r: str, kw: dict) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", r)
    count = len(paragraphs)
    for i, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if 0 < i < len(paragraphs) - 1:
                return False  # an empty paragraph between two dividers
            count -= 1
    return count == kw["num_paragraphs"]


def _number_words(r: str, kw: dict) -> bool:
    return _compare(count_words(r), kw["relation"], kw["num_words"])


def _nth_paragraph_first_word(r: str, kw: dict) -> bool:
    paragraphs = r.split("\n\n")
    count = sum(1 for p in paragraphs if p.strip())
    nth = kw["nth_paragraph"]
    # The official checker counts non-empty paragraphs but indexes the raw split: kept for identical scores.
    if nth > count or nth < 1:
        return False
    paragraph = paragraphs[nth - 1].strip()
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return count == kw["num_paragraphs"] and first == kw["first_word"].lower()


def _number_placeholders(r: str, kw: dict) -> bool:
    return len(re.findall(r"\[.*?\]", r)) >= kw["num_placeholders"]


def _postscript(r: str, kw: dict) -> bool:
    marker = kw["postscript_marker"].strip()
    if marker == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker == "P.S.":
        pattern = r"p\.\s?s\."
    else:
        pattern = re.escape(marker.lower())
    return re.search(pattern, r.lower()) is not None


def _number_bullet_lists(r: str, kw: dict) -> bool:
    stars = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _constrained_response(r: str, kw: dict) -> bool:
    return any(option in r.strip() for option in CONSTRAINED_OPTIONS)


def _number_highlighted_sections(r: str, kw: dict) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h[2:-2].strip()]
    return len(single) + len(double) >= kw["num_highlights"]


def _multiple_sections(r: str, kw: dict) -> bool:
    pattern = r"\s?" + re.escape(kw["section_spliter"].strip()) + r"\s?\d+\s?"
    return len(re.split(pattern, r)) - 1 >= kw["num_sections"]


def _json_format(r: str, kw: dict) -> bool:
    text = r.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):  # removed one after another, as the official checker does
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _title(r: str, kw: dict) -> bool:
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r))


def _two_responses(r: str, kw: dict) -> bool:
    parts = r.split("******")
    kept = []
    for i, part in enumerate(parts):
        if part.strip():
            kept.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(kept) == 2 and kept[0] != kept[1]


def _repeat_prompt(r: str, kw: dict) -> bool:
    return r.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


def _end_checker(r: str, kw: dict) -> bool:
    return r.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower())


def _quotation(r: str, kw: dict) -> bool:
    text = r.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def _capital_word_frequency(r: str, kw: dict) -> bool:
    count = sum(1 for t in word_tokens(r) if t.isupper())
    return _compare(count, kw["capital_relation"], kw["capital_frequency"])


def _english_capital(r: str, kw: dict) -> bool:
    return r.isupper()


def _english_lowercase(r: str, kw: dict) -> bool:
    return r.islower()


def _no_comma(r: str, kw: dict) -> bool:
    return "," not in r


# ----------------------------------------------------------------------------------------------- descriptions

def _describe_sections(kw: dict) -> str:
    s = kw["section_spliter"].strip()
    return (f"Your response must have {kw['num_sections']} sections. Mark the beginning of each section with "
            f"\"{s} X\", such as \"{s} 1\", \"{s} 2\".")


def _describe_nth(kw: dict) -> str:
    return (f"There should be exactly {kw['num_paragraphs']} paragraphs, separated from each other by a blank line "
            f"(two newlines). Paragraph {kw['nth_paragraph']} must start with the word \"{kw['first_word']}\".")


_DESCRIBE: dict[str, Callable[[dict], str]] = {
    "keywords:existence": lambda kw: f"Include {_quoted_list(kw['keywords'], 'keyword')} in your response.",
    "keywords:frequency": lambda kw: (f"In your response, the word \"{kw['keyword']}\" should appear "
                                      f"{_relation_words(kw['relation'])} {kw['frequency']} times."),
    "keywords:forbidden_words": lambda kw: (f"Do not include {_quoted_list(kw['forbidden_words'], 'word')}"
                                            " in your response."),
    "keywords:letter_frequency": lambda kw: (f"In your response, the letter \"{kw['letter']}\" should appear "
                                             f"{_relation_words(kw['let_relation'])} {kw['let_frequency']} times."),
    "length_constraints:number_sentences": lambda kw: (f"Your response should contain "
                                                       f"{_relation_words(kw['relation'])} {kw['num_sentences']} "
                                                       "sentences."),
    "length_constraints:number_paragraphs": lambda kw: (f"Your response should have exactly {kw['num_paragraphs']}"
                                                        " paragraphs, separated from each other by the markdown "
                                                        "divider ***."),
    "length_constraints:number_words": lambda kw: (f"Answer with {_relation_words(kw['relation'])} "
                                                   f"{kw['num_words']} words."),
    "length_constraints:nth_paragraph_first_word": _describe_nth,
    "detectable_content:number_placeholders": lambda kw: (f"Include at least {kw['num_placeholders']} placeholders "
                                                          "in square brackets, such as [address]."),
    "detectable_content:postscript": lambda kw: ("At the end of your response, add a postscript starting with "
                                                 f"{kw['postscript_marker'].strip().rstrip('.')}."),
    "detectable_format:number_bullet_lists": lambda kw: (f"Your answer must contain exactly {kw['num_bullets']} "
                                                         "bullet points, each on its own line starting with \"* \"."),
    "detectable_format:constrained_response": lambda kw: ("Answer with one of the following options: "
                                                          + ", ".join(f'"{o}"' for o in CONSTRAINED_OPTIONS)),
    "detectable_format:number_highlighted_sections": lambda kw: (f"Highlight at least {kw['num_highlights']} "
                                                                 "sections of your answer with markdown, for "
                                                                 "example *highlighted section*."),
    "detectable_format:multiple_sections": _describe_sections,
    "detectable_format:json_format": lambda kw: ("Wrap your entire output in JSON format; you may use markdown "
                                                 "code fences such as ```."),
    "detectable_format:title": lambda kw: ("Your answer must contain a title, wrapped in double angular brackets, "
                                           "such as <<poem of joy>>."),
    "combination:two_responses": lambda kw: ("Give two different responses, separated by six asterisk symbols: "
                                             "******. Do not use that separator anywhere else."),
    "combination:repeat_prompt": lambda kw: ("First repeat the request above word for word without change, then give"
                                             " your answer. Do not say anything before repeating the request, and do"
                                             " not repeat this sentence."),
    "startend:end_checker": lambda kw: (f"Finish your response with this exact phrase: {kw['end_phrase'].strip()} "
                                        "No other words should follow it."),
    "startend:quotation": lambda kw: "Wrap your entire response in double quotation marks.",
    "change_case:capital_word_frequency": lambda kw: ("In your response, words written entirely in capital letters "
                                                      f"should appear {_relation_words(kw['capital_relation'])} "
                                                      f"{kw['capital_frequency']} times."),
    "change_case:english_capital": lambda kw: ("Your entire response should be in English, and in all capital "
                                               "letters."),
    "change_case:english_lowercase": lambda kw: ("Your entire response should be in English, and in all lowercase "
                                                 "letters. No capital letters are allowed."),
    "punctuation:no_comma": lambda kw: "Do not use any commas in your entire response.",
}

# id -> (checker, {kwarg: type}); the kwarg names are IFEval's own.
_RULES: dict[str, tuple[Callable[[str, dict], bool], dict[str, type]]] = {
    "keywords:existence": (_keywords_existence, {"keywords": list}),
    "keywords:frequency": (_keywords_frequency, {"keyword": str, "frequency": int, "relation": str}),
    "keywords:forbidden_words": (_forbidden_words, {"forbidden_words": list}),
    "keywords:letter_frequency": (_letter_frequency, {"letter": str, "let_frequency": int, "let_relation": str}),
    "length_constraints:number_sentences": (_number_sentences, {"num_sentences": int, "relation": str}),
    "length_constraints:number_paragraphs": (_number_paragraphs, {"num_paragraphs": int}),
    "length_constraints:number_words": (_number_words, {"num_words": int, "relation": str}),
    "length_constraints:nth_paragraph_first_word": (_nth_paragraph_first_word,
                                                    {"num_paragraphs": int, "nth_paragraph": int, "first_word": str}),
    "detectable_content:number_placeholders": (_number_placeholders, {"num_placeholders": int}),
    "detectable_content:postscript": (_postscript, {"postscript_marker": str}),
    "detectable_format:number_bullet_lists": (_number_bullet_lists, {"num_bullets": int}),
    "detectable_format:constrained_response": (_constrained_response, {}),
    "detectable_format:number_highlighted_sections": (_number_highlighted_sections, {"num_highlights": int}),
    "detectable_format:multiple_sections": (_multiple_sections, {"section_spliter": str, "num_sections": int}),
    "detectable_format:json_format": (_json_format, {}),
    "detectable_format:title": (_title, {}),
    "combination:two_responses": (_two_responses, {}),
    "combination:repeat_prompt": (_repeat_prompt, {"prompt_to_repeat": str}),
    "startend:end_checker": (_end_checker, {"end_phrase": str}),
    "startend:quotation": (_quotation, {}),
    "change_case:capital_word_frequency": (_capital_word_frequency, {"capital_frequency": int,
                                                                     "capital_relation": str}),
    "change_case:english_capital": (_english_capital, {}),
    "change_case:english_lowercase": (_english_lowercase, {}),
    "punctuation:no_comma": (_no_comma, {}),
}
SUPPORTED_IDS: tuple[str, ...] = tuple(_RULES)
UNSUPPORTED_IDS: dict[str, str] = {"language:response_language": "needs a language detector (langdetect), "
                                                                  "which eva does not depend on"}
RELATIONS = ("less than", "at least")


# ----------------------------------------------------------------------------------------------- records

def record_name(record: dict, where: str = "") -> str:
    """How an error names a record: `where` and the record's id."""
    rid = record.get("id", record.get("key"))
    return " ".join(part for part in (where, f"prompt {rid}" if rid is not None else "") if part) or "record"


def clean_kwargs(instruction_id: str, kwargs: dict | None, where: str = "") -> dict:
    """The kwargs of one instruction, None values dropped, checked against the id's kwarg names and types."""
    place = f"{where}: " if where else ""
    if instruction_id not in _RULES:
        if instruction_id in UNSUPPORTED_IDS:
            raise ValueError(f"{place}instruction id '{instruction_id}' is not supported: "
                             f"{UNSUPPORTED_IDS[instruction_id]}")
        raise ValueError(f"{place}unknown instruction id '{instruction_id}' (see instructions.SUPPORTED_IDS)")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{place}kwargs of '{instruction_id}' must be a dict, got {type(kwargs).__name__}")
    given = {k: v for k, v in (kwargs or {}).items() if v is not None}
    wanted = _RULES[instruction_id][1]
    for key in given:
        if key not in wanted:
            raise ValueError(f"{place}'{instruction_id}' takes no kwarg '{key}' (takes: {sorted(wanted) or 'none'})")
    out = {}
    for key, kind in wanted.items():
        if key not in given:
            raise ValueError(f"{place}'{instruction_id}' needs kwarg '{key}'")
        value = given[key]
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{place}'{instruction_id}' kwarg '{key}' must be a non-negative int, got {value!r}")
        if kind is str and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{place}'{instruction_id}' kwarg '{key}' must be a non-empty string, got {value!r}")
        if kind is list and (not isinstance(value, list) or not value
                             or not all(isinstance(v, str) and v.strip() for v in value)):
            raise ValueError(f"{place}'{instruction_id}' kwarg '{key}' must be a non-empty list of strings, "
                             f"got {value!r}")
        if key.endswith("relation") and value not in RELATIONS:
            raise ValueError(f"{place}'{instruction_id}' kwarg '{key}' must be one of {RELATIONS}, got {value!r}")
        out[key] = value
    if instruction_id == "keywords:letter_frequency" and len(out["letter"].strip()) != 1:
        raise ValueError(f"{place}'{instruction_id}' kwarg 'letter' must be one character, got {out['letter']!r}")
    if instruction_id == "length_constraints:nth_paragraph_first_word" and not (
            1 <= out["nth_paragraph"] <= out["num_paragraphs"]):
        raise ValueError(f"{place}'{instruction_id}' needs 1 <= nth_paragraph <= num_paragraphs, got {out}")
    return out


def validate_record(record: dict, where: str = "") -> None:
    """Raise ValueError (naming the id and `where`) unless every instruction of the record can be checked."""
    place = record_name(record, where)
    ids, kwargs = record.get("instruction_id_list"), record.get("kwargs")
    if not isinstance(ids, list):
        raise ValueError(f"{place}: 'instruction_id_list' must be a list, got {type(ids).__name__}")
    if kwargs is None:
        kwargs = [{}] * len(ids)
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ValueError(f"{place}: 'kwargs' must be a list with one dict per instruction id ({len(ids)})")
    for instruction_id, kw in zip(ids, kwargs):
        clean_kwargs(instruction_id, kw, place)


def is_supported(record: dict) -> bool:
    """True when every instruction id of the record is supported (kwargs are not checked)."""
    return all(i in _RULES for i in record.get("instruction_id_list") or [])


def describe_instruction(instruction_id: str, kwargs: dict) -> str:
    """The sentence a user would append to a prompt to ask for this instruction."""
    return _DESCRIBE[instruction_id](clean_kwargs(instruction_id, kwargs))


def _loose_variants(response: str) -> list[str]:
    # The official loose evaluation: also try without the first and/or last line, and without asterisks.
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    variants = [response, response.replace("*", "")] + cut + [c.replace("*", "") for c in cut]
    return [v for v in variants if v.strip()]


def check_instructions(record: dict, response: str, *, loose: bool = False) -> list[bool]:
    """One bool per instruction of the record: is it followed (strict by default, as IFEval's strict accuracy)."""
    place = record_name(record)
    ids = record.get("instruction_id_list") or []
    kwargs_list = record.get("kwargs") or [{}] * len(ids)
    validate_record(record)
    variants = _loose_variants(response) if loose else ([response] if response.strip() else [])
    results = []
    for instruction_id, kw in zip(ids, kwargs_list):
        checker = _RULES[instruction_id][0]
        kw = clean_kwargs(instruction_id, kw, place)
        results.append(any(checker(v, kw) for v in variants))
    return results


# ----------------------------------------------------------------------------------------------- constraint catalogue
# What the creator adds or tightens in code, which constraints can live together, and a prompt as task + sentences.

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
    task = [s for s in split_sentences(text) if not _RULE_CUES.search(s)]
    return " ".join(task) if task else None


def drop_rule_sentences(text: str) -> str:
    """text without the sentences that read like answer-format rules."""
    return " ".join(s for s in split_sentences(text) if not _RULE_CUES.search(s)).strip()


def compose_prompt(task: str, ids: list[str], kwargs: list[dict]) -> str:
    """The prompt a user would send: the task, then one sentence per constraint."""
    task = task.strip()
    if task and task[-1] not in ".!?:;\"')]":
        task += "."
    return " ".join([task] + [describe_instruction(i, k) for i, k in zip(ids, kwargs)])

