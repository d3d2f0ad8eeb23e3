"""Verifiable instructions in IFEval's format: the checkers and the sentence that asks for each (constraints.py
combines them into new prompts). A record is {"prompt", "instruction_id_list", "kwargs"}, IFEval's input format.

    check_instructions(record, response) -> [bool]   one per instruction, strict (loose=True: IFEval's loose)
    validate_record(record, where)                    one-line ValueError unless every instruction can be checked
    describe_instruction(id, kwargs) -> str           the sentence a user would write to ask for an instruction

SUPPORTED_IDS: all 25 of IFEval's instruction ids. response_language, english_capital and english_lowercase tell the
language with langdetect, seeded so that the same text always gets the same answer (the official code leaves it
unseeded, so its verdict on a borderline text can change from run to run); like the official checkers, they count a
text in which langdetect finds nothing to go on (digits, punctuation) as being in any language.
Differences from the official checkers (google-research/instruction_following_eval):
  - kwargs must be complete (the official code draws a missing one at random); None values count as absent.
  - keywords, forbidden words, section splitters and postscript markers match literally, not as regexes.
  - sentences come from a rule-based splitter (split_sentences), not nltk's punkt: . ! or ? (closing quotes or
    brackets included) before white space or the end, except after common abbreviations, single-letter initials
    and "1." list markers; newlines alone end no sentence; a tail with a letter or digit counts.
  - capital_word_frequency counts all-caps tokens of word_tokens (contractions split, as nltk.word_tokenize).
Like the official strict evaluation, an empty (whitespace-only) response follows no instruction.
"""
import json
import re
import string
from typing import Callable

import langdetect

langdetect.DetectorFactory.seed = 0  # langdetect samples n-grams at random: a fixed seed makes its verdict repeatable


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


# The ISO 639-1 codes langdetect can return (its profiles; Chinese is split in two) and the names a prompt uses.
LANGUAGES = {
    "af": "Afrikaans", "ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan", "cs": "Czech",
    "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek", "en": "English", "es": "Spanish",
    "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fr": "French", "gu": "Gujarati", "he": "Hebrew",
    "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese",
    "kn": "Kannada", "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian", "mk": "Macedonian", "ml": "Malayalam",
    "mr": "Marathi", "ne": "Nepali", "nl": "Dutch", "no": "Norwegian", "pa": "Punjabi", "pl": "Polish",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "so": "Somali",
    "sq": "Albanian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "th": "Thai",
    "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese",
    "zh-cn": "Simplified Chinese", "zh-tw": "Traditional Chinese",
}


def detect_language(text: str) -> str | None:
    """langdetect's language code for the text (a key of LANGUAGES), or None when it finds no letters to go on."""
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None


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
    return r.isupper() and detect_language(r) in ("en", None)


def _english_lowercase(r: str, kw: dict) -> bool:
    return r.islower() and detect_language(r) in ("en", None)


def _response_language(r: str, kw: dict) -> bool:
    return detect_language(r) in (kw["language"], None)  # undetectable counts as followed, as in the official code


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
    "language:response_language": lambda kw: (f"Your entire response should be in {LANGUAGES[kw['language']]}; "
                                              "no other language is allowed."),
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
    "language:response_language": (_response_language, {"language": str}),
    "punctuation:no_comma": (_no_comma, {}),
}
SUPPORTED_IDS: tuple[str, ...] = tuple(_RULES)
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
    if instruction_id == "language:response_language" and out["language"] not in LANGUAGES:
        raise ValueError(f"{place}'{instruction_id}' kwarg 'language' must be a code langdetect can tell "
                         f"({', '.join(LANGUAGES)}), got {out['language']!r}")
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
