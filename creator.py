"""The creator: which prompts are informative, which to evolve, how to rewrite them, and how to mix the pairs.

    informativeness(rewards) -> select(info, fraction) -> evolve(parents, complete) -> make_pairs -> mix

informativeness is the reward gap max - min by default (NaN where a prompt's rewards all tie); select draws prompts
weighted by it; evolve grows a chain of up to `depth` rewrites from each selected prompt, one EVOLVE_METHODS method
per link, cleaned and de-duplicated. Under the rules reward the creator LLM rewrites only a prompt's task and the
constraints stay in code (constraints.py): add_constraints is the in-code constraint_step, which also replaces a
rejected rewrite only when every candidate the creator sampled for that link was rejected. Each method's message
ends with worked examples and the label "New request:", so even a small model continues with one request.
`complete` is local_completer (the solver itself, or any local model) or endpoint_completer (an OpenAI-compatible
server); it returns a list of candidates per message. make_pairs pairs each prompt's best and worst response; mix
takes 80% of them evolved.
"""
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

import cleaning
import constraints
import instructions
import losses
import parallel
import reward

# ============================================================================================ informativeness

METRICS: tuple[str, ...] = ("gap", "max_mean", "variance", "mean", "inv_mean", "best_second", "uniform")
SELECTION_RULES: tuple[str, ...] = ("weighted", "greedy", "uniform")


def _finite(row) -> np.ndarray:
    r = np.asarray(list(row), dtype=np.float64)  # [N]
    return r[np.isfinite(r)]  # a judge that could not rate a response gives NaN: that response does not count


def _ties(r: np.ndarray) -> bool:
    return r.size < 2 or float(np.ptp(r)) <= 1e-9 * max(1.0, float(np.abs(r).max()))


def informativeness(rewards: list[list[float]], metric: str = "gap") -> np.ndarray:
    """One informativeness value per prompt from its N rewards: [P] floats, NaN where the rewards all tie.

    gap = max - min (the paper's default); max_mean = max - mean; variance; mean; inv_mean = 1 - the mean reward
    min-max normalised over the pool; best_second = best - second best; uniform = 1 (no signal). Non-finite rewards
    are ignored; a prompt with fewer than two finite rewards, or whose rewards all tie, gets NaN under every metric,
    so the informed selection rules never pick it.
    """
    if metric not in METRICS:
        raise ValueError(f"creator: unknown informativeness metric '{metric}' (choose from {', '.join(METRICS)})")
    rows = [_finite(row) for row in rewards]
    tied = np.array([_ties(r) for r in rows], dtype=bool)  # [P]
    means = np.array([r.mean() if r.size else np.nan for r in rows])  # [P]
    if metric == "gap":
        info = np.array([r.max() - r.min() if r.size else np.nan for r in rows])
    elif metric == "max_mean":
        info = np.array([r.max() - r.mean() if r.size else np.nan for r in rows])
    elif metric == "variance":
        info = np.array([r.var() if r.size else np.nan for r in rows])
    elif metric == "mean":
        info = means.copy()
    elif metric == "inv_mean":
        finite = means[np.isfinite(means)]
        lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
        info = 1.0 - ((means - lo) / (hi - lo) if hi > lo else np.zeros_like(means))
    elif metric == "best_second":
        info = np.array([np.diff(np.sort(r)[-2:])[0] if r.size >= 2 else np.nan for r in rows])
    else:
        info = np.ones(len(rows))
    info = info.astype(np.float64)
    info[tied] = np.nan
    return info


def selection_weights(info: np.ndarray) -> np.ndarray:
    """Min-max normalised informativeness as sampling weights in [0, 1]; NaN (no information) -> 0.

    The floor of the normalisation is min(0, lowest value): 0 is the "no information" level of the spread metrics
    (where tied prompts sit in the paper's pool-wide min-max), so the prompt with the smallest non-zero gap keeps a
    weight. Without it, with a rules reward where every one-constraint prompt has gap exactly 1, all weights would
    be 0/0.
    """
    info = np.asarray(info, dtype=np.float64)  # [P]
    finite = np.isfinite(info)
    weights = np.zeros_like(info)
    if not finite.any():
        return weights
    lo = min(0.0, float(info[finite].min()))
    hi = float(info[finite].max())
    if hi > lo:
        weights[finite] = (info[finite] - lo) / (hi - lo)
    return weights


