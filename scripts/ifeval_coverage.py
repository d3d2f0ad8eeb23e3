"""How much of IFEval the rules reward covers: counts the prompts whose instruction ids are all supported by
instructions.py, checks every such prompt's kwargs, and scores each of them against a few canned responses to show
nothing raises. Run: python scripts/ifeval_coverage.py [--data ../shared/data/ifeval_input_data.jsonl]
"""
import argparse
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import files  # noqa: E402
import instructions  # noqa: E402
import reward  # noqa: E402
from eval import ifeval  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ifeval_input_data.jsonl"))
    args = parser.parse_args()
    path = Path(args.data)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (pass --data)")
    numbered = files.numbered_jsonl(path)
    records = [r for _, r in numbered]
    per_id = collections.Counter(i for r in records for i in r["instruction_id_list"])
    supported = [r for r in records if instructions.is_supported(r)]
    for n, r in numbered:
        if instructions.is_supported(r):
            instructions.validate_record(r, f"{path.name}:{n}")
    scorer = reward.load_reward("rules")
    canned = ["", "A short answer, with a comma.", "ALL CAPS ANSWER", '"quoted"\n\nP.S. done']
    for response in canned:
        scorer.score(supported, [response] * len(supported))
    echo = ifeval.ifeval_accuracy(supported, [r["prompt"] for r in supported])

    n_instr = sum(per_id.values())
    n_instr_ok = sum(len(r["instruction_id_list"]) for r in supported)
    print(f"{path.name}: {len(records)} prompts, {n_instr} instructions, {len(per_id)} distinct ids")
    print(f"supported ids: {sum(1 for i in per_id if i in instructions.SUPPORTED_IDS)} of the {len(per_id)} in the file")
    for instruction_id, count in sorted(per_id.items()):
        mark = "ok " if instruction_id in instructions.SUPPORTED_IDS else "NO "
        print(f"  {mark} {instruction_id:48s} {count:4d}")
    print(f"fully supported prompts: {len(supported)} / {len(records)} ({100 * len(supported) / len(records):.1f}%),"
          f" holding {n_instr_ok} / {n_instr} instructions")
    print(f"scored all {len(supported)} supported prompts against {len(canned)} canned responses without error")
    print(f"sanity: echoing the prompt back follows {100 * echo['instruction_level']:.1f}% of instructions "
          f"({100 * echo['prompt_level']:.1f}% of prompts), strict")


if __name__ == "__main__":
    main()
