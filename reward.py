"""Reward back-ends behind one call: `load_reward(spec).score(prompts, responses) -> list[float]`.

eva's creator and solver both run on rewards: a prompt's informativeness is the gap between its best and worst
sampled response, and training pairs are best vs worst. Three back-ends, chosen by one flag (`--reward SPEC`):

  rules                    verifiable instruction rules in IFEval's format (the embedded default, no model at all).
                           reward = fraction of the prompt's instructions the response follows, in [0, 1].
  hf:<hub-id-or-folder>    a Hugging Face sequence-classification reward model (the paper used
                           RLHFlow/ArmoRM-Llama3-8B-v0.1). Scored through the model's own tokenizer and chat template;
                           custom heads (ArmoRM) are detected from the config's auto_map and loaded with
                           trust_remote_code; ArmoRM's `.score` is used when the output has one, else `.logits[:, 0]`.
                           Batches of similar length, right-padded (a configured pad id is kept; without one, an
                           id absent from the batch pads it, so the head reads each row's true last token);
                           conversations longer than the model's limit lose their start, counted on stderr.
                           Options: batch_size=8, max_length=None (the model's limit), dtype=None (bf16 on GPU).
  judge:<base-url>[?model=NAME&template=FILE&key_env=VAR&concurrency=N&timeout=S&retries=N]
                           an LLM judge behind an OpenAI-compatible endpoint (vLLM's server, LiteLLM, a hosted API),
                           asked for a pointwise 1-10 rating (JUDGE_TEMPLATE, or the file `template=`; it must
                           contain {prompt} and {response}). The model name comes from `model=` or $EVA_JUDGE_MODEL;
                           the key from $OPENAI_API_KEY (or the variable named by key_env=). reward = the rating
                           itself, a float in [1, 10]. A response the judge could not rate (unparseable reply,
                           out-of-range number, a call that failed after its retries) gets NaN, never a silent 0:
                           it is reported on stderr and listed in `scorer.info["unrated"]`; callers drop NaN rewards.
                           When every call of one score() fails, or nothing answers at load time, EndpointError
                           (one line naming the URL) is raised instead: the endpoint is down, not one response bad.
                           The same options can be given as keyword arguments to load_reward.

`score` runs in the local process; under torchrun call `score_sharded(scorer, prompts, responses)`, which splits the
items over the ranks and gathers the rewards back in order (parallel.sharded).

The rules back-end also gives eval/ the two IFEval accuracies (strict, as the official `evaluation_lib`; loose too)
and gives the creator `describe_instruction`, the sentence a user would write to ask for an instruction.
Supported ids: SUPPORTED_IDS (24 of IFEval's 25; `language:response_language` needs a language detector and is
refused with a clear error). Differences from the official checkers (google-research/instruction_following_eval):
  - kwargs must be complete (the official code draws a random value for a missing one); None values, as in the
    Hugging Face copy of IFEval, are treated as absent. Keywords, forbidden words, section splitters and postscript
    markers are matched literally (the official code uses them as regular expressions: same result for plain words).
  - sentences are counted by a small rule-based splitter (count_sentences), not nltk's punkt: a sentence ends at
    . ! or ? (closing quotes/brackets included) followed by whitespace or the end of the text, except after common
    abbreviations (Mr. Dr. e.g. ...), single-letter initials and numbered-list markers ("1." at a line start);
    newlines alone do not end a sentence (as in punkt); text after the last mark counts if it has a letter or digit.
  - change_case:capital_word_frequency counts all-caps tokens from a whitespace tokenizer that strips surrounding
    punctuation and splits English contractions (DON'T -> DO + N'T), close to nltk.word_tokenize for this count.
  - change_case:english_capital / english_lowercase check the case only (str.isupper / str.islower of the whole
    response, code blocks included); the official checker also asks langdetect whether the text is English.
  - words are counted as runs of \\w characters, exactly as the official RegexpTokenizer(r"\\w+").
Like the official strict evaluation, an empty (whitespace-only) response follows no instruction.

Run `python reward.py --reward rules --prompts pool.jsonl --samples samples.jsonl --out scored.jsonl` (or under
`torchrun --nproc_per_node N`) to (re)score sample records; `python scripts/ifeval_coverage.py` for IFEval coverage.
"""
import argparse
import collections
import json
import math
import os
import re
import string
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import endpoint

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

