"""MT-Bench: two-turn answers in FastChat's format, single-answer grading (1-10) by a judge, FastChat's aggregation.

    python eval/mt_bench.py --model runs/gemma/iter_1/model \
        --questions ../shared/data/mt_bench_questions.jsonl \
        --judge_prompts ../shared/data/mt_bench_judge_prompts.jsonl \
        --reference_answers ../shared/data/mt_bench_reference_answers_gpt-4.jsonl \
        --judge_url http://localhost:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct --out runs/gemma/mt_bench.json
    python eval/mt_bench.py --show some_model_single.jsonl     # aggregate an existing FastChat judgment file

Answers: turn 1 is the first question as one user message; turn 2 is the whole conversation so far rendered with
the model's chat template. Sampling follows FastChat's per-category temperatures (writing and roleplay 0.7, stem and
humanities 0.1, the rest greedy) unless --temperature is given; up to 1024 new tokens per turn. They go to
<out>_answers.jsonl in FastChat's model_answer format, so FastChat's gen_judgment can judge them too.

Judging, as FastChat's `single` mode: every answer turn is rated 1-10 with the judge prompts read from the file
given (single-v1 for turn 1, single-v1-multi-turn for turn 2; the single-math-v1 pair, with the reference answers,
for the math, reasoning and coding questions), judge temperature 0 and up to 2048 tokens. The rating is the first
"[[x]]" in the reply, else the first "[x]"; a reply with neither scores -1. Aggregation drops the -1 rows and
averages per turn and over all rows. Judgments go to <out>_judgments.jsonl in FastChat's format; calls that failed
after retries are reported by question id and turn (scored -1, so dropped).
"""
import argparse
import ast
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

TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}  # FastChat's gen_model_answer defaults
NEED_REF = ("math", "reasoning", "coding", "arena-hard-200")
PROMPT_NAMES = {(False, 1): "single-v1", (False, 2): "single-v1-multi-turn",
                (True, 1): "single-math-v1", (True, 2): "single-math-v1-multi-turn"}
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(judgment: str | None) -> float:
    """The judge's rating: first [[x]], else first [x]; -1 when there is none."""
    if not judgment:
        return -1
    match = RATING.search(judgment) or RATING_BACKUP.search(judgment)
    return ast.literal_eval(match.group(1)) if match else -1


def aggregate(judgments: list[dict]) -> dict:
    """FastChat's show_result for single grading: -1 rows dropped, mean score per turn and overall."""
    rows = [(j["turn"], float(j["score"])) for j in judgments if j["score"] != -1]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return dict(turn1=mean([s for t, s in rows if t == 1]), turn2=mean([s for t, s in rows if t == 2]),
                overall=mean([s for _, s in rows]), n_rated=len(rows), n_dropped=len(judgments) - len(rows))


def read_by_id(path, what: str, check) -> dict:
    table = {}
    for n, row in files.numbered_jsonl(path):
        where = f"{path}:{n}"
        check(row, where)
        table[common.field(row, "question_id", where)] = row
    if not table:
        raise ValueError(f"{path}: no {what}")
    return table


def _check_question(row: dict, where: str) -> None:
    common.field(row, "category", where, str)
    turns = common.field(row, "turns", where, list)
    if len(turns) != 2 or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"{where}: 'turns' must be two strings")


def _check_answer(row: dict, where: str) -> None:
    try:
        turns = row["choices"][0]["turns"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"{where}: expected choices[0].turns") from None
    if len(turns) != 2 or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"{where}: choices[0].turns must be two strings")


def _check_prompt(row: dict, where: str) -> None:
    for key in ("name", "system_prompt", "prompt_template"):
        common.field(row, key, where, str)


def generate_two_turns(model, tokenizer, questions: list[dict], args) -> list[list[str]]:
    """Both answer turns of every question; questions are grouped by their sampling temperature."""
    answers = [[None, None] for _ in questions]
    for turn in (0, 1):
        groups = {}
        for i, q in enumerate(questions):
            temp = args.temperature if args.temperature is not None else TEMPERATURE.get(q["category"], 0.7)
            groups.setdefault(temp, []).append(i)
        for temp, idx in sorted(groups.items()):
            convs = []
            for i in idx:
                q = questions[i]
                conv = [{"role": "user", "content": q["turns"][0]}]
                if turn == 1:
                    conv += [{"role": "assistant", "content": answers[i][0]}, {"role": "user", "content": q["turns"][1]}]
                convs.append(conv)
            kwargs = {**common.sample_kwargs(args), "temperature": temp}
            # a different seed per turn, so a sampled turn 2 does not replay turn 1's random stream
            kwargs["seed"] = args.seed * 2 + turn
            for i, text in zip(idx, common.generate_answers(model, tokenizer, convs, **kwargs)):
                answers[i][turn] = text
    return answers


