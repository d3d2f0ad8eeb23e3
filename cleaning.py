"""The creator's quality gate: a rewrite is parsed out of the creator's raw text, rejected for a reason it can
name (REJECT_REASONS: empty, an echo of the instruction, a copy, too long, an answer instead of a request, ...),
and de-duplicated exactly and near-exactly (character 3-gram Jaccard) against the pool and its siblings.

    text, reason = clean_rewrite(parent_text, raw)      # (the request, "ok") or (None, the reason)
    index = new_index(); index_add(index, record); index_find(index, candidate, 0.85)   # None, "duplicate", ...
"""
import json
import re

import constraints

REJECT_REASONS = ("failed", "empty", "too_short", "echo", "example", "copy", "too_long", "meta", "answer",
                  "duplicate", "near_duplicate", "no_constraint_step")

_TAG = re.compile(r"(?<!<)</?\s*(?:request|prompt|new[ _]?request|new[ _]?prompt|rewritten(?:[ _]?\w+)?|original"
                  r"(?:[ _]?\w+)?|instruction|task|output|answer|response|s|/s|im_start|im_end)\s*>(?!>)", re.I)
_SPECIAL = re.compile(r"\[/?INST\]|<\|[^|>]{1,30}\|>|</?s>|^\s*(?:assistant|user)\s*:?\s*\n", re.I | re.M)
_LABEL = re.compile(r"(?:^|\n)[ \t>#*_]*(?:the |your |my |here is |here's )?(?:new|rewritten|evolved|revised|modified"
                    r"|updated|improved|harder|resulting|final)?[ \t]*(?:user[ \t]+)?(?:prompt|request|instruction|"
                    r"question|task|version)[ \t]*\d*[ \t]*[*_]*[ \t]*:[ \t]*[*_]*[ \t]*", re.I)
_LEAD_IN = re.compile(r"^\s*(?:sure|certainly|of course|okay|ok|absolutely|great|here(?:'s| is| are)|below is|"
                      r"i(?:'ve| have) (?:rewritten|written|created))\b[^\n]{0,160}?:\s*(?:\n|$)", re.I)
_TRAILER = re.compile(r"\n\s*\n\s*[(*_]*(?:note|explanation|changes?|this (?:new |rewritten |revised )?(?:request|"
                      r"prompt|version|rewrite)|in this (?:version|rewrite)|i (?:have |'ve )?(?:added|changed|made|"
                      r"kept|rewrote)|the (?:new|rewritten) (?:request|prompt))\b.*$", re.I | re.S)
_ANSWER_OPENER = re.compile(r"^\W*(?:sure|certainly|of course|absolutely|okay|ok|here(?:'s| is| are)|as an ai|"
                            r"i(?:'m| am) sorry|i can(?:'t|not)|i'd be happy|i would be happy|great question|"
                            r"once upon a time|dear\b|title\s*:|<<)", re.I)
_IMPERATIVES = ("write compose create describe explain tell give list draft summarize summarise suggest imagine design "
                "plan compare discuss outline provide generate share name recommend translate rewrite make help find "
                "calculate solve propose invent develop argue analyze analyse evaluate identify prepare craft pretend "
                "define brainstorm teach show walk guide convince persuade pitch come please let consider assume "
                "choose decide picture sketch produce put turn draw build").split()
_QUESTION_WORDS = "what why how when where who which whose can could would should is are do does will may".split()
# A request: an imperative at the start of a clause, a question word at the start of a sentence, a question mark,
# or someone speaking to the assistant ("you", "I need ...").
_REQUEST = re.compile(r"(?:^|[.!?\n]\s*|[,;:]\s*|\b(?:and|then)\s+)(?:" + "|".join(_IMPERATIVES) + r")\b"
                      r"|(?:^|[.!?\n]\s*)(?:" + "|".join(_QUESTION_WORDS) + r")\b|\?"
                      r"|\b(?:you|your|yourself|i need|i want|i'd like|i would like|help me|i'm looking|"
                      r"i am looking)\b", re.I)
# Talk about the request or about the assistant itself, instead of a request.
_META = re.compile(r"\b(?:the|this|that|my|your) (?:original |new |above |rewritten |given )?(?:request|prompt)\b"
                   r"|\brewritten version\b|\bi(?:'m| am) (?:unable|not able|sorry|here to|ready to)\b"
                   r"|\bi can(?:'t|not) (?:help|assist)\b|\bi(?:'d| would) be (?:happy|glad)\b|\bas an ai\b"
                   r"|\bi was (?:designed|trained|created)\b|\bhow can i (?:help|assist)\b"
                   r"|\bwhat(?:'s| is) (?:the|your) question\b", re.I)
