"""Plumbing shared by the eval/ scripts: reading benchmark files, generating answers, asking a judge, writing results.

Not a script. The benchmark scripts import it as `common` (each puts eval/ and the repo root on sys.path), so this
file holds only what every one of them needs once: JSON and YAML readers that name the file and line on bad input
(JSON Lines go through files.py), an atomic JSON writer, the generation flags and the sharded answer generator, the
judge flags and a judge call that retries failures a second time and reports what still failed by question id.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import endpoint  # noqa: E402  (needs the repo root on sys.path)
import files  # noqa: E402
import parallel  # noqa: E402


# ------------------------------------------------------------------------------------------------- files
# JSON Lines are read and written with files.py (numbered_jsonl, write_jsonl); these are the other formats.

def read_json(path: str | Path):
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def read_config(path: str | Path) -> dict:
    """A judge config as JSON or YAML (the official files are YAML; shared/data holds a JSON copy of Arena-Hard's)."""
    file = Path(path)
    if file.suffix in (".yaml", ".yml"):
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        import yaml
        try:
            config = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            raise ValueError(f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML") from None
    else:
        config = read_json(file)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return config


def field(row: dict, key: str, where: str, kind: type | tuple = object):
    """row[key], or a ValueError naming where the record came from."""
    if key not in row:
        raise ValueError(f"{where}: missing field '{key}'")
    if not isinstance(row[key], kind):
        raise ValueError(f"{where}: field '{key}' has the wrong type ({type(row[key]).__name__})")
    return row[key]


def write_json(path: str | Path, obj) -> None:
    files.write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def beside(out: str | Path, suffix: str) -> Path:
    """runs/x/arena_hard.json -> runs/x/arena_hard_<suffix>: where a script's side files go by default."""
    out = Path(out)
    return out.with_name(out.stem + "_" + suffix)


# ------------------------------------------------------------------------------------------------- answers
def add_generation_args(parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float | None = 0.0,
                        model_required: bool = False) -> None:
    g = parser.add_argument_group("answer generation (generate.py)")
    g.add_argument("--model", required=model_required, default=None,
                   help="checkpoint to answer with: 'default', a model folder, a hub id or an adapter folder")
    g.add_argument("--model_name", default=None, help="name written into the answer files (default: from --model)")
    g.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top_p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch_size", type=int, default=16)
    g.add_argument("--load_in_4bit", action="store_true", help="NF4 base weights (CUDA only)")
    g.add_argument("--limit", type=int, default=0, help="use only the first N questions (0 = all)")


def model_name(args) -> str:
    if args.model_name:
        return args.model_name
    spec = (args.model or "model").rstrip("/")
    parts = Path(spec).parts
    # runs/demo/iter_1/adapter -> iter_1-adapter: the last folder alone is often just "adapter" or "model"
    return "-".join(parts[-2:]) if len(parts) > 1 and parts[-1] in ("adapter", "model", "merged") else parts[-1]


def load_solver(args):
    """(model, tokenizer) for --model on this rank's device."""
    import model
    device = parallel.init()
    return model.load_model(args.model, device=device, load_in_4bit=args.load_in_4bit)


def sample_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                seed=args.seed, batch_size=args.batch_size)


def generate_answers(model, tokenizer, conversations: list, *, seed: int = 0, **kwargs) -> list[str]:
    """One answer per conversation, sharded over the ranks, gathered in order on every rank.

    A conversation is a plain prompt (one user turn: generate.sample's chat=True) or a list of chat messages, which
    is rendered with the tokenizer's chat template here (the way to ask a second turn). Seeds follow the global
    index, so an answer never depends on which rank or batch produced it.
    """
    import generate

    def work(local: list) -> list[str]:
        indices = [i for i, _ in local]
        convs = [c for _, c in local]
        plain = all(isinstance(c, str) for c in convs)
        prompts = convs if plain else [render_chat(tokenizer, c) for c in convs]
        out = generate.sample(model, tokenizer, prompts, n=1, seeds=[seed * 1_000_003 + i for i in indices],
                              chat=plain, **kwargs)
        return [texts[0] for texts in out.texts]

    return parallel.sharded(work, list(enumerate(conversations)), desc="answers")


def render_chat(tokenizer, messages: list[dict]) -> str:
    """A conversation as the text generate.sample(chat=False) should see: the chat template, ready for the answer.

    sample(chat=False) tokenizes with the tokenizer's special tokens, so a BOS the template already wrote (Gemma,
    Llama-3) is taken off here, or the model would see two.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------- judge
def add_judge_args(parser: argparse.ArgumentParser, *, judge_max_tokens: int | None = None) -> None:
    g = parser.add_argument_group("judge (any OpenAI-compatible endpoint: vLLM, LiteLLM, an API)")
    g.add_argument("--judge_url", default=None,
                   help="e.g. http://localhost:8000/v1; without it the script stops after writing the answers")
    g.add_argument("--judge_model", default=None, help="model name sent to the endpoint (default: the config's)")
    g.add_argument("--judge_max_tokens", type=int, default=judge_max_tokens,
                   help="override the official setting (default: the config's)")
    g.add_argument("--judge_concurrency", type=int, default=8)
    g.add_argument("--judge_retries", type=int, default=4, help="tries after the first, per call, with backoff")
    g.add_argument("--judge_timeout", type=float, default=300.0, help="seconds per socket operation")
    g.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")


def judge_many(args, conversations: list[list[dict]], *, temperature: float, max_tokens: int) -> list[str | None]:
    """The judge's reply to each conversation; None where the call failed twice over (each time after retries).

    endpoint.chat_many already retries each call with backoff; a second round catches what failed while the
    server was briefly overloaded. Raises endpoint.EndpointError when every call of the first round failed.
    """
    def call(convs: list[list[dict]]) -> list[str | None]:
        return endpoint.chat_many(args.judge_url, args.judge_model, convs, concurrency=args.judge_concurrency,
                                  temperature=temperature, max_tokens=max_tokens, retries=args.judge_retries,
                                  timeout=args.judge_timeout, api_key_env=args.api_key_env)

    replies = call(conversations)
    missing = [i for i, r in enumerate(replies) if r is None]
    if missing:
        print(f"judge: retrying {len(missing)} failed calls once more", file=sys.stderr)
        try:
            again = call([conversations[i] for i in missing])
        except endpoint.EndpointError:
            again = [None] * len(missing)
        for i, r in zip(missing, again):
            replies[i] = r
    return replies


def run(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a script's main; bad input or a dead judge ends it with one line on stderr and exit status 2."""
    try:
        main(argv)
    except (ValueError, FileNotFoundError, endpoint.EndpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