def n_selected(n_prompts: int, fraction: float) -> int:
    """How many prompts a fraction of a pool is: round half up, and at least one when fraction > 0 and the pool
    is not empty."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"creator: select fraction must be in [0, 1], got {fraction}")
    if n_prompts == 0 or fraction == 0:
        return 0
    return max(1, int(math.floor(fraction * n_prompts + 0.5)))


def weighted_order(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every index of `weights` [n] in the order of draws without replacement with probability proportional to weight
    at every draw (Efraimidis-Spirakis: key log(u) / w for a uniform u, largest first); zero weights come last, in a
    random order. One uniform per index is drawn from rng."""
    w = np.asarray(weights, dtype=np.float64)  # [n]
    u = rng.random(len(w))  # [n]
    keys = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)
    return np.lexsort((-u, -keys))  # key descending; ties (the zero weights) by u


def split_counts(total: int, fraction: float, available_a: int, available_b: int) -> tuple[int, int]:
    """(from a, from b): round(total * fraction) from a and the rest from b, a side that runs short topped up from
    the other (never more than either has)."""
    a = min(available_a, int(math.floor(total * fraction + 0.5)))
    b = min(available_b, total - a)
    return min(available_a, total - b), b


def select(info: np.ndarray, fraction: float = 0.25, rule: str = "weighted", seed: int = 0) -> list[int]:
    """Indices (sorted) of the prompts to evolve: n_selected(len(info), fraction) of them, fewer only when too few
    prompts are eligible.

    weighted: drawn without replacement with probability proportional to selection_weights(info) at every draw
              (weighted_order); zero-weight and NaN prompts are never drawn.
    greedy:   the k most informative (ties broken by a seeded shuffle); NaN prompts never.
    uniform:  k prompts uniformly at random from the whole pool, tied ones included (the no-signal ablation).
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"creator: unknown selection rule '{rule}' (choose from {', '.join(SELECTION_RULES)})")
    info = np.asarray(info, dtype=np.float64)  # [P]
    k = n_selected(len(info), fraction)
    rng = np.random.default_rng(seed)
    if rule == "uniform":
        return sorted(int(i) for i in rng.choice(len(info), size=k, replace=False)) if k else []
    if rule == "greedy":
        order = rng.permutation(len(info))  # a seeded tie-break, so equal values are not always the first lines
        eligible = order[np.isfinite(info[order])]
        ranked = eligible[np.argsort(-info[eligible], kind="stable")]
        return sorted(int(i) for i in ranked[:k])
    weights = selection_weights(info)  # [P]
    positive = np.flatnonzero(weights > 0)
    chosen = positive[weighted_order(weights[positive], rng)[:k]]
    return sorted(int(i) for i in chosen)


# ============================================================================================ evolve methods

@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "depth" (harder) or "breadth" (a new prompt in the same spirit)
    instruction: str  # what this method asks of the creator, one or two sentences
    examples: tuple[tuple[str, str], ...]  # worked examples: (a request, its rewrite by this method)
    template: str  # the whole creator message, with {prompt} where the prompt to rewrite goes


# The frame every method shares: the instruction, the paper's three guard rails (answerable by a person, sounds
# like a real user, about the same length), worked examples, then the request to rewrite. The message ends with
# the label a completion continues from, so even a small model writes one line after it (STOP ends it there).
_HEAD = ("{instruction} Each new request is one a person could really answer, worded the way a real user would "
         "write it, and about as long as the original; it is never an answer.\n\n")
_SHOT = "Request: {request}\nNew request: {rewrite}\n\n"
_ASK = "Request: {prompt}\nNew request:"
STOP = ("\n\n", "\nRequest:", "\nNew request:")  # a completion ends at the blank line or the next label
# A rewrite holding a clause of the guard rails or the answer label echoes the frame instead of writing a request
# (cleaning.clean_rewrite rejects it as "echo"); read off the frame, so a reworded frame keeps its markers.
ECHO_MARKERS = tuple(c.strip().removeprefix("and ").lower() for c in re.split(r"[,;.]", _HEAD.split("}", 1)[1])
                     if c.strip()) + (_ASK.rsplit("\n", 1)[1].lower(),)

# The worked examples are this project's own text: short, everyday requests like the seed prompts, and rewrites
# that change only the task (a format or length rule would be dropped: the constraints are kept in code).
_INSTRUCTIONS = {
    # in-depth: the same request made harder
    "add_constraints": ("depth", "Rewrite each request so that it adds one more concrete requirement the answer "
                                 "has to meet, such as a limit, a format or a condition.", (
        ("Write a poem about autumn.", "Write a poem about autumn in which every stanza ends with a question."),
        ("Describe your ideal weekend.", "Describe your ideal weekend without spending any money."))),
    "deepen": ("depth", "Rewrite each request so that it asks about the same subject in more depth, going after a "
                        "harder or less obvious side of it.", (
        ("Explain why the sky is blue.", "Explain why the sky is blue at noon but red and orange at sunset."),
        ("Write a short story about a lost dog.",
         "Write a short story about a lost dog, told from the point of view of the family that finds it."))),
    "concretise": ("depth", "Rewrite each request so that its general ideas become specific: name the people, "
                            "places, numbers or situation involved.", (
        ("Write a poem about a city at night.",
         "Write a poem about Lisbon at three in the morning, seen by a taxi driver on her last shift."),
        ("Give some advice on saving money.", "Give a student who earns 900 dollars a month advice on saving 100 "
                                              "of it."))),
    "reasoning": ("depth", "Rewrite each request so that a good answer needs several steps of thinking instead of "
                           "one quick reply.", (
        ("How long does it take to boil an egg?",
         "If one egg takes ten minutes to boil, how long do four eggs take in the same pot, and why?"),
        ("Describe a game of chess.", "Describe the first three moves of a game of chess and why each one "
                                      "helps white."))),
    "expand": ("depth", "Rewrite each request so that it also asks for one closely related part that the answer "
                        "has to cover.", (
        ("Write a recipe for pancakes.",
         "Write a recipe for pancakes and say how to keep them warm until everyone sits down."),
        ("Explain what a volcano is.", "Explain what a volcano is and why people still choose to live near one."))),
    # in-breadth: a different request in the same spirit
    "persona": ("breadth", "Write a new request in the same spirit, as a very different person would ask it (for "
                           "example a nurse, a child, a farmer or a retired sailor).", (
        ("Write a poem about the sea.", "I am a retired sailor. Write me a poem about the storms I still dream of."),
        ("Explain how plants grow.", "I am a farmer with a new greenhouse: how do my tomato seeds grow into "
                                     "plants?"))),
    "shift_in_domain": ("breadth", "Write a new request of the same kind about a different topic from the same "
                                   "field.", (
        ("Write a haiku about a cat.", "Write a haiku about an old dog waiting by the door."),
        ("Explain how a rainbow forms.", "Explain how lightning forms in a thunderstorm."))),
    "shift_out_domain": ("breadth", "Write a new request of the same kind and difficulty about a topic from an "
                                    "entirely different field.", (
        ("Write a limerick about a clumsy chef.", "Write a limerick about a goalkeeper who is afraid of the ball."),
        ("Explain how a rainbow forms.", "Explain how a bank decides the interest on a loan."))),
    "mix_domains": ("breadth", "Write a new request that joins the topic with an unrelated field, so the answer "
                               "has to draw on both.", (
        ("Write a story about a robot.", "Write a story about a robot that learns to cook from a recipe book."),
        ("Explain how bees make honey.", "Explain how bees make honey as if the hive were a factory with "
                                         "shifts."))),
    "abstract": ("breadth", "Write a new request that asks about the general idea behind the request rather than "
                            "this particular case.", (
        ("Write a poem about my grandmother's kitchen.",
         "Write a poem about how places keep the memory of the people who lived in them."),
        ("How do I fix a flat bicycle tire?", "How do you find and fix a small leak in anything that holds air?"))),
}


def _template(instruction: str, examples: tuple[tuple[str, str], ...]) -> str:
    shots = "".join(_SHOT.format(request=a, rewrite=b) for a, b in examples)
    # braces in the text would be read as placeholders by render's str.format
    return (_HEAD.format(instruction=instruction) + shots).replace("{", "{{").replace("}", "}}") + _ASK


EVOLVE_METHODS: dict[str, Method] = {
    name: Method(name, kind, text, examples, _template(text, examples))
    for name, (kind, text, examples) in _INSTRUCTIONS.items()
}
KINDS = ("all", "depth", "breadth")


def render(method: str, prompt: str) -> str:
    """The creator message asking for `method` applied to `prompt`."""
    if method not in EVOLVE_METHODS:
        raise ValueError(f"creator: unknown evolve method '{method}' (choose from {', '.join(EVOLVE_METHODS)})")
    return EVOLVE_METHODS[method].template.format(prompt=prompt.strip())


def methods_for(kinds: str = "all") -> list[str]:
    if kinds not in KINDS:
        raise ValueError(f"creator: evolve kinds must be one of {', '.join(KINDS)}, got '{kinds}'")
    return [name for name, m in EVOLVE_METHODS.items() if kinds == "all" or m.kind == kinds]


# ============================================================================================ evolve

def _constraints(record: dict, where: str) -> tuple[list[str], list[dict]]:
    ids = list(record.get("instruction_id_list") or [])
    raw = record.get("kwargs") or [{}] * len(ids)
    if len(raw) != len(ids):
        raise ValueError(f"creator: {where}: 'kwargs' must have one dict per instruction id ({len(ids)})")
    return ids, [instructions.clean_kwargs(i, k, where) for i, k in zip(ids, raw)]


def _child(node: dict, *, task: str, ids: list[str], kwargs: list[dict], method: str, iteration: int, step: int,
           root: str, fallback_from: str | None, verifiable: bool) -> dict:
    """A child prompt record, plus "task" (the request without its constraint sentences), "root" (the pool prompt
    its chain grew from), "step" (1..K along the chain) and "fallback_from" (the LLM method whose rejected rewrite
    the in-code constraint step replaced). evolve sets its id: "<root>.i<iteration>.<step>"."""
    return {"id": None, "prompt": constraints.compose_prompt(task, ids, kwargs) if verifiable else task,
            "instruction_id_list": ids, "kwargs": kwargs, "parent": node["id"], "iteration": iteration,
            "method": method, "task": task, "root": root, "step": step, "fallback_from": fallback_from}


def _constraint_child(node: dict, task: str | None, ids: list[str], kwargs: list[dict], rng: np.random.Generator,
                      max_constraints: int) -> tuple[dict, str] | None:
    """(child record without id/lineage, action) from the in-code constraint step, or None when none is possible.

    With a task the child's prompt is re-composed (task + every constraint's sentence). Without one (a prompt whose
    task could not be split off) a constraint can only be added: its sentence goes after the unchanged old text.
    """
    stepped = constraints.constraint_step(task if task is not None else node["prompt"], ids, kwargs, rng,
                                          max_constraints, tighten=task is not None)
    if stepped is None:
        return None
    new_ids, new_kwargs, action = stepped
    prompt = constraints.compose_prompt(task, new_ids, new_kwargs) if task is not None else \
        node["prompt"].strip() + " " + instructions.describe_instruction(new_ids[-1], new_kwargs[-1])
    return ({"id": None, "prompt": prompt, "instruction_id_list": new_ids, "kwargs": new_kwargs,
             "parent": node["id"], "method": "add_constraints", "task": task}, action)


def evolve(parents: list[dict], complete: Callable[[list[str]], list[str | None]], *, depth: int = 4,
           kinds: str = "all", seed: int = 0, iteration: int = 1, verifiable: bool = True, pool: list[dict] = (),
           fallback: bool = True, near_duplicate: float = 0.85, max_ratio: float = 2.0,
           max_constraints: int = constraints.MAX_CONSTRAINTS) -> tuple[list[dict], dict]:
    """Evolve every parent into a chain of up to `depth` children; returns (children, stats).

    One link per step for all chains at once, so `complete` is called once per step with every chain's creator
    message (it shards them over ranks); it returns, per message, one text or a list of candidates (None: a failed
    call). Every candidate is cleaned and checked against the index; the first that passes, in the order sampled,
    is the link, and the in-code constraint step makes it only when every candidate failed. Each chain draws its
    methods from its own generator, seeded by (seed, chain index): the children depend only on the parents, the
    seed and what `complete` returns, never on the rank.
    kinds: "all", "depth" (in-depth methods only) or "breadth". verifiable: the reward is the rules back-end, so
    add_constraints is done in code and LLM rewrites touch only the task (module docstring). fallback: a rejected
    LLM link is made by the in-code constraint step instead, when verifiable and add_constraints is among the
    allowed methods (a breadth-only ablation gets no constraint steps). Children are de-duplicated against the
    pool, the parents and each other: exactly (normalized prompt text) and near-exactly (character-3-gram Jaccard of
    the tasks >= near_duplicate, with the same constraints). A rejected link without a fallback yields no child and
    the chain goes on from its last kept prompt. max_ratio: the longest rewrite, relative to the parent's task.

    stats (JSON-ready): parents, kept, creator_calls (messages), candidates (texts returned), written (children
    written by the creator), rejected (failed candidates per cleaning.REJECT_REASONS), fallback, unsplittable
    (links whose prompt had no separable task: constraint steps only), per_method and per_kind (kept children),
    constraints_added / constraints_tightened (in-code steps), rule_sentences_dropped (from kept rewrites), and
    creator_per_method: per method sent to the creator, links, candidates, passed (candidates that passed),
    accepted (links it wrote) and rejected (per reason).
    """
    if depth < 1:
        raise ValueError(f"creator: evolve depth must be >= 1, got {depth}")
    methods = methods_for(kinds)
    ids_seen = [p["id"] for p in parents]
    if len(set(ids_seen)) != len(ids_seen):
        raise ValueError("creator: evolve got the same parent id twice")
    index = cleaning.new_index()
    for r in list(pool) + list(parents):
        cleaning.index_add(index, r)
    taken_ids = {r.get("id") for r in pool} | set(ids_seen)
    rejected = Counter({reason: 0 for reason in cleaning.REJECT_REASONS})
    table = {}  # method -> links asked, candidates, passed, accepted, rejected (per reason)
    stats = dict(parents=len(parents), kept=0, creator_calls=0, candidates=0, written=0, rejected=rejected,
                 fallback=0, unsplittable=0, per_method=Counter(), per_kind=Counter(), constraints_added=0,
                 constraints_tightened=0, rule_sentences_dropped=0, creator_per_method=table)
    can_fallback = verifiable and fallback and "add_constraints" in methods

    nodes, tasks, cons = [], [], []
    for p in parents:
        where = f"parent {p.get('id')}"
        ids, kwargs = _constraints(p, where) if verifiable else ([], [])
        nodes.append(p)
        tasks.append(constraints.split_task(p, verifiable))
        cons.append((ids, kwargs))
    rngs = [np.random.default_rng([seed & 0x7FFFFFFFFFFFFFFF, c]) for c in range(len(parents))]
    children = []
    for step in range(1, depth + 1):
        plan = [methods[int(rng.integers(len(methods)))] for rng in rngs]  # drawn first: the same on every rank
        ask = [c for c, m in enumerate(plan) if tasks[c] is not None and not (verifiable and m == "add_constraints")]
        outputs = {}
        if ask:
            raw = complete([render(plan[c], tasks[c]) for c in ask])
            stats["creator_calls"] += len(ask)
            if len(raw) != len(ask):
                raise ValueError(f"creator: the completer returned {len(raw)} outputs for {len(ask)} messages")
            outputs = {c: _candidates(o) for c, o in zip(ask, raw)}
            stats["candidates"] += sum(len(o) for o in outputs.values())
        for c, method in enumerate(plan):
            node, (ids, kwargs) = nodes[c], cons[c]
            root = parents[c]["id"]
            child, fallback_from = None, None
            if c in outputs:  # the creator's candidates, in sampled order: the first that passes is kept
                row = table.setdefault(method, dict(links=0, candidates=0, passed=0, accepted=0, rejected=Counter()))
                row["links"] += 1
                dropped = False
                for raw in outputs[c]:
                    made, reason, cut = _written_child(node, tasks[c], raw, ids, kwargs, method, index,
                                                       verifiable=verifiable, max_ratio=max_ratio,
                                                       near_duplicate=near_duplicate)
                    row["candidates"] += 1
                    if made is None:
                        rejected[reason] += 1
                        row["rejected"][reason] += 1
                        continue
                    row["passed"] += 1
                    if child is None:
                        child, dropped = made, cut
                if child is not None:
                    child.update(iteration=iteration, step=step, root=root)
                    row["accepted"] += 1
                    stats["written"] += 1
                    stats["rule_sentences_dropped"] += int(dropped)
                if child is None:
                    if not can_fallback:
                        continue
                    fallback_from = method
            elif tasks[c] is None:
                stats["unsplittable"] += 1
                if not can_fallback:
                    continue
                fallback_from = method if method != "add_constraints" else None
            if child is None:  # the in-code constraint step (drawn, or a fallback)
                made = _constraint_child(node, tasks[c], ids, kwargs, rngs[c], max_constraints)
                if made is None:
                    rejected["no_constraint_step"] += 1
                    continue
                child, action = made
                child.update(iteration=iteration, step=step, root=root, fallback_from=fallback_from)
                dup = cleaning.index_find(index, child, near_duplicate)
                if dup:
                    rejected[dup] += 1
                    continue
                stats["fallback"] += int(fallback_from is not None)
                stats["constraints_added" if action.startswith("added") else "constraints_tightened"] += 1
            child["id"] = _unique_id(f"{root}.i{iteration}.{step}", taken_ids)
            taken_ids.add(child["id"])
            cleaning.index_add(index, child)
            children.append(child)
            nodes[c], tasks[c], cons[c] = child, child["task"], (child["instruction_id_list"], child["kwargs"])
            stats["per_method"][child["method"]] += 1
            stats["per_kind"][EVOLVE_METHODS[child["method"]].kind] += 1
    stats["kept"] = len(children)
    for row in table.values():
        row["rejected"] = {k: v for k, v in row["rejected"].items() if v}
    stats = {k: dict(v) if isinstance(v, Counter) else v for k, v in stats.items()}
    return children, stats


def evolve_with(cfg, parents: list[dict], complete, t: int, pool: list[dict]) -> tuple[list[dict], dict]:
    """evolve with a run's settings (cfg: evolve_depth, evolve_kinds, seed, reward) as iteration or round t."""
    return evolve(parents, complete, depth=cfg.evolve_depth, kinds=cfg.evolve_kinds,
                  seed=parallel.stable_seed(cfg.seed, t, "evolve"), iteration=t,
                  verifiable=reward.is_verifiable(cfg.reward), pool=pool)