def _where(record: dict, where: str) -> str:
    rid = record.get("id", record.get("key"))
    return " ".join(part for part in (where, f"prompt {rid}" if rid is not None else "") if part) or "record"


def clean_kwargs(instruction_id: str, kwargs: dict | None, where: str = "") -> dict:
    """The kwargs of one instruction, None values dropped, checked against the id's kwarg names and types."""
    place = f"{where}: " if where else ""
    if instruction_id not in _RULES:
        if instruction_id in UNSUPPORTED_IDS:
            raise ValueError(f"{place}instruction id '{instruction_id}' is not supported: "
                             f"{UNSUPPORTED_IDS[instruction_id]}")
        raise ValueError(f"{place}unknown instruction id '{instruction_id}' (see reward.SUPPORTED_IDS)")
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
    place = _where(record, where)
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
    place = _where(record, "")
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


def rules_reward(record: dict, response: str) -> float:
    """Fraction of the record's instructions the response follows (strict)."""
    followed = check_instructions(record, response)
    if not followed:
        raise ValueError(f"{_where(record, '')}: no instructions, so the rules reward is undefined")
    return sum(followed) / len(followed)


def ifeval_accuracy(records: list[dict], responses: list[str], *, unsupported: str = "error") -> dict:
    """IFEval's accuracies: prompt_level (all instructions followed) and instruction_level, strict and loose.

    unsupported="error" raises on a record with an unsupported id; "skip" leaves such records out (n_skipped).
    Also returns per_instruction: {id: strict accuracy}.
    """
    assert unsupported in ("error", "skip"), f"unsupported must be 'error' or 'skip', got {unsupported!r}"
    assert len(records) == len(responses), f"{len(records)} records but {len(responses)} responses"
    n_prompts = n_instructions = skipped = 0
    prompt_ok = {"strict": 0, "loose": 0}
    instruction_ok = {"strict": 0, "loose": 0}
    per_total, per_ok = collections.Counter(), collections.Counter()
    for record, response in zip(records, responses):
        if unsupported == "skip" and not is_supported(record):
            skipped += 1
            continue
        strict = check_instructions(record, response)
        loose = check_instructions(record, response, loose=True)
        n_prompts += 1
        n_instructions += len(strict)
        for name, followed in (("strict", strict), ("loose", loose)):
            prompt_ok[name] += all(followed)
            instruction_ok[name] += sum(followed)
        for instruction_id, ok in zip(record["instruction_id_list"], strict):
            per_total[instruction_id] += 1
            per_ok[instruction_id] += ok
    ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
    return {"prompt_level": ratio(prompt_ok["strict"], n_prompts),
            "instruction_level": ratio(instruction_ok["strict"], n_instructions),
            "prompt_level_loose": ratio(prompt_ok["loose"], n_prompts),
            "instruction_level_loose": ratio(instruction_ok["loose"], n_instructions),
            "n_prompts": n_prompts, "n_instructions": n_instructions, "n_skipped": skipped,
            "per_instruction": {i: per_ok[i] / per_total[i] for i in sorted(per_total)}}


# ----------------------------------------------------------------------------------------------- back-ends

@dataclass
class Scorer:
    """What load_reward returns: `score(prompts, responses) -> rewards`, plus what the back-end reports in info."""
    spec: str
    score: Callable[[list, list[str]], list[float]]
    info: dict = field(default_factory=dict)


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    assert isinstance(prompt, dict) and "prompt" in prompt, f"a prompt must be a record with 'prompt', got {prompt!r}"
    return prompt["prompt"]


def _check_lengths(prompts: list, responses: list[str]) -> None:
    assert len(prompts) == len(responses), f"{len(prompts)} prompts but {len(responses)} responses"


