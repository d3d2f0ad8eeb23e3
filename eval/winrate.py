"""Win rate of model A against model B on held-out prompts, under any reward back-end, with a bootstrap interval.

    python eval/winrate.py --model_a runs/demo/iter_1/adapter --model_b default            # rules reward
    python eval/winrate.py --model_a runs/gemma/iter_1/model --model_b google/gemma-2-9b-it \
        --reward hf:RLHFlow/ArmoRM-Llama3-8B-v0.1 --prompts my_prompts.jsonl --out runs/gemma/winrate.json
    python eval/winrate.py ... --reward "judge:http://localhost:8000/v1?model=Qwen/Qwen2.5-72B-Instruct"

Per prompt, each model gives one answer (greedy by default) and the reward back-end (reward.load_reward: rules,
a reward model or a judge) scores both: A's reward above B's is a win (1), equal a tie (1/2), below a loss (0).
The win rate is the mean over prompts; its 95% interval is the percentile bootstrap over prompts (seeded). A prompt
the back-end could not score (NaN, e.g. a judge that failed) is dropped and counted. `win_rate(...)` is the pure
part, reused by train_eva.py's report.
"""
import argparse
import gc
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval import common  # noqa: E402
import files  # noqa: E402
import parallel  # noqa: E402
import reward  # noqa: E402

DEFAULT_PROMPTS = common.ROOT / "data" / "heldout_prompts.jsonl"


def win_rate(rewards_a: list[float], rewards_b: list[float], n_boot: int = 1000, seed: int = 0) -> dict:
    """Win rate of A over B (ties count half) with a 95% percentile-bootstrap interval over prompts.

    Prompts where either reward is NaN are left out (n_dropped). Returns win_rate, ci_low, ci_high in [0, 1], and
    wins, ties, losses, n, n_dropped.
    """
    assert len(rewards_a) == len(rewards_b), f"{len(rewards_a)} rewards for A but {len(rewards_b)} for B"
    a, b = np.asarray(rewards_a, dtype=float), np.asarray(rewards_b, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    outcome = (a > b) + 0.5 * (a == b)  # [P] 1 win, 1/2 tie, 0 loss
    n = len(outcome)
    counts = dict(wins=int((a > b).sum()), ties=int((a == b).sum()), losses=int((a < b).sum()), n=n,
                  n_dropped=int((~keep).sum()))
    if n == 0:
        return dict(win_rate=math.nan, ci_low=math.nan, ci_high=math.nan, **counts)
    rng = np.random.default_rng(seed)
    means = outcome[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)  # [n_boot]
    return dict(win_rate=float(outcome.mean()), ci_low=float(np.percentile(means, 2.5)),
                ci_high=float(np.percentile(means, 97.5)), **counts)


def read_prompts(path: str | Path) -> list[dict]:
    records = []
    for n, row in files.numbered_jsonl(path):
        common.field(row, "prompt", f"{path}:{n}", str)
        records.append(row)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def answers_of(spec: str, records: list[dict], args) -> list[str]:
    """Greedy answers of one checkpoint; the model is freed before the next is loaded."""
    args.model = spec
    model, tokenizer = common.load_solver(args)
    answers = common.generate_answers(model, tokenizer, [r["prompt"] for r in records], **common.sample_kwargs(args))
    del model
    gc.collect()
    return answers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_a", required=True, help="the challenger (e.g. the trained checkpoint)")
    parser.add_argument("--model_b", required=True, help="the reference (e.g. the starting model)")
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="prompt records (JSON Lines)")
    parser.add_argument("--reward", default="rules", help="rules | hf:<id-or-path> | judge:<base-url>?model=NAME")
    parser.add_argument("--n_boot", type=int, default=1000)
    parser.add_argument("--out", default="winrate.json")
    common.add_generation_args(parser, max_new_tokens=512)
    args = parser.parse_args(argv)

    records = read_prompts(args.prompts)[: args.limit or None]
    scorer = reward.load_reward(args.reward, device=str(parallel.init()))  # bad spec fails before any generation
    answers_a = answers_of(args.model_a, records, args)
    answers_b = answers_of(args.model_b, records, args)
    rewards_a = reward.score_sharded(scorer, records, answers_a)
    rewards_b = reward.score_sharded(scorer, records, answers_b)
    if not parallel.is_main():
        return
    result = win_rate(rewards_a, rewards_b, n_boot=args.n_boot, seed=args.seed)
    per_prompt = [dict(id=r.get("id", r.get("key")), reward_a=ra, reward_b=rb, answer_a=aa, answer_b=ab)
                  for r, ra, rb, aa, ab in zip(records, rewards_a, rewards_b, answers_a, answers_b)]
    result.update(benchmark="winrate", model_a=args.model_a, model_b=args.model_b, reward=args.reward,
                  prompts=str(args.prompts), mean_reward_a=float(np.nanmean(rewards_a)),
                  mean_reward_b=float(np.nanmean(rewards_b)), generation=common.sample_kwargs(args),
                  per_prompt=per_prompt)
    common.write_json(args.out, result)
    print(f"winrate {args.model_a} vs {args.model_b} ({args.reward}): {100 * result['win_rate']:.1f}% "
          f"[{100 * result['ci_low']:.1f}, {100 * result['ci_high']:.1f}] "
          f"W/T/L {result['wins']}/{result['ties']}/{result['losses']} of {result['n']} -> {args.out}")


if __name__ == "__main__":
    common.run(main)
