"""Arena-Hard (v0.1): answers in the official format, pairwise judging against the baseline, the official score.

    python eval/arena_hard.py --model runs/gemma/iter_1/model \
        --questions ../shared/data/arena_hard_v0.1_questions.jsonl \
        --baseline_answers ../shared/data/arena_hard_v0.1_gpt-4-0314_baseline_answers.jsonl \
        --judge_config ../shared/data/arena_hard_v0.1_judge_config.json \
        --judge_url http://localhost:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct --out runs/gemma/arena_hard.json
    python eval/arena_hard.py --answers runs/gemma/arena_hard_answers.jsonl ...   # judge answers made before

Answers (greedy, up to 4096 new tokens: the official gen_answer settings) go to <out>_answers.jsonl in
arena-hard-auto's model_answer format, so its own gen_judgment/show_result can judge them too. Without --judge_url
the script stops there. The judge's system prompt, template, verdict pattern, temperature, max_tokens and number of
attempts come from the official judge config given by path (YAML, or the JSON copy in shared/data).

Protocol, as in arena-hard-auto v0.1: each question is judged twice, game 1 with the baseline as assistant A and
game 2 with the order swapped. A reply's verdict is the unique label the config's pattern finds; when it finds none
the judge is asked to finish its judgment (up to number_of_judgment_attempts replies), when it finds conflicting
labels the game counts for nothing. Each game becomes battles: a slight win 1 battle, a strong one (>>) 3, a tie 1
battle worth 1/2. The score is the Bradley-Terry win probability against the baseline; with only the two models in
the fit it equals the mean battle outcome, which is what is reported (bradley_terry() is there to check it). The
95% interval is the 2.5/97.5 percentile of 100 bootstrap resamples of the battles (as upstream; seeded).
Judgments go to <out>_judgments.jsonl in the official format; calls that failed after retries are listed by
question id.
"""
import argparse
import re
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval import common  # noqa: E402
import files  # noqa: E402
import parallel  # noqa: E402

CONTINUE = "Continue your judgment and finish by outputting a final verdict label."  # asked when no label was found
# (model's outcome, strong?) per label, by game: in game 1 assistant A is the baseline, in game 2 the model.
GAME1 = {"A>>B": (0.0, True), "A>B": (0.0, False), "A=B": (0.5, False), "B>A": (1.0, False), "B>>A": (1.0, True)}
GAME2 = {"A>>B": (1.0, True), "A>B": (1.0, False), "A=B": (0.5, False), "B>A": (0.0, False), "B>>A": (0.0, True)}


def parse_verdict(judgment: str, pattern: str) -> tuple[str | None, bool]:
    """(label, ask_again): the label when the pattern finds exactly one distinct one; ask again when it finds none."""
    labels = {m.strip("\n") for m in re.findall(pattern, judgment) if m != ""}
    if not labels:
        return None, True
    return (labels.pop(), False) if len(labels) == 1 else (None, False)


def battle_outcomes(game1: str | None, game2: str | None, weight: int = 3) -> list[float]:
    """The model's outcome (1 win, 1/2 tie, 0 loss) in each battle a question's two verdicts make."""
    battles = []
    for table, label in ((GAME1, game1), (GAME2, game2)):
        if label in table:  # any other label (or none) makes no battle, as upstream
            outcome, strong = table[label]
            battles += [outcome] * (weight if strong else 1)
    return battles


def arena_score(outcomes: list[float], n_boot: int = 100, seed: int = 42) -> dict:
    """Win rate against the baseline (in %) with its 95% bootstrap interval over battles."""
    x = np.asarray(outcomes, dtype=float)
    if len(x) == 0:
        return dict(score=float("nan"), ci_low=float("nan"), ci_high=float("nan"), n_battles=0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)  # [n_boot]
    return dict(score=100 * float(x.mean()), ci_low=100 * float(np.percentile(means, 2.5)),
                ci_high=100 * float(np.percentile(means, 97.5)), n_battles=len(x))