def _rules_scorer() -> Scorer:
    def score(prompts: list[dict], responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        for i, record in enumerate(prompts):
            validate_record(record, f"item {i}")  # fail on a bad id before scoring anything
        return [rules_reward(p, r) for p, r in zip(prompts, responses)]
    return Scorer("rules", score)


JUDGE_TEMPLATE = """You are grading how well an AI assistant answered a user. Judge the response on how helpful, \
correct, complete and clear it is, and on whether it follows every instruction and constraint in the user's \
message (length, format, words to use or avoid, and so on). Ignore the response's length as such: a short answer \
that does everything asked is better than a long one that does not.

[User message]
{prompt}
[End of user message]

[Assistant response]
{response}
[End of assistant response]

Write one or two sentences of justification, then, on the last line, your rating as an integer from 1 (useless or \
ignores the request) to 10 (excellent, follows every instruction), in exactly this form:
Rating: N"""

_RATING_PATTERNS = (re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"),
                    re.compile(r"(?i)\brating\W{0,3}\s*(\d+(?:\.\d+)?)"),
                    re.compile(r"(?i)\b(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b"))


def parse_rating(text: str | None) -> float | None:
    """The judge's 1-10 rating from its reply (last match of the most specific form), or None when there is none."""
    if text is None:
        return None
    stripped = text.strip().strip("*").strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
        value = float(stripped)
    else:
        value = None
        for pattern in _RATING_PATTERNS:
            found = pattern.findall(text)
            if found:
                value = float(found[-1])
                break
    return value if value is not None and 1.0 <= value <= 10.0 else None


def fill_template(template: str, prompt: str, response: str) -> str:
    """The judge's message: {prompt} and {response} filled in one pass (braces inside the texts stay as written)."""
    return re.sub(r"\{(prompt|response)\}", lambda m: prompt if m.group(1) == "prompt" else response, template)


def _load_template(path: str | None) -> str:
    if path is None:
        return JUDGE_TEMPLATE
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"judge template {path}: no such file")
    text = file.read_text()
    for slot in ("{prompt}", "{response}"):
        if slot not in text:
            raise ValueError(f"judge template {path}: missing the placeholder {slot}")
    return text