def _candidates(output) -> list:
    """A completer's output for one message as a list of candidates: a list as it is, one text (or None) as one."""
    if isinstance(output, (list, tuple)):
        return list(output) or [None]  # no candidate at all counts as one failed call
    return [output]


def _written_child(node: dict, task: str, raw: str | None, ids: list[str], kwargs: list[dict], method: str,
                   index: dict, *, verifiable: bool, max_ratio: float,
                   near_duplicate: float) -> tuple[dict | None, str, bool]:
    """(child, "ok", whether rule sentences were cut from it) for a creator candidate that passes cleaning and
    de-duplication, else (None, the reason, False). The child's iteration, step and root are set by evolve."""
    examples = tuple(text for pair in EVOLVE_METHODS[method].examples for text in pair)
    text, reason = cleaning.clean_rewrite(task, raw, max_ratio=max_ratio, examples=examples, echoes=ECHO_MARKERS,
                                          near_duplicate=near_duplicate)
    if text is None:
        return None, reason, False
    cut = False
    if verifiable and ids:
        kept_text = constraints.drop_rule_sentences(text)
        if not kept_text:
            return None, "empty", False
        cut, text = kept_text != text.strip(), kept_text
    child = _child(node, task=text, ids=ids, kwargs=kwargs, method=method, iteration=0, step=0, root="",
                   fallback_from=None, verifiable=verifiable)
    dup = cleaning.index_find(index, child, near_duplicate)
    return (None, dup, False) if dup else (child, "ok", cut)


