"""AlpacaEval 2.0: outputs in the official format, pairwise judging against the baseline, raw and length-controlled
win rates.

    python eval/alpaca_eval.py --model runs/gemma/iter_1/model \
        --baseline_outputs ../shared/data/alpaca_eval_2.0_gpt4_1106_preview_baseline_outputs.json \
        --judge_prompt ../shared/data/alpaca_eval_2.0_weighted_gpt4_turbo_judge_prompt.txt \
        --annotator_config ../shared/data/alpaca_eval_2.0_weighted_gpt4_turbo_annotator_config.yaml \
        --gamed ../shared/data/alpaca_eval_2.0_gpt4_1106_preview_{concise,verbose}_gamed_outputs.json \
        --judge_url http://localhost:8000/v1 --judge_model Qwen/Qwen2.5-72B-Instruct --out runs/gemma/alpaca_eval.json

Outputs (greedy, up to 2048 new tokens; AlpacaEval fixes no decoding) go to <out>_outputs.json as the official
model_outputs list ({instruction, output, generator, dataset}), so `alpaca_eval --model_outputs` can judge them too.
Without --judge_url the script stops there.

Judging follows the weighted_alpaca_eval_gpt4_turbo annotator: the chat prompt read from the .txt file (its
<|im_start|>role ... <|im_end|> blocks become messages), output_1 = baseline and output_2 = model shown in a random
(seeded) order, the judge names the better one with the config's tokens ("m" = first, "M" = second), and the judge
model, temperature and max_tokens come from the annotator config. Preference 1 = baseline better, 2 = model better;
win rate = mean(preference - 1) in %, with AlpacaEval's standard error.

Length-controlled win rate: AlpacaEval's length_controlled_v1 GLM. The preference is regressed (logistic, soft
labels, no intercept) on tanh(std_delta_len), instruction_difficulty and not_gamed_baseline, with an L1 penalty whose
C is picked among 10 values (1e-4..1e4) by 5-fold cross-validated log loss, and with the two "gamed" baselines'
annotations added at weight 0.2/2; LC = mean predicted preference with the length term set to 0. What differs here,
and why:
  - the preference is the judge's chosen token, not the probability from its logprobs (endpoint.chat returns text
    only). At the config's temperature 1 the sampled token is an unbiased but noisier draw of that probability
    (exact when "m" and "M" carry nearly all the mass); at temperature 0 it is AlpacaEval's binarised variant.
  - instruction_difficulty is a per-instruction value AlpacaEval fitted over its leaderboard and downloads from the
    Hugging Face hub; it is not in this repo, so it is 0 (the term drops out) unless its CSV is given with
    --instruction_difficulty (columns: index, instruction_difficulty).
  - the gamed baselines' annotations upstream are GPT-4-Turbo's (also downloaded); here --gamed has *this* judge
    annotate those outputs (cached beside --out). Without --gamed the fit is unregularised towards the baseline.
  - the fit is the same objective solved by proximal Newton here instead of liblinear, and the CV folds are
    round-robin by row instead of sklearn's GroupKFold order, so in close cases the chosen C can differ.
"""
import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval import common  # noqa: E402
import parallel  # noqa: E402

CS = np.logspace(-4, 4, 10)  # sklearn LogisticRegressionCV's default grid
GAMED_WEIGHT = 0.2  # regularize_to_baseline_lambda of length_controlled_v1