def _judge_scorer(rest: str, *, model: str | None = None, template: str | None = None,
                  key_env: str = "OPENAI_API_KEY", concurrency: int = 8, timeout: float = 120, retries: int = 4,
                  max_tokens: int = 512, backoff: float = 1.0, check: bool = True) -> Scorer:
    parts = urllib.parse.urlsplit(rest)
    query = dict(urllib.parse.parse_qsl(parts.query))
    options = {"model": model, "template": template, "key_env": key_env, "concurrency": concurrency,
               "timeout": timeout, "retries": retries}
    for key, value in query.items():
        if key not in options:
            raise ValueError(f"judge:{rest}: unknown option '{key}' (known: {', '.join(options)})")
        kind = {"concurrency": int, "retries": int, "timeout": float}.get(key, str)
        try:
            options[key] = kind(value)
        except ValueError:
            raise ValueError(f"judge:{rest}: option '{key}' must be a {kind.__name__}, got {value!r}") from None
    base_url = urllib.parse.urlunsplit(parts._replace(query=""))
    endpoint.completions_url(base_url)  # raises on a malformed URL
    name = options["model"] or os.environ.get("EVA_JUDGE_MODEL")
    if not name:
        raise ValueError(f"judge:{rest}: no judge model name; add ?model=<name> or set EVA_JUDGE_MODEL")
    text = _load_template(options["template"])
    if check:
        endpoint.check_reachable(base_url, timeout=min(10.0, float(options["timeout"])))
    info: dict = {"unrated": []}
    call = dict(concurrency=int(options["concurrency"]), timeout=float(options["timeout"]),
                retries=int(options["retries"]), api_key_env=options["key_env"], max_tokens=max_tokens,
                backoff=backoff)

    def score(prompts: list, responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        messages = [[{"role": "user", "content": fill_template(text, _prompt_text(p), r)}]
                    for p, r in zip(prompts, responses)]
        replies = endpoint.chat_many(base_url, name, messages, **call)
        rewards, unrated = [], []
        for i, reply in enumerate(replies):
            rating = parse_rating(reply)
            if rating is None:
                reason = "call failed" if reply is None else f"unparseable reply {reply[-80:]!r}"
                unrated.append((i, reason))
            rewards.append(float("nan") if rating is None else rating)
        info["unrated"] = unrated
        if unrated:
            print(f"reward judge:{base_url}: {len(unrated)}/{len(replies)} responses unrated (NaN); "
                  f"first: item {unrated[0][0]}, {unrated[0][1]}", file=sys.stderr)
        return rewards
    return Scorer(f"judge:{rest}", score, info)


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ValueError("not a yes/no value")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("not positive")
    return number


def _dtype_name(value: str) -> str:
    if value not in ("float32", "bfloat16", "float16"):
        raise ValueError("not float32, bfloat16 or float16")
    return value


HF_OPTIONS = {"trust_remote_code": _flag, "batch_size": _positive_int, "max_length": _positive_int,
              "dtype": _dtype_name}


def _hf_options(rest: str) -> tuple[str, dict]:
    """'<id-or-folder>[?trust_remote_code=1&batch_size=N&max_length=N&dtype=NAME]' -> (id-or-folder, options)."""
    ref, _, query = rest.partition("?")
    if not ref:
        raise ValueError(f"hf:{rest}: no hub id or folder before the options")
    options = {}
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key not in HF_OPTIONS:
            raise ValueError(f"hf:{rest}: unknown option '{key}' (known: {', '.join(HF_OPTIONS)})")
        try:
            options[key] = HF_OPTIONS[key](value)
        except ValueError as err:
            raise ValueError(f"hf:{rest}: option '{key}' got {value!r}: {err}") from None
    return ref, options


# ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1), run by eva's own code rather than its repository's modeling_custom.py.
ARMORM = "LlamaForRewardModelWithGating"
ARMORM_GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"  # the last assistant header


def _checkpoint_tensors(ref: str, names: list[str]) -> dict:
    """The named tensors (fp32) from a folder's or cached hub model's safetensors, one file or sharded by an index."""
    from safetensors import safe_open
    from transformers.utils import cached_file
    index = cached_file(ref, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        files = {name: weight_map.get(name, "model.safetensors") for name in names}
    else:
        files = {name: "model.safetensors" for name in names}
    tensors = {}
    for file in sorted(set(files.values())):
        path = cached_file(ref, file, _raise_exceptions_for_missing_entries=False)
        if path is None:
            raise FileNotFoundError(f"hf:{ref}: {file} is missing")
        with safe_open(path, framework="pt") as shard:
            stored = set(shard.keys())
            for name in (n for n in names if files[n] == file and n in stored):
                tensors[name] = shard.get_tensor(name).float()
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"hf:{ref}: the reward head is not in the checkpoint ({missing[0]} missing); "
                         "this is not a trained reward model")
    return tensors


def _load_armorm(ref: str, config: dict, device, dtype) -> tuple:
    """ArmoRM as (backbone, head): a transformers LlamaModel (the checkpoint's model.* weights, no LM head) and the
    fp32 tensors of its gating head: regression [K, H], gating [(weight, bias)] * (n_hidden + 1), logit_scale,
    transform [K, K], temperature."""
    from transformers import MODEL_MAPPING, LlamaConfig, LlamaModel
    import model as model_lib
    attention = model_lib.attention_implementation(LlamaConfig(), device, MODEL_MAPPING)
    backbone, loading = LlamaModel.from_pretrained(ref, dtype=dtype, output_loading_info=True,
                                                   attn_implementation=attention)
    if loading.get("missing_keys"):
        raise ValueError(f"hf:{ref}: the Llama backbone is incomplete ({sorted(loading['missing_keys'])[0]} missing)")
    n_layers = config.get("gating_n_hidden", 3) + 1  # ArmoRM's defaults when the config leaves them out
    gating = [f"gating.layers.{i}.{p}" for i in range(n_layers) for p in ("weight", "bias")]
    t = _checkpoint_tensors(ref, ["regression_layer.weight", "gating.logit_scale", "reward_transform_matrix", *gating])
    t = {k: v.to(device) for k, v in t.items()}
    head = {"regression": t["regression_layer.weight"], "logit_scale": t["gating.logit_scale"].reshape(()),
            "transform": t["reward_transform_matrix"], "temperature": float(config.get("gating_temperature", 10)),
            "gating": [(t[f"gating.layers.{i}.weight"], t[f"gating.layers.{i}.bias"]) for i in range(n_layers)]}
    return backbone.to(device).eval(), head


def _last_occurrence(row: list[int], pattern: list[int]) -> int | None:
    for j in range(len(row) - len(pattern), -1, -1):
        if row[j:j + len(pattern)] == pattern:
            return j
    return None


def armorm_scores(hidden, lengths: list[int], gate_at: list[int], head: dict):
    """ArmoRM's preference score per row, [B], from the backbone's final (normed) hidden states [B, T, H]:
        r = W_reg h[last]                      (K objectives; last = lengths - 1, the last real token)
        g = softmax(MLP(h[gate_at]) / temperature) * logit_scale    (MLP: Linear+ReLU, ..., Linear)
        score = sum_k g_k (r @ transform)_k"""
    import torch
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, torch.tensor(lengths, device=hidden.device) - 1].float()  # [B, H]
    x = hidden[rows, torch.tensor(gate_at, device=hidden.device)].float()  # [B, H]
    for i, (weight, bias) in enumerate(head["gating"]):
        x = torch.nn.functional.linear(x, weight, bias)
        x = torch.relu(x) if i < len(head["gating"]) - 1 else x
    gate = torch.softmax(x / head["temperature"], dim=-1) * head["logit_scale"]  # [B, K]
    rewards = last @ head["regression"].T @ head["transform"]  # [B, K]
    return (gate * rewards).sum(-1)  # [B]