def _unique_id(base: str, taken: set) -> str:
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


# ============================================================================================ creator back-ends

def local_completer(model, tokenizer, *, seed: int = 0, batch_size: int = 16, candidates: int = 1,
                    stop: tuple[str, ...] = STOP, chat: bool = False,
                    **sample_kwargs) -> Callable[[list[str]], list[list[str]]]:
    """A `complete` that asks a local model (the solver itself, or any loaded model) through generate.sample:
    `candidates` texts per message, sampled in one batch, each cut at the first of `stop`.

    chat=False: the message is continued as plain text (the template ends with the label of the answer), which a
    small model follows more often than a chat turn. The messages are sharded over ranks (parallel.sharded);
    message i of the c-th call samples with a seed made of (seed, c, i), so the outputs do not depend on the number
    of ranks or on the batch. sample_kwargs go to generate.sample (max_new_tokens, temperature, top_p, ...);
    batch_size (messages) is halved after an out-of-memory error.
    """
    import generate
    if candidates < 1:
        raise ValueError(f"creator: candidates must be >= 1, got {candidates}")
    calls = [0]

    def complete(messages: list[str]) -> list[list[str]]:
        call = calls[0]
        calls[0] += 1

        def run(local: list[tuple[int, str]]) -> list[list[str]]:
            out = parallel.halve_on_oom(lambda size: generate.sample(
                model, tokenizer, [m for _, m in local], n=candidates,
                seeds=[parallel.stable_seed(seed, call, i) for i, _ in local], batch_size=size, stop=list(stop),
                chat=chat, **sample_kwargs), batch_size, "creator: sampling")
            return [list(texts) for texts in out.texts]

        return parallel.sharded(run, list(enumerate(messages)), desc="creator")

    return complete