_QUOTE_PAIRS = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`"), ("**", "**"),
                ("*", "*"))


def normalize(text: str) -> str:
    """Lower case, every run of punctuation and white space made one space: the key of exact de-duplication."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def _strip_quotes(text: str) -> str:
    while True:
        text = text.strip()
        for left, right in _QUOTE_PAIRS:
            if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
                inner = text[len(left):len(text) - len(right)]
                if left == right and inner.count(left) % 2:  # '"a" or "b"': two quoted parts, not one quoted whole
                    continue
                text = inner
                break
        else:
            return text


def parse_rewrite(raw: str | None) -> str:
    """The rewritten prompt inside a creator's raw output: echoed tags, lead-ins, labels, quotes and trailing
    commentary removed. Returns "" when nothing is left."""
    if raw is None:
        return ""
    text = raw.replace("\r\n", "\n").strip()
    fence = re.search(r"```[a-z]*\n(.*?)```", text, re.S)
    if fence and fence.group(1).strip():
        text = fence.group(1)
    text = _SPECIAL.sub("", text)
    # When the output labels its rewrite ("New request: ..."), only what follows the last label counts: anything
    # before it is a lead-in or the echoed original.
    labels = list(_LABEL.finditer(text))
    if labels and text[labels[-1].end():].strip():
        text = text[labels[-1].end():]
    text = _TAG.sub("\n", text).strip()
    text = _LEAD_IN.sub("", text, count=1)
    text = _TRAILER.sub("", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n\s*\n\s*\n+", "\n\n", text)
    return _strip_quotes(text).strip()


def looks_like_answer(text: str, parent: str = "") -> bool:
    """True when `text` reads as an answer (a poem, a story, an essay, "Sure! ...") rather than a request."""
    if _ANSWER_OPENER.match(text):
        return True
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > max(6, len([line for line in parent.splitlines() if line.strip()]) + 4):
        return True
    return _REQUEST.search(text) is None


def clean_rewrite(parent_text: str, raw: str | None, *, max_ratio: float = 2.0, slack_chars: int = 60,
                  min_words: int = 3, examples: tuple[str, ...] = (), echoes: tuple[str, ...] = (),
                  near_duplicate: float = 0.85) -> tuple[str | None, str]:
    """(the cleaned rewrite, "ok") or (None, the reason it is rejected: one of REJECT_REASONS).

    Rejected: a failed call (None), nothing left after parsing, fewer than min_words words, an echo of the creator
    instruction (holding a phrase of `echoes`, lower case: creator.ECHO_MARKERS), a copy (character-3-gram Jaccard
    >= near_duplicate) of one of the template's worked `examples`, a copy of the parent (same normalized text), more
    than max_ratio times the parent's length (plus slack_chars, so short parents may gain a clause), text that talks
    about the request or the assistant ("I'd be happy to ...", "the original request ...") instead of being one, and
    text that answers instead of asking.
    """
    if raw is None:
        return None, "failed"
    text = parse_rewrite(raw)
    if not text:
        return None, "empty"
    if len(re.findall(r"\w+", text)) < min_words:
        return None, "too_short"
    if any(marker in text.lower() for marker in echoes):
        return None, "echo"
    if any(similarity(text, example) >= near_duplicate for example in examples):
        return None, "example"
    if normalize(text) == normalize(parent_text):
        return None, "copy"
    if len(text) > max_ratio * len(parent_text.strip()) + slack_chars:
        return None, "too_long"
    if _META.search(text) and not _META.search(parent_text):
        return None, "meta"
    if looks_like_answer(text, parent_text):
        return None, "answer"
    return text, "ok"


# ============================================================================================ de-duplication

def shingles(text: str, n: int = 3) -> frozenset:
    """Character n-grams of the normalized text."""
    norm = normalize(text)
    return frozenset(norm[i:i + n] for i in range(max(1, len(norm) - n + 1)))


def similarity(a: str, b: str, n: int = 3) -> float:
    """Jaccard similarity of the normalized texts' character n-grams, in [0, 1]."""
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def _signature(record: dict) -> str:
    # Two prompts whose texts are near-identical but ask for different constraints (80 -> 60 words) are different
    # tasks under the rules reward: near-duplicates must also share their constraints.
    ids = record.get("instruction_id_list") or []
    kwargs = record.get("kwargs") or [{}] * len(ids)
    return json.dumps(sorted(zip(ids, [json.dumps(k, sort_keys=True) for k in kwargs])))


def _near_text(record: dict) -> str:
    # Near-duplicates are judged on the task: the constraint sentences two prompts share would otherwise make a
    # wholly new request look like a copy of its parent (and the constraints themselves are in the signature).
    return constraints.split_task(record) or record["prompt"]  # split_task prefers the record's own "task"


def new_index() -> dict:
    return {"exact": set(), "near": {}}  # near: signature -> list of (shingle count, shingles)


def index_add(index: dict, record: dict) -> None:
    index["exact"].add(normalize(record["prompt"]))
    grams = shingles(_near_text(record))
    index["near"].setdefault(_signature(record), []).append((len(grams), grams))


def index_find(index: dict, record: dict, threshold: float) -> str | None:
    """"duplicate", "near_duplicate" or None."""
    if normalize(record["prompt"]) in index["exact"]:
        return "duplicate"
    grams = shingles(_near_text(record))
    for size, other in index["near"].get(_signature(record), ()):
        # Jaccard >= t needs the smaller set to be at least t times the larger one: skip the rest unseen.
        if min(size, len(grams)) < threshold * max(size, len(grams)):
            continue
        if len(grams & other) / len(grams | other) >= threshold:
            return "near_duplicate"
    return None