def _hf_scorer(rest: str, *, device: str = "cpu", batch_size: int = 8, max_length: int | None = None,
               dtype=None, trust_remote_code: bool = False) -> Scorer:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    ref, query = _hf_options(rest)  # options in the spec win over keyword arguments, as for judge:
    trust_remote_code = query.get("trust_remote_code", trust_remote_code)
    batch_size = query.get("batch_size", batch_size)
    max_length = query.get("max_length", max_length)
    dtype = getattr(torch, query["dtype"]) if "dtype" in query else dtype
    try:
        config, _ = PretrainedConfig.get_config_dict(ref)  # reads config.json only; runs no code
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"hf:{ref}: no model folder or cached hub model "
                                f"({str(err).strip().splitlines()[0]})") from None
    architectures = config.get("architectures") or []
    armorm = architectures == [ARMORM]  # eva's own code, with or without the opt-in
    native = config.get("model_type") in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    remote = not armorm and "AutoModelForSequenceClassification" in (config.get("auto_map") or {}) and (
        trust_remote_code or not native)
    if remote and not trust_remote_code:
        raise ValueError(f"hf:{ref}: this model's code is in its repository (auto_map), which eva runs only when "
                         f"asked: --reward 'hf:{ref}?trust_remote_code=1'")
    if not (armorm or remote or any(a.endswith("ForSequenceClassification") for a in architectures)):
        raise ValueError(f"hf:{ref}: no sequence-classification head (architectures {architectures}); a reward "
                         "model must load with AutoModelForSequenceClassification")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # loading reports are checked below, not printed
    try:
        if armorm:
            model, armo = _load_armorm(ref, config, device, dtype)
        else:
            from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, AutoConfig
            import model as model_lib
            hf_config = AutoConfig.from_pretrained(ref, trust_remote_code=remote)
            attention = model_lib.attention_implementation(hf_config, device, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING)
            model, loading = AutoModelForSequenceClassification.from_pretrained(
                ref, config=hf_config, trust_remote_code=remote, dtype=dtype, output_loading_info=True,
                attn_implementation=attention)
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=remote)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not armorm:
        fresh = [k for k in loading.get("missing_keys", []) if re.search(r"score|classifier|head|regression", k)]
        if fresh:
            raise ValueError(f"hf:{ref}: the classification head is not in the checkpoint ({fresh[0]} missing); "
                             "this is not a trained reward model")
        model.to(device).eval()
    # The head finds each row's last real token through config.pad_token_id. A configured pad id is the one the
    # model was trained with, so it is kept. Without one, each batch pads with an id that none of its rows
    # contains, so the head reads the true last token, as it does for a lone unpadded conversation.
    # eva's ArmoRM reads positions from the row lengths, so any id pads it.
    configured_pad = (tokenizer.eos_token_id or 0) if armorm else getattr(model.config, "pad_token_id", None)
    vocab_size = getattr(model.config, "vocab_size", None) or len(tokenizer)

    def pad_for(rows: list[list[int]]) -> int:
        if configured_pad is not None:
            return configured_pad
        used = set().union(*map(set, rows))
        preferred = [t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None]
        pad = next((t for t in [*preferred, *range(vocab_size)] if t not in used), None)
        assert pad is not None, f"hf:{ref}: every token id occurs in one batch; lower batch_size"
        model.config.pad_token_id = pad
        return pad
    limits = [max_length, getattr(model.config, "max_position_embeddings", None),
              tokenizer.model_max_length if tokenizer.model_max_length < 10**7 else None]
    limit = min(x for x in limits if x) if any(limits) else None
    info: dict = {"truncated": 0, "max_length": limit}
    bos = tokenizer.bos_token_id

    def encode(prompt, response: str) -> list[int]:
        messages = [{"role": "user", "content": _prompt_text(prompt)}, {"role": "assistant", "content": response}]
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer(f"User: {_prompt_text(prompt)}\n\nAssistant: {response}")["input_ids"]

    if armorm:
        # ArmoRM gates on the hidden state where the last assistant header begins; its ids come from this tokenizer.
        pattern = tokenizer.encode(ARMORM_GATING_TEXT, add_special_tokens=False)
        if _last_occurrence(encode("Hi", "Hello"), pattern) is None:
            raise ValueError(f"hf:{ref}: ArmoRM gates on {ARMORM_GATING_TEXT!r}, which this tokenizer's chat "
                             "template does not produce (a Llama-3 tokenizer and template are needed)")

    def forward(ids, mask, rows: list[list[int]]):
        """[B] rewards of right-padded ids [B, T]."""
        if armorm:
            gate_at = [_last_occurrence(row, pattern) for row in rows]
            if None in gate_at:
                raise ValueError(f"hf:{ref}: a conversation lost its last assistant header {ARMORM_GATING_TEXT!r} "
                                 f"to truncation at {limit} tokens; ArmoRM cannot gate it")
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
            return armorm_scores(hidden, [len(row) for row in rows], gate_at, armo)
        out = model(input_ids=ids, attention_mask=mask)
        if isinstance(out, torch.Tensor):
            values = out
        elif getattr(out, "score", None) is not None:
            values = out.score  # a remote-code head (such as ArmoRM's own) with a preference score, [B] or [B, 1]
        else:
            values = out.logits  # [B, num_labels]
        return values.reshape(len(rows), -1)[:, 0]

    def score(prompts: list, responses: list[str]) -> list[float]:
        _check_lengths(prompts, responses)
        encoded = [encode(p, r) for p, r in zip(prompts, responses)]
        truncated = 0
        if limit:
            for i, ids in enumerate(encoded):
                if len(ids) > limit:
                    # Keep the end: the head reads the last token, and the response is what is being judged.
                    head = [ids[0]] if bos is not None and ids[0] == bos else []
                    encoded[i] = head + ids[len(ids) - limit + len(head):]
                    truncated += 1
        if truncated:
            info["truncated"] += truncated
            print(f"reward hf:{ref}: truncated {truncated}/{len(encoded)} conversations to {limit} tokens",
                  file=sys.stderr)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
        rewards = [0.0] * len(encoded)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = max(len(encoded[i]) for i in rows)
                # Right padding: HF heads find the last real token either as "first pad - 1" (older and remote
                # code) or "last non-pad" (current transformers); right padding serves both.
                pad_id = pad_for([encoded[i] for i in rows])
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
                mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
                for b, i in enumerate(rows):
                    ids[b, :len(encoded[i])] = torch.tensor(encoded[i])
                    mask[b, :len(encoded[i])] = 1
                values = forward(ids.to(device), mask.to(device), [encoded[i] for i in rows])
                for b, value in enumerate(values.float().cpu().tolist()):
                    rewards[rows[b]] = value
        return rewards
    return Scorer(f"hf:{rest}", score, info)