def endpoint_completer(base_url: str, model: str, *, temperature: float = 0.7, max_tokens: int = 512,
                       concurrency: int = 8, candidates: int = 1,
                       **kwargs) -> Callable[[list[str]], list[list[str | None]]]:
    """A `complete` that asks an OpenAI-compatible server (vLLM, LiteLLM, a hosted model) via endpoint.chat_many:
    `candidates` chat calls per message (a call that failed after its retries gives None, rejected as "failed").

    The calls are sharded over ranks; when every call of a batch fails the endpoint itself is down and
    EndpointError is raised on every rank. kwargs go to endpoint.chat (timeout, retries, api_key_env, extra).
    """
    import endpoint
    if candidates < 1:
        raise ValueError(f"creator: candidates must be >= 1, got {candidates}")

    def run(local: list[str]) -> list[str | None]:
        try:
            return endpoint.chat_many(base_url, model, [[{"role": "user", "content": m}] for m in local],
                                      concurrency=concurrency, temperature=temperature, max_tokens=max_tokens, **kwargs)
        except endpoint.EndpointError as err:
            print(f"creator: {err}", file=sys.stderr)
            return [None] * len(local)  # raising on one rank only would leave the others waiting in the gather

    def complete(messages: list[str]) -> list[list[str | None]]:
        out = parallel.sharded(run, [m for m in messages for _ in range(candidates)], desc="creator endpoint")
        if out and all(o is None for o in out):
            raise endpoint.EndpointError(f"creator endpoint {base_url} ({model}): all {len(out)} calls failed")
        return [out[i:i + candidates] for i in range(0, len(out), candidates)]

    return complete


