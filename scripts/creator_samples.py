"""How much of the demo's evolve phase the creator writes itself: the bundled model evolves 16 seed prompts with the
demo's settings (depth 4, all kinds, the rules reward, the demo's creator settings), then this prints the share of
links written by the model, the per-method table, and a seeded random sample of accepted rewrites with their parents.
Run: python scripts/creator_samples.py [--samples 20] [--raw raw.jsonl]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cleaning  # noqa: E402
import common  # noqa: E402
import config  # noqa: E402
import constraints  # noqa: E402
import creator  # noqa: E402
import model  # noqa: E402
import prompts  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="the solver, which is also the creator ('self')")
    parser.add_argument("--parents", type=int, default=16, help="seed prompts to evolve (the demo selects 16 of 64)")
    parser.add_argument("--samples", type=int, default=20, help="accepted rewrites to print")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", default="", help="also write every creator message and its outputs here (JSONL)")
    parser.add_argument("--flag", action="append", default=[], help="a train_eva flag: --flag=--creator_candidates=1")
    args = parser.parse_args()
    cfg = config.parse_config(["--preset", "demo", "--model", args.model, "--seed", str(args.seed)] + args.flag)
    pool = prompts.read_prompts(cfg.seed_prompts, cfg.reward, cfg.max_seed_prompts)
    rng = np.random.default_rng(args.seed)
    parents = [pool[int(i)] for i in sorted(rng.choice(len(pool), size=args.parents, replace=False))]
    solver, tokenizer = model.load_model(cfg.model)
    complete = common.make_completer(cfg, 1, solver, tokenizer)
    log = []

    def logged(messages):
        out = complete(messages)
        log.extend(dict(message=m, outputs=o) for m, o in zip(messages, out))
        return out

    t0 = time.time()
    children, stats = creator.evolve_with(cfg, parents, logged, 1, pool)
    seconds = time.time() - t0
    if args.raw:
        Path(args.raw).write_text("".join(json.dumps(r) + "\n" for r in log))

    written = [c for c in children if c["method"] != "add_constraints"]
    print(f"{len(parents)} parents -> {len(children)} children: {len(written)} written by the creator "
          f"({100 * len(written) / max(1, len(children)):.0f}%), {len(children) - len(written)} by the in-code "
          f"constraint step ({stats['fallback']} of them replacing a rejected rewrite); {seconds:.0f} s")
    print(f"settings: creator_candidates {getattr(cfg, 'creator_candidates', 1)}, max_new_tokens "
          f"{cfg.creator_max_new_tokens}, temperature {cfg.creator_temperature}, top_p {cfg.top_p}\n")
    table = stats.get("creator_per_method")
    if table:
        reasons = [r for r in cleaning.REJECT_REASONS if any(row["rejected"].get(r) for row in table.values())]
        print("| method | links | candidates | accepted | " + " | ".join(reasons) + " |")
        print("|---" * (4 + len(reasons)) + "|")
        for name, row in table.items():
            print(f"| {name} | {row['links']} | {row['candidates']} | {row['accepted']} | "
                  + " | ".join(str(row["rejected"].get(r, 0)) for r in reasons) + " |")
    print("\nrejected: " + ", ".join(f"{k} {v}" for k, v in stats["rejected"].items() if v))
    print("kept per method: " + json.dumps(stats["per_method"]))

    by_id = {r["id"]: r for r in pool + children}
    picks = np.random.default_rng(args.seed).permutation(len(written))[:args.samples]
    print(f"\n## {len(picks)} accepted rewrites (seeded random choice)\n")
    for k, i in enumerate(sorted(int(i) for i in picks), 1):
        child = written[i]
        parent = by_id[child["parent"]]
        parent_task = constraints.split_task(parent)
        print(f"{k}. **{child['method']}** (step {child['step']})\n   - parent: {parent_task}\n"
              f"   - rewrite: {child['task']}\n")


if __name__ == "__main__":
    main()