# ------------------------------------------------------------------------------------------------- judging
def chat_messages(template: str) -> list[dict]:
    """The <|im_start|>role\\ncontent<|im_end|> blocks of an AlpacaEval prompt file as chat messages."""
    blocks = re.findall(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", template, flags=re.S)
    if not blocks:
        raise ValueError("judge prompt: no <|im_start|>role ... <|im_end|> blocks")
    return [{"role": role, "content": content.strip()} for role, content in blocks]


def fill(messages: list[dict], values: dict) -> list[dict]:
    # one pass, so an output that happens to contain "{output_2}" is not expanded again
    sub = lambda text: re.sub(r"\{(instruction|output_1|output_2)\}", lambda m: values[m.group(1)], text)  # noqa
    return [{"role": m["role"], "content": sub(m["content"])} for m in messages]


def parse_preference(reply: str | None, first: str, tokens: list[str]) -> float:
    """1.0 when the judge names the first output, 2.0 for the other token, NaN otherwise."""
    word = (reply or "").strip().strip("\"'`.*")
    if word not in tokens:
        return math.nan
    return 1.0 if word == first else 2.0


def annotate(args, messages: list[dict], instructions: list[str], baseline: list[str], outputs: list[str],
             settings: dict, seed: int) -> tuple[list[float], list[bool]]:
    """(preference: 1 baseline, 2 model, NaN unparsed/failed; call failed) per instruction, in a random order."""
    rng = np.random.default_rng(seed)
    swap = rng.random(len(instructions)) < 0.5  # [N]
    convs = [fill(messages, dict(instruction=i, output_1=o if s else b, output_2=b if s else o))
             for i, b, o, s in zip(instructions, baseline, outputs, swap)]
    replies = common.judge_many(args, convs, temperature=settings["temperature"], max_tokens=settings["max_tokens"])
    prefs = [parse_preference(r, settings["first"], settings["tokens"]) for r in replies]
    return [3.0 - p if s else p for p, s in zip(prefs, swap)], [r is None for r in replies]


def head2head(preferences: list[float]) -> dict:
    """AlpacaEval's win rate (%) and standard error from preferences in [1, 2] (0 and 1.5 are draws)."""
    p = np.array([1.5 if x == 0 else x for x in preferences], dtype=float)
    p = p[~np.isnan(p)] - 1  # [N] in [0, 1]
    n = len(p)
    sem = float(np.std(p, ddof=1) / np.sqrt(n)) if n > 1 else math.nan
    return dict(win_rate=100 * float(p.mean()) if n else math.nan, standard_error=100 * sem,
                n_wins=int((p > 0.5).sum()), n_wins_base=int((p < 0.5).sum()), n_draws=int((p == 0.5).sum()),
                n_total=n)


# ------------------------------------------------------------------------------------------------- LC GLM
def _loss(beta, X, y, w, C, l1):
    z = X @ beta
    return l1 * np.abs(beta).sum() + C * np.sum(w * (np.logaddexp(0.0, z) - y * z))


def fit_logistic(X: np.ndarray, y: np.ndarray, w: np.ndarray, C: float = 1.0, l1: float = 1.0) -> np.ndarray:
    """argmin l1*|beta|_1 + C * sum_i w_i * logloss(y_i, sigmoid(x_i beta)), y soft in [0, 1], no intercept.

    Proximal Newton: a quadratic model of the smooth part minimised by coordinate descent with soft-thresholding,
    then a backtracking step on the true objective. l1=0 gives the plain maximum-likelihood fit.
    """
    beta = np.zeros(X.shape[1])
    f = _loss(beta, X, y, w, C, l1)
    for _ in range(200):
        p = 1.0 / (1.0 + np.exp(-(X @ beta)))  # [N]
        grad = C * X.T @ (w * (p - y))  # [D]
        hess = C * (X.T * (w * p * (1 - p))) @ X + 1e-12 * np.eye(X.shape[1])  # [D, D]
        b = beta.copy()
        for _ in range(500):
            before = b.copy()
            for j in range(len(b)):
                r = grad[j] + hess[j] @ (b - beta) - hess[j, j] * b[j]
                b[j] = -np.sign(r) * max(abs(r) - l1, 0.0) / hess[j, j]
            if np.abs(b - before).max() < 1e-13:
                break
        step, direction = 1.0, b - beta
        while _loss(beta + step * direction, X, y, w, C, l1) > f + 1e-12 and step > 1e-10:
            step /= 2
        beta = beta + step * direction
        f_new = _loss(beta, X, y, w, C, l1)
        if np.abs(step * direction).max() < 1e-10 or f - f_new < 1e-14 * max(1.0, abs(f)):
            break
        f = f_new
    return beta


def fit_logistic_cv(X, y, w, n_splits: int = 5, Cs=CS) -> tuple[np.ndarray, float]:
    """L1 fit with C chosen by n_splits-fold cross-validated weighted log loss, then refit on all rows."""
    fold = np.arange(len(y)) % n_splits  # [N]
    scores = []
    for C in Cs:
        losses = []
        for k in range(n_splits):
            train, test = fold != k, fold == k
            beta = fit_logistic(X[train], y[train], w[train], C=C)
            q = np.clip(1.0 / (1.0 + np.exp(-(X[test] @ beta))), 1e-15, 1 - 1e-15)
            losses.append(-np.mean(w[test] * (y[test] * np.log(q) + (1 - y[test]) * np.log(1 - q))))
        scores.append(np.mean(losses))
    best = float(Cs[int(np.argmin(scores))])
    return fit_logistic(X, y, w, C=best), best


def _features(pref, len_model, len_base, difficulty, not_gamed: bool):
    delta = np.asarray(len_base, dtype=float) - np.asarray(len_model, dtype=float)  # [N] output_1 - output_2
    std = delta.std(ddof=1) if len(delta) > 1 else 0.0
    std_delta = delta / std if std > 0 else np.zeros_like(delta)
    X = np.stack([np.tanh(std_delta), difficulty, np.full(len(delta), float(not_gamed))], axis=1)  # [N, 3]
    y = np.array([1.5 if p == 0 else p for p in pref], dtype=float) - 1  # [N] in [0, 1], NaN where unparsed
    return X, y


def length_controlled(pref, len_model, len_base, difficulty=None, gamed=(), cv: bool = True) -> dict:
    """AlpacaEval's length-controlled win rate (%) and the GLM's coefficients.

    gamed: (preferences, output lengths) of gamed baselines judged against the same baseline outputs.
    cv=False fits without the L1 penalty (the plain maximum-likelihood GLM).
    """
    n = len(pref)
    difficulty = np.zeros(n) if difficulty is None else np.asarray(difficulty, dtype=float)
    X, y = _features(pref, len_model, len_base, difficulty, True)
    w = np.ones(n)
    X_test = X.copy()
    X_test[:, 0] = 0.0  # the counterfactual: no length difference
    for g_pref, g_len in gamed:
        Xg, yg = _features(g_pref, g_len, len_base, difficulty, False)
        X, y = np.vstack([X, Xg]), np.concatenate([y, yg])
        w = np.concatenate([w, np.full(len(yg), GAMED_WEIGHT / len(gamed))])
    keep = ~np.isnan(y)
    if keep.sum() < 2:
        return dict(length_controlled_winrate=math.nan, coefficients=None, C=None)
    if cv:
        beta, C = fit_logistic_cv(X[keep], y[keep], w[keep])
    else:
        beta, C = fit_logistic(X[keep], y[keep], w[keep], l1=0.0), None
    lc = 100 * float(np.mean(1.0 / (1.0 + np.exp(-(X_test @ beta)))))
    names = ["np.tanh(std_delta_len)", "instruction_difficulty", "not_gamed_baseline.astype(float)"]
    return dict(length_controlled_winrate=lc, coefficients=dict(zip(names, beta.tolist())), C=C)


# ------------------------------------------------------------------------------------------------- files
def read_outputs(path) -> list[dict]:
    rows = common.read_json(path)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{instruction, output}} objects")
    for i, row in enumerate(rows):
        where = f"{path}: item {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object")
        common.field(row, "instruction", where, str)
        common.field(row, "output", where, str)
    return rows


