"""Instruction-following accuracy (IFEval's strict prompt- and instruction-level) of any checkpoint, offline.

    python eval/ifeval.py --model default                                   # the repo's held-out prompts
    python eval/ifeval.py --model runs/demo/iter_1/adapter --max_new_tokens 128 --out runs/demo/ifeval.json
    python eval/ifeval.py --model google/gemma-2-9b-it --prompts ../shared/data/ifeval_input_data.jsonl
    torchrun --nproc_per_node=8 eval/ifeval.py --model runs/gemma/iter_1/model --prompts <official file>

Any IFEval-format file works ({"key" or "id", "prompt", "instruction_id_list", "kwargs"} per line); the official
541-prompt file is read from the path given. Answers are greedy by default (IFEval has no sampling convention; the
usual reports use greedy decoding) and are checked by instructions.py, which implements all 25 of IFEval's
instruction ids, so every prompt of the official file is scored. A file of another IFEval-style benchmark may hold
ids beyond those: its prompts with one are left out of both accuracies, and a coverage line says how many. The
responses are also written in the official tool's input format ({"prompt", "response"} per line,
`<out>_responses.jsonl`), so google-research's evaluation_main can score them too.
"""
import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval import common  # noqa: E402
import files  # noqa: E402
import instructions  # noqa: E402
import parallel  # noqa: E402

DEFAULT_PROMPTS = common.ROOT / "data" / "heldout_prompts.jsonl"


def read_records(path: str | Path) -> list[dict]:
    """IFEval-format records; a malformed line raises naming file and line (unsupported ids are not an error)."""
    records = []
    for n, row in files.numbered_jsonl(path):
        where = f"{path}:{n}"
        common.field(row, "prompt", where, str)
        ids = common.field(row, "instruction_id_list", where, list)
        kwargs = row.get("kwargs") or [{}] * len(ids)
        if not isinstance(kwargs, list) or len(kwargs) != len(ids):
            raise ValueError(f"{where}: 'kwargs' must be a list with one dict per instruction id ({len(ids)})")
        if instructions.is_supported(row):
            instructions.validate_record(row, where)
        records.append(row)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


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
        if unsupported == "skip" and not instructions.is_supported(record):
            skipped += 1
            continue
        strict = instructions.check_instructions(record, response)
        loose = instructions.check_instructions(record, response, loose=True)
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


def coverage(records: list[dict]) -> dict:
    """How much of a file the rules can score: prompts and instructions in total and scored, unsupported ids."""
    scored = [r for r in records if instructions.is_supported(r)]
    unsupported = collections.Counter(i for r in records for i in r["instruction_id_list"]
                                      if i not in instructions.SUPPORTED_IDS)
    return dict(prompts=len(records), prompts_scored=len(scored),
                instructions=sum(len(r["instruction_id_list"]) for r in records),
                instructions_scored=sum(len(r["instruction_id_list"]) for r in scored),
                unsupported_ids=dict(unsupported))


def coverage_line(cov: dict) -> str:
    return (f"IFEval coverage: {cov['prompts_scored']}/{cov['prompts']} prompts, {cov['instructions_scored']}/"
            f"{cov['instructions']} instructions scored; left out (unsupported ids): {cov['unsupported_ids']}")


def evaluate_ifeval(model, tokenizer, records: list[dict], **sample_kwargs) -> dict:
    """Greedy answers (unless told otherwise) to every record, sharded over ranks; IFEval accuracies of the scorable.

    Returns prompt_level, instruction_level (strict), their loose variants, n_prompts, n_instructions, coverage,
    per_instruction and responses (one per record, in order). Identical on every rank.
    """
    sample_kwargs = {"temperature": 0.0, **sample_kwargs}
    responses = common.generate_answers(model, tokenizer, [r["prompt"] for r in records], **sample_kwargs)
    result = ifeval_accuracy(records, responses, unsupported="skip")
    result["coverage"] = coverage(records)
    result["responses"] = responses
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="IFEval-format JSON Lines")
    parser.add_argument("--out", default="ifeval.json", help="results JSON; responses go to <out>_responses.jsonl")
    common.add_generation_args(parser, max_new_tokens=1024, model_required=True)
    args = parser.parse_args(argv)

    records = read_records(args.prompts)[: args.limit or None]
    cov = coverage(records)
    if cov["prompts_scored"] < cov["prompts"]:
        parallel.print0(coverage_line(cov))
    if cov["prompts_scored"] == 0:
        raise ValueError(f"{args.prompts}: no prompt has only supported instruction ids ({coverage_line(cov)})")
    model, tokenizer = common.load_solver(args)
    result = evaluate_ifeval(model, tokenizer, records, **common.sample_kwargs(args))
    if not parallel.is_main():
        return
    responses = result.pop("responses")
    responses_path = common.beside(args.out, "responses.jsonl")
    files.write_jsonl(responses_path, [{"prompt": r["prompt"], "response": a} for r, a in zip(records, responses)])
    result.update(benchmark="ifeval", model=args.model, prompts=str(args.prompts), responses_file=str(responses_path),
                  generation=common.sample_kwargs(args))
    common.write_json(args.out, result)
    print(f"ifeval {common.model_name(args)}: prompt-level {100 * result['prompt_level']:.1f}%, instruction-level "
          f"{100 * result['instruction_level']:.1f}% (strict; {result['n_prompts']} prompts) -> {args.out}")


if __name__ == "__main__":
    common.run(main)