def bradley_terry(battles: list[tuple[str, str, float]], anchor: str, scale: float = 400.0, base: float = 10.0,
                  init: float = 1000.0) -> dict[str, float]:
    """Elo-scale Bradley-Terry ratings from (model_a, model_b, outcome for a) battles, anchor fixed at `init`.

    The maximum-likelihood logistic fit arena-hard-auto makes (a tie is half a win each way), by Newton's method.
    P(a beats b) = 1 / (1 + base ** ((r_b - r_a) / scale)).
    """
    models = sorted({m for a, b, _ in battles for m in (a, b)})
    assert anchor in models, f"anchor {anchor!r} is in no battle"
    free = [m for m in models if m != anchor]
    col = {m: i for i, m in enumerate(free)}
    X = np.zeros((len(battles), len(free)))  # [N, M-1] +1 for a, -1 for b, the anchor's column left out
    for row, (a, b, _) in enumerate(battles):
        if a in col:
            X[row, col[a]] += 1.0
        if b in col:
            X[row, col[b]] -= 1.0
    y = np.array([o for _, _, o in battles], dtype=float)  # [N]
    theta = np.zeros(len(free))  # natural-log strengths
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-X @ theta))  # [N]
        grad = X.T @ (y - p)
        hess = X.T @ (X * (p * (1 - p))[:, None]) + 1e-9 * np.eye(len(free))
        step = np.linalg.solve(hess, grad)
        theta += step
        if np.abs(step).max() < 1e-12:
            break
    ratings = {anchor: init}
    ratings.update({m: init + scale * theta[col[m]] / np.log(base) for m in free})
    return ratings


def bt_win_rate(ratings: dict[str, float], model: str, baseline: str, scale: float = 400.0, base: float = 10.0):
    return 1.0 / (1.0 + base ** ((ratings[baseline] - ratings[model]) / scale))


def read_questions(path) -> list[dict]:
    questions = []
    for n, row in files.numbered_jsonl(path):
        where = f"{path}:{n}"
        common.field(row, "question_id", where)
        turns = common.field(row, "turns", where, list)
        if not turns or not isinstance(turns[0], dict) or not isinstance(turns[0].get("content"), str):
            raise ValueError(f"{where}: 'turns' must start with {{\"content\": str}}")
        questions.append(row)
    return questions


def read_answers(path) -> dict:
    """question_id -> first-turn answer text, from a file in arena-hard-auto's model_answer format."""
    answers = {}
    for n, row in files.numbered_jsonl(path):
        where = f"{path}:{n}"
        choices = common.field(row, "choices", where, list)
        try:
            answers[common.field(row, "question_id", where)] = choices[0]["turns"][0]["content"]
        except (IndexError, KeyError, TypeError):
            raise ValueError(f"{where}: expected choices[0].turns[0].content") from None
    return answers