def read_difficulty(path, n: int) -> np.ndarray:
    values = np.zeros(n)
    for n_line, line in enumerate(Path(path).read_text().splitlines()[1:], 2):
        try:
            index, value = line.split(",")[:2]
            if int(index) < n:
                values[int(index)] = float(value)
        except ValueError:
            raise ValueError(f"{path}:{n_line}: expected 'index,instruction_difficulty'") from None
    return values


def judge_settings(args, config: dict) -> dict:
    name, conf = next(iter(config.items())) if len(config) == 1 else ("", config)
    kw, parser_kw = conf.get("completions_kwargs", {}), conf.get("completion_parser_kwargs", {})
    first = parser_kw.get("numerator_token", "m")
    return dict(annotator=name, first=first, tokens=list(parser_kw.get("denominator_tokens", [first, "M"])),
                temperature=float(args.judge_temperature if args.judge_temperature is not None
                                  else kw.get("temperature", 0.0)),
                max_tokens=int(args.judge_max_tokens or kw.get("max_tokens", 1)),
                model=args.judge_model or kw.get("model_name"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline_outputs", required=True, help="the baseline's model_outputs.json (805 items)")
    parser.add_argument("--judge_prompt", help="the annotator's prompt .txt (alpaca_eval_clf.txt)")
    parser.add_argument("--annotator_config", help="the annotator's configs.yaml")
    parser.add_argument("--gamed", nargs="*", default=[], help="gamed baselines' outputs (concise, verbose)")
    parser.add_argument("--instruction_difficulty", help="AlpacaEval's instruction_difficulty.csv (optional)")
    parser.add_argument("--outputs", help="model outputs: written when --model is given, read otherwise")
    parser.add_argument("--judge_temperature", type=float, default=None, help="default: the config's")
    parser.add_argument("--out", default="alpaca_eval.json")
    common.add_generation_args(parser, max_new_tokens=2048)
    common.add_judge_args(parser)
    args = parser.parse_args(argv)
    args.model_name = common.model_name(args)
    outputs_path = Path(args.outputs or common.beside(args.out, "outputs.json"))
    baseline = read_outputs(args.baseline_outputs)[: args.limit or None]
    instructions = [b["instruction"] for b in baseline]

    if args.model:
        model, tokenizer = common.load_solver(args)
        texts = common.generate_answers(model, tokenizer, instructions, **common.sample_kwargs(args))
        if not parallel.is_main():
            return
        common.write_json(outputs_path, [dict(instruction=b["instruction"], output=t, generator=args.model_name,
                                              dataset=b.get("dataset")) for b, t in zip(baseline, texts)])
    elif not args.outputs:
        raise ValueError("give --model to generate outputs or --outputs to judge an existing output file")
    if not args.judge_url:
        print(f"alpaca-eval {args.model_name}: {len(baseline)} outputs -> {outputs_path} (no --judge_url, not judged)")
        return
    if not (args.judge_prompt and args.annotator_config):
        raise ValueError("judging needs --judge_prompt and --annotator_config")
    if not Path(args.judge_prompt).is_file():
        raise FileNotFoundError(f"{args.judge_prompt}: no such file")
    messages = chat_messages(Path(args.judge_prompt).read_text(encoding="utf-8"))
    settings = judge_settings(args, common.read_config(args.annotator_config))
    args.judge_model = settings["model"]
    model_rows = read_outputs(outputs_path)
    for i, b in enumerate(baseline):
        if i >= len(model_rows) or model_rows[i]["instruction"] != b["instruction"]:
            raise ValueError(f"{outputs_path}: item {i} is not the baseline's instruction {i}")
    outputs, base_out = [r["output"] for r in model_rows[:len(baseline)]], [b["output"] for b in baseline]

    prefs, failed = annotate(args, messages, instructions, base_out, outputs, settings, seed=args.seed)
    gamed = []
    for path in args.gamed:
        cache = common.beside(args.out, f"gamed_{Path(path).stem}.json")
        hit = common.read_json(cache) if cache.is_file() else {}
        g_out = [r["output"] for r in read_outputs(path)[:len(baseline)]]
        if hit.get("judge") != args.judge_model or len(hit.get("preferences", [])) != len(baseline):
            g_pref, _ = annotate(args, messages, instructions, base_out, g_out, settings, seed=args.seed + 1)
            hit = dict(judge=args.judge_model, source=str(path), preferences=g_pref)
            common.write_json(cache, hit)
        gamed.append((hit["preferences"], [len(o) for o in g_out]))
    difficulty = (read_difficulty(args.instruction_difficulty, len(baseline))
                  if args.instruction_difficulty else None)
    result = head2head(prefs)
    result.update(length_controlled(prefs, [len(o) for o in outputs], [len(o) for o in base_out], difficulty, gamed))
    result.update(benchmark="alpaca-eval-2.0", model=args.model_name, judge=args.judge_model,
                  annotator=settings["annotator"], avg_length=float(np.mean([len(o) for o in outputs])),
                  failed=[i for i, f in enumerate(failed) if f],
                  unparsed=[i for i, (p, f) in enumerate(zip(prefs, failed)) if math.isnan(p) and not f],
                  gamed=[str(p) for p in args.gamed], instruction_difficulty=args.instruction_difficulty,
                  outputs_file=str(outputs_path), preferences=[None if math.isnan(p) else p for p in prefs])
    common.write_json(args.out, result)
    print(f"alpaca-eval {args.model_name} (judge {args.judge_model}): LC {result['length_controlled_winrate']:.1f}%, "
          f"raw {result['win_rate']:.1f}% (SE {result['standard_error']:.1f}) over {result['n_total']}; "
          f"{len(result['failed'])} failed, {len(result['unparsed'])} unparsed -> {args.out}")


if __name__ == "__main__":
    common.run(main)