# ============================================================================================ pairs and the mix

def make_pairs(prompts: list[dict], samples: list[dict], source: str) -> list[dict]:
    """One pair per sample record: chosen = highest reward, rejected = lowest (first of equals), none when the
    rewards all tie or the two texts are identical. Responses with a non-finite reward are left out. p_chosen and
    p_rejected are the SPPO win probabilities of those two among the prompt's scored samples; chosen_finish and
    rejected_finish say how each response ended ("stop" or "length"; "stop" where the samples do not say)."""
    by_id = {p.get("id", p.get("key")): p for p in prompts}
    pairs = []
    for s in samples:
        if s["prompt_id"] not in by_id:
            raise ValueError(f"creator: sample for prompt '{s['prompt_id']}' has no prompt record")
        if len(s["responses"]) != len(s["rewards"]):
            raise ValueError(f"creator: prompt '{s['prompt_id']}' has {len(s['responses'])} responses but "
                             f"{len(s['rewards'])} rewards")
        keep = [i for i, r in enumerate(s["rewards"]) if r is not None and math.isfinite(r)]
        r = np.array([s["rewards"][i] for i in keep], dtype=np.float64)  # [n]
        if _ties(r):
            continue
        best, worst = int(np.argmax(r)), int(np.argmin(r))
        chosen, rejected = s["responses"][keep[best]], s["responses"][keep[worst]]
        if chosen == rejected:
            continue
        p = losses.win_probabilities(r[None])[0]  # [1, n] -> [n], float64
        finish = s.get("finish") or ["stop"] * len(s["responses"])
        pairs.append(dict(prompt_id=s["prompt_id"], prompt=by_id[s["prompt_id"]]["prompt"], chosen=chosen,
                          rejected=rejected, chosen_reward=float(r[best]), rejected_reward=float(r[worst]),
                          p_chosen=float(p[best]), p_rejected=float(p[worst]), chosen_finish=finish[keep[best]],
                          rejected_finish=finish[keep[worst]], source=source))
    return pairs