def judge_questions(args, config: dict, questions: list[dict], answers: dict, baseline: dict) -> list[dict]:
    """Both games of every question, with the follow-up asks; one official judgment record per question."""
    templates = config["prompt_template"]
    templates = [templates] if isinstance(templates, str) else templates
    games = []  # one per (question, game): the conversation and what the judge has said so far
    for q in questions:
        qid, text = q["question_id"], q["turns"][0]["content"]
        for g, (first, second) in enumerate([(baseline[qid], answers[qid]), (answers[qid], baseline[qid])]):
            conv = [{"role": "system", "content": config["system_prompt"]}]
            try:
                conv += [{"role": "user", "content": t.format(question_1=text, answer_1=first, answer_2=second)}
                         for t in templates]
            except (KeyError, IndexError) as err:
                raise ValueError(f"judge config: prompt_template has an unknown placeholder {err}") from None
            games.append(dict(qid=qid, game=g, conv=conv, judgment="", score=None, failed=False, done=False))
    max_tokens = args.judge_max_tokens or int(config.get("max_tokens", 4096))
    attempts = int(config.get("number_of_judgment_attempts", 1))
    for attempt in range(attempts):
        pending = [g for g in games if not g["done"]]
        if not pending:
            break
        replies = common.judge_many(args, [g["conv"] for g in pending], temperature=float(config.get("temperature", 0)),
                                    max_tokens=max_tokens)
        for g, reply in zip(pending, replies):
            if reply is None:
                g.update(failed=True, done=True)
                continue
            g["judgment"] += "\n" + reply
            g["score"], ask_again = parse_verdict(g["judgment"], config["regex_pattern"])
            g["conv"].append({"role": "assistant", "content": reply})
            g["done"] = not ask_again
            if ask_again and attempt + 1 < attempts:
                g["conv"].append({"role": "user", "content": CONTINUE})
    records = []
    for i in range(0, len(games), 2):
        pair = games[i:i + 2]
        records.append(dict(question_id=pair[0]["qid"], model=args.model_name, judge=args.judge_model,
                            failed=any(g["failed"] for g in pair),
                            games=[dict(user_prompt=g["conv"][1]["content"], judgment=g["judgment"], score=g["score"])
                                   for g in pair], tstamp=time.time()))
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", required=True, help="arena-hard question.jsonl")
    parser.add_argument("--baseline_answers", help="the baseline's answers (model_answer format), e.g. gpt-4-0314")
    parser.add_argument("--judge_config", help="arena-hard-auto's judge_config.yaml (or its JSON copy)")
    parser.add_argument("--answers", help="answer file: written when --model is given, read otherwise")
    parser.add_argument("--out", default="arena_hard.json")
    parser.add_argument("--weight", type=int, default=3, help="battles per strong verdict (>>)")
    common.add_generation_args(parser, max_new_tokens=4096)
    common.add_judge_args(parser)
    args = parser.parse_args(argv)
    args.model_name = common.model_name(args)
    answers_path = Path(args.answers or common.beside(args.out, "answers.jsonl"))

    questions = read_questions(args.questions)[: args.limit or None]
    if args.model:
        model, tokenizer = common.load_solver(args)
        texts = common.generate_answers(model, tokenizer, [q["turns"][0]["content"] for q in questions],
                                        **common.sample_kwargs(args))
        if not parallel.is_main():
            return
        files.write_jsonl(answers_path, [
            dict(question_id=q["question_id"], answer_id=uuid.uuid4().hex, model_id=args.model_name,
                 choices=[dict(index=0, turns=[dict(content=t, token_len=common.token_count(tokenizer, t))])],
                 tstamp=time.time()) for q, t in zip(questions, texts)])
    elif not args.answers:
        raise ValueError("give --model to generate answers or --answers to judge an existing answer file")
    if not args.judge_url:
        print(f"arena-hard {args.model_name}: {len(questions)} answers -> {answers_path} (no --judge_url, not judged)")
        return
    if not (args.baseline_answers and args.judge_config):
        raise ValueError("judging needs --baseline_answers and --judge_config")
    config = common.read_config(args.judge_config)
    for key in ("system_prompt", "prompt_template", "regex_pattern"):
        common.field(config, key, str(args.judge_config))
    args.judge_model = args.judge_model or config.get("judge_model")
    answers, baseline = read_answers(answers_path), read_answers(args.baseline_answers)
    for q in questions:
        for name, table in (("answers", answers), ("baseline answers", baseline)):
            if q["question_id"] not in table:
                raise ValueError(f"question {q['question_id']}: not in the {name}")

    judgments = judge_questions(args, config, questions, answers, baseline)
    files.write_jsonl(common.beside(args.out, "judgments.jsonl"), judgments)
    outcomes = [o for j in judgments for o in battle_outcomes(j["games"][0]["score"], j["games"][1]["score"],
                                                              args.weight)]
    result = arena_score(outcomes)
    failed = [j["question_id"] for j in judgments if j["failed"]]
    unparsed = sum(g["score"] is None for j in judgments if not j["failed"] for g in j["games"])
    result.update(benchmark="arena-hard", model=args.model_name, baseline=config.get("baseline_model"),
                  judge=args.judge_model, n_questions=len(questions), failed=failed, unparsed_games=unparsed,
                  verdicts={lab: sum(g["score"] == lab for j in judgments for g in j["games"])
                            for lab in GAME1}, answers_file=str(answers_path))
    common.write_json(args.out, result)
    print(f"arena-hard {args.model_name} vs {result['baseline']} (judge {args.judge_model}): {result['score']:.1f} "
          f"[{result['ci_low']:.1f}, {result['ci_high']:.1f}] over {result['n_battles']} battles; "
          f"{len(failed)} failed, {unparsed} unparsed -> {args.out}")


if __name__ == "__main__":
    common.run(main)