def load_reward(spec: str, *, device: str = "cpu", **options) -> Scorer:
    """The reward back-end for a spec: "rules", "hf:<hub-id-or-folder>[?...]" or "judge:<base-url>[?model=...]"."""
    if spec == "rules":
        if options:
            raise ValueError(f"reward 'rules' takes no options, got {sorted(options)}")
        return _rules_scorer()
    if spec.startswith("hf:") and spec[3:]:
        return _hf_scorer(spec[3:], device=device, **options)
    if spec.startswith("judge:") and spec[6:]:
        return _judge_scorer(spec[6:], **options)
    raise ValueError(f"unknown reward back-end {spec!r}: expected 'rules', 'hf:<id-or-path>' or 'judge:<base-url>'")


def check_spec(spec: str) -> None:
    """Validate a --reward spec before anything loads: the back-end, its id or URL, and its options' names and values.
    Loads no model and calls no endpoint; a judge spec also needs its model name and template file, as at load."""
    try:
        if spec == "rules":
            return
        if spec.startswith("hf:") and spec[3:]:
            _hf_options(spec[3:])
        elif spec.startswith("judge:") and spec[6:]:
            _judge_scorer(spec[6:], check=False)  # parses and checks without calling the endpoint
        else:
            load_reward(spec)  # raises the unknown-back-end error
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"--reward: {err}") from None