def mix(evolved_pairs: list[dict], original_pairs: list[dict], *, evolved_fraction: float = 0.8,
        total: int | None = None, seed: int = 0) -> list[dict]:
    """The training pairs: a fraction from evolved prompts, the rest from the original pool, shuffled (seeded).

    total None: every evolved pair plus round(E * (1 - f) / f) original pairs (as many as exist); with no evolved
    pairs at all, every original pair (an iteration whose children all tied still trains). total given:
    round(total * f) evolved and the rest original; a side that runs short is topped up from the other. Each pair's
    "source" is set to "evolved" or "original".
    """
    if not 0.0 <= evolved_fraction <= 1.0:
        raise ValueError(f"creator: evolved_fraction must be in [0, 1], got {evolved_fraction}")
    rng = np.random.default_rng(seed)
    n_e, n_o = len(evolved_pairs), len(original_pairs)
    if total is None:
        if n_e == 0 or evolved_fraction == 0:
            want_e, want_o = 0, n_o
        else:
            want_e = n_e
            want_o = min(n_o, int(math.floor(n_e * (1 - evolved_fraction) / evolved_fraction + 0.5)))
    else:
        if total < 0:
            raise ValueError(f"creator: mix total must be >= 0, got {total}")
        want_e, want_o = split_counts(total, evolved_fraction, n_e, n_o)
    pick_e = rng.choice(n_e, size=want_e, replace=False) if want_e else []
    pick_o = rng.choice(n_o, size=want_o, replace=False) if want_o else []
    out = [{**evolved_pairs[int(i)], "source": "evolved"} for i in pick_e]
    out += [{**original_pairs[int(i)], "source": "original"} for i in pick_o]
    return [out[int(i)] for i in rng.permutation(len(out))]