def judge_all(args, questions: list[dict], answers: dict, prompts: dict, refs: dict) -> list[dict]:
    """One FastChat judgment record per (question, turn)."""
    jobs = []
    for q in questions:
        qid, needs_ref = q["question_id"], q["category"] in NEED_REF
        a = answers[qid]["choices"][0]["turns"]
        if needs_ref and qid not in refs:
            raise ValueError(f"question {qid} ({q['category']}): no reference answer in {args.reference_answers}")
        r = refs[qid]["choices"][0]["turns"] if needs_ref else ["", ""]
        for turn in (1, 2):
            prompt = prompts[PROMPT_NAMES[(needs_ref, turn)]]
            fill = dict(question=q["turns"][0], answer=a[0], question_1=q["turns"][0], question_2=q["turns"][1],
                        answer_1=a[0], answer_2=a[1], ref_answer_1=r[0], ref_answer_2=r[1])
            try:
                user = prompt["prompt_template"].format(**fill)
            except (KeyError, IndexError) as err:
                raise ValueError(f"judge prompt '{prompt['name']}': unknown placeholder {err}") from None
            jobs.append(dict(question_id=qid, model=args.model_name, judge=[args.judge_model, prompt["name"]],
                             user_prompt=user, turn=turn, system=prompt["system_prompt"]))
    replies = common.judge_many(args, [[{"role": "system", "content": j["system"]},
                                        {"role": "user", "content": j["user_prompt"]}] for j in jobs],
                                temperature=0.0, max_tokens=args.judge_max_tokens)
    out = []
    for job, reply in zip(jobs, replies):
        job.pop("system")
        out.append(dict(job, judgment=reply, score=parse_rating(reply), failed=reply is None, tstamp=time.time()))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", help="FastChat's mt_bench question.jsonl")
    parser.add_argument("--judge_prompts", help="FastChat's judge_prompts.jsonl")
    parser.add_argument("--reference_answers", help="reference answers for math/reasoning/coding (gpt-4.jsonl)")
    parser.add_argument("--answers", help="answer file: written when --model is given, read otherwise")
    parser.add_argument("--show", help="only aggregate this FastChat single-judgment file and print the result")
    parser.add_argument("--out", default="mt_bench.json")
    common.add_generation_args(parser, max_new_tokens=1024, temperature=None)
    common.add_judge_args(parser, judge_max_tokens=2048)
    args = parser.parse_args(argv)
    if args.show:
        rows = []
        for n, row in files.numbered_jsonl(args.show):
            common.field(row, "turn", f"{args.show}:{n}", int)
            common.field(row, "score", f"{args.show}:{n}", (int, float))
            rows.append(row)
        res = aggregate(rows)
        print(f"mt-bench {args.show}: turn 1 {res['turn1']:.4f}, turn 2 {res['turn2']:.4f}, "
              f"overall {res['overall']:.4f} ({res['n_rated']} rated, {res['n_dropped']} dropped)")
        return
    if not args.questions:
        raise ValueError("--questions is required (or --show FILE)")
    args.model_name = common.model_name(args)
    answers_path = Path(args.answers or common.beside(args.out, "answers.jsonl"))
    questions = list(read_by_id(args.questions, "questions", _check_question).values())[: args.limit or None]

    if args.model:
        model, tokenizer = common.load_solver(args)
        texts = generate_two_turns(model, tokenizer, questions, args)
        if not parallel.is_main():
            return
        files.write_jsonl(answers_path, [dict(question_id=q["question_id"], answer_id=uuid.uuid4().hex,
                                               model_id=args.model_name, choices=[dict(index=0, turns=t)],
                                               tstamp=time.time()) for q, t in zip(questions, texts)])
    elif not args.answers:
        raise ValueError("give --model to generate answers or --answers to judge an existing answer file")
    if not args.judge_url:
        print(f"mt-bench {args.model_name}: {len(questions)} answers -> {answers_path} (no --judge_url, not judged)")
        return
    if not args.judge_prompts:
        raise ValueError("judging needs --judge_prompts")
    prompts = {}
    for n, row in files.numbered_jsonl(args.judge_prompts):
        _check_prompt(row, f"{args.judge_prompts}:{n}")
        prompts[row["name"]] = row
    for name in PROMPT_NAMES.values():
        if name not in prompts:
            raise ValueError(f"{args.judge_prompts}: no judge prompt named '{name}'")
    needs_refs = any(q["category"] in NEED_REF for q in questions)
    if needs_refs and not args.reference_answers:
        raise ValueError("math/reasoning/coding questions need --reference_answers")
    refs = read_by_id(args.reference_answers, "reference answers", _check_answer) if needs_refs else {}
    answers = read_by_id(answers_path, "answers", _check_answer)
    for q in questions:
        if q["question_id"] not in answers:
            raise ValueError(f"question {q['question_id']}: not in {answers_path}")
    args.judge_model = args.judge_model or "gpt-4"  # FastChat's default judge

    judgments = judge_all(args, questions, answers, prompts, refs)
    files.write_jsonl(common.beside(args.out, "judgments.jsonl"), judgments)
    result = aggregate(judgments)
    failed = [f"{j['question_id']}/turn{j['turn']}" for j in judgments if j["failed"]]
    by_cat = {}
    for q in questions:
        scores = [j["score"] for j in judgments if j["question_id"] == q["question_id"] and j["score"] != -1]
        by_cat.setdefault(q["category"], []).extend(scores)
    result.update(benchmark="mt-bench", model=args.model_name, judge=args.judge_model, n_questions=len(questions),
                  failed=failed, by_category={c: float(np.mean(s)) if s else None for c, s in by_cat.items()},
                  answers_file=str(answers_path))
    common.write_json(args.out, result)
    print(f"mt-bench {args.model_name} (judge {args.judge_model}): turn 1 {result['turn1']:.2f}, turn 2 "
          f"{result['turn2']:.2f}, overall {result['overall']:.2f}; {len(failed)} failed, "
          f"{result['n_dropped']} dropped -> {args.out}")


if __name__ == "__main__":
    common.run(main)