def score_sharded(scorer: Scorer, prompts: list, responses: list[str]) -> list[float]:
    """scorer.score over this rank's shard under torchrun, gathered to every rank in order (plain call without)."""
    import parallel
    _check_lengths(prompts, responses)
    pairs = list(zip(prompts, responses))
    return parallel.sharded(lambda items: scorer.score([p for p, _ in items], [r for _, r in items]), pairs,
                            desc="reward")


# ----------------------------------------------------------------------------------------------- command line

def _read_jsonl(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    records = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="(Re)score sample records with a reward back-end.")
    parser.add_argument("--reward", default="rules", help="rules | hf:<id-or-path> | judge:<base-url>?model=NAME")
    parser.add_argument("--prompts", required=True, help="prompt records (JSON Lines; IFEval's format works)")
    parser.add_argument("--samples", required=True, help="sample records {prompt_id, responses: [...]}")
    parser.add_argument("--out", required=True, help="where the scored sample records go")
    parser.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    args = parser.parse_args(argv)
    import parallel
    device = args.device or str(parallel.init())
    prompts = {str(r.get("id", r.get("key"))): r for r in _read_jsonl(args.prompts)}
    samples = _read_jsonl(args.samples)
    flat_prompts, flat_responses = [], []
    for n, sample in enumerate(samples, 1):
        if str(sample.get("prompt_id")) not in prompts:
            raise ValueError(f"{args.samples}:{n}: prompt_id {sample.get('prompt_id')!r} is not in {args.prompts}")
        for response in sample["responses"]:
            flat_prompts.append(prompts[str(sample["prompt_id"])])
            flat_responses.append(response)
    scorer = load_reward(args.reward, device=device)
    rewards = score_sharded(scorer, flat_prompts, flat_responses)
    if parallel.is_main():
        lines, k = [], 0
        for sample in samples:
            r = rewards[k:k + len(sample["responses"])]
            k += len(r)
            valid = [x for x in r if not math.isnan(x)]
            sample = dict(sample, rewards=[None if math.isnan(x) else x for x in r],
                          info=max(valid) - min(valid) if valid else None)
            lines.append(json.dumps(sample))
        tmp = Path(args.out + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, args.out)
        print(f"scored {len(rewards)} responses of {len(samples)} prompts with {args.reward} -> {args.out}")


if __name__ == "__main__":
    main()
