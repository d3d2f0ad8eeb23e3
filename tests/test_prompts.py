"""prompts.read_prompts on every accepted source: JSON Lines, JSON, parquet, save_to_disk folders, and a dataset id
resolved offline from a real datasets cache built in a tmp folder; conversations; and each bad row named in one line.

Run: .venv/bin/python -m pytest tests/test_prompts.py -x -q
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

import prompts

datasets = pytest.importorskip("datasets")  # an optional extra (installed with the dev setup); it builds the tables

REPO = "Org/UltraMini"  # a dataset id; its cache folder is Org___ultra_mini, as datasets names it
JUDGE = "judge:http://127.0.0.1:9?model=m"  # any reward but rules: plain prompts need no constraints


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def ultra_rows(n: int = 3, start: int = 0) -> list[dict]:
    """UltraFeedback's columns as they download (HuggingFaceH4/ultrafeedback_binarized)."""
    rows = []
    for i in range(start, start + n):
        prompt = f"Explain idea number {i}."
        rows.append(dict(prompt=prompt, prompt_id=f"uf{i}",
                         chosen=[turn("user", prompt), turn("assistant", f"good answer {i}")],
                         rejected=[turn("user", prompt), turn("assistant", f"bad answer {i}")],
                         messages=[turn("user", prompt), turn("assistant", f"good answer {i}")],
                         score_chosen=8.0, score_rejected=3.5))
    return rows


def ultra_checks(records: list[dict], ids: list[str]) -> None:
    assert [r["id"] for r in records] == ids
    assert [r["prompt"] for r in records] == [f"Explain idea number {i[2:]}." for i in ids]
    for r in records:
        assert "context" not in r and r["score_chosen"] == 8.0, r
        assert not {"chosen", "rejected", "messages"} & set(r), "conversation columns hold responses: dropped"
        assert r["parent"] is None and r["iteration"] == 0 and r["instruction_id_list"] == []


def hub_cache(tmp_path, splits: dict[str, list[dict]], repo: str = REPO):
    """What datasets.load_dataset(repo) leaves in HF_DATASETS_CACHE, written by datasets' own parquet builder:
    <cache>/<org>___<name>/default/0.0.0/<commit>/ with dataset_info.json and <name>-<split>.arrow."""
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet
    org, name = repo.split("/")
    data_files = {}
    for split, rows in splits.items():
        data_files[split] = str(tmp_path / f"{split}.parquet")
        datasets.Dataset.from_list(rows).to_parquet(data_files[split])
    cache = tmp_path / "hf" / "datasets"
    target = cache / f"{org}___{camelcase_to_snakecase(name)}" / "default" / "0.0.0" / ("0123456789abcdef" * 3)[:40]
    Parquet(cache_dir=str(tmp_path / "build"), dataset_name=name, data_files=data_files).download_and_prepare(
        output_dir=str(target))
    return cache


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """datasets reads HF_HOME and HF_HUB_OFFLINE when it is imported: set its constants for this process."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return lambda splits, repo=REPO: hub_cache(tmp_path, splits, repo)


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------------------- good sources
def test_parquet_file(tmp_path):
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(ultra_rows()).to_parquet(str(path))
    ultra_checks(prompts.read_prompts(str(path), JUDGE), ["uf0", "uf1", "uf2"])
    ultra_checks(prompts.read_prompts(str(path), JUDGE, limit=2), ["uf0", "uf1"])


def test_save_to_disk_folders(tmp_path):
    datasets.Dataset.from_list(ultra_rows()).save_to_disk(str(tmp_path / "one"))
    ultra_checks(prompts.read_prompts(str(tmp_path / "one"), JUDGE), ["uf0", "uf1", "uf2"])
    both = datasets.DatasetDict(train=datasets.Dataset.from_list(ultra_rows(2)),
                                test=datasets.Dataset.from_list(ultra_rows(2, start=5)))
    both.save_to_disk(str(tmp_path / "both"))
    ultra_checks(prompts.read_prompts(str(tmp_path / "both"), JUDGE), ["uf0", "uf1"])  # train by default
    ultra_checks(prompts.read_prompts(f"{tmp_path / 'both'}:test", JUDGE), ["uf5", "uf6"])


def test_dataset_id_from_the_offline_cache(offline_cache):
    offline_cache({"train_prefs": ultra_rows(3), "test_prefs": ultra_rows(2, start=10)})
    ultra_checks(prompts.read_prompts(f"{REPO}:train_prefs", JUDGE), ["uf0", "uf1", "uf2"])
    ultra_checks(prompts.read_prompts(f"{REPO}:test_prefs", JUDGE, limit=1), ["uf10"])
    # naming the messages column: the prompt is its last user turn (the assistant's answer after it is dropped)
    got = prompts.read_prompts(f"{REPO}:train_prefs:messages", JUDGE)
    assert [r["prompt"] for r in got] == [f"Explain idea number {i}." for i in range(3)]
    assert [r["id"] for r in got] == ["uf0", "uf1", "uf2"] and not any("context" in r for r in got)


def test_conversations_keep_their_earlier_turns(tmp_path, capsys):
    talk = [turn("system", "Be brief."), turn("user", "Name a river."), turn("assistant", "The Nile."),
            turn("user", "How long is it?"), turn("assistant", "About 6650 km.")]
    rows = [dict(messages=talk), dict(messages=talk[1:2]), dict(messages=[turn("user", "How long is it?")])]
    path = write_jsonl(tmp_path / "talk.jsonl", rows)
    got = prompts.read_prompts(path, JUDGE)
    assert [r["prompt"] for r in got] == ["How long is it?", "Name a river.", "How long is it?"]
    assert got[0]["context"] == talk[:3] and "context" not in got[1] and "messages" not in got[0]
    assert "1 of 3 prompts continue a conversation" in capsys.readouterr().out
    # no id field: a hash of the prompt and its context, the same in every run; the same prompt after other turns
    # is another prompt
    assert len({r["id"] for r in got}) == 3 and all(len(r["id"]) == 16 for r in got)
    assert [r["id"] for r in prompts.read_prompts(path, JUDGE)] == [r["id"] for r in got]
    # a pool written by a run (prompt and context fields) reads back as it was
    again = prompts.read_prompts(write_jsonl(tmp_path / "pool.jsonl", got), JUDGE)
    assert again == got


def test_prompt_wins_over_messages_and_a_named_column_over_both(tmp_path):
    rows = [dict(prompt="Say hi.", messages=[turn("user", "Say bye.")], question="Say what?")]
    path = write_jsonl(tmp_path / "both.jsonl", rows)
    assert prompts.read_prompts(path, JUDGE)[0]["prompt"] == "Say hi."
    got = prompts.read_prompts(f"{path}::question", JUDGE)[0]
    assert got["prompt"] == "Say what?" and "question" not in got


def test_json_file_list_data_or_json_lines(tmp_path):
    rows = ultra_rows(2)
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "data.json").write_text(json.dumps({"data": rows, "version": 1}))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # the Hub's .json is often this
    for name in ("list.json", "data.json", "lines.json"):
        ultra_checks(prompts.read_prompts(str(tmp_path / name), JUDGE), ["uf0", "uf1"])


def test_table_kwargs_nulls_are_dropped_for_the_rules_reward(tmp_path):
    # a table gives every kwargs dict every key, null where unused (IFEval's parquet); the rules reward accepts it
    rows = [dict(key=1, prompt="Write about cats without commas.", instruction_id_list=["punctuation:no_comma"],
                 kwargs=[{}]),
            dict(key=2, prompt="Write about dogs in at least 3 sentences.",
                 instruction_id_list=["length_constraints:number_sentences"],
                 kwargs=[{"num_sentences": 3, "relation": "at least"}])]
    path = tmp_path / "ifeval.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    got = prompts.read_prompts(str(path), "rules")
    assert [r["id"] for r in got] == ["1", "2"] and "key" not in got[0]
    assert got[0]["kwargs"] == [{}] and got[1]["kwargs"] == [{"num_sentences": 3, "relation": "at least"}]


def test_only_the_first_limit_rows_are_checked(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [dict(id="a", prompt="Hi."), dict(id="b", prompt="")])
    assert [r["id"] for r in prompts.read_prompts(path, JUDGE, limit=1)] == ["a"]
    with pytest.raises(ValueError, match=r"p\.jsonl:2: missing or empty field 'prompt'"):
        prompts.read_prompts(path, JUDGE)


# ------------------------------------------------------------------------------------------------- bad sources
def parquet(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


BAD = {
    # name: (make(tmp_path, offline_cache) -> source, reward, what the one line must contain)
    "missing_prompt": (lambda t, c: parquet(t, [dict(id="a", prompt="Hi."), dict(id="b", prompt=None)]), JUDGE,
                       ["rows.parquet row 1: missing or empty field 'prompt'"]),
    "empty_prompt": (lambda t, c: parquet(t, [dict(id="a", prompt=" ")]), JUDGE,
                     ["rows.parquet row 0: missing or empty field 'prompt'"]),
    "no_user_turn": (lambda t, c: parquet(t, [dict(messages=[turn("system", "Be kind."), turn("assistant", "Hi.")])]),
                     JUDGE, ["rows.parquet row 0: bad 'messages': no user turn"]),
    "empty_user_turn": (lambda t, c: parquet(t, [dict(messages=[turn("user", "  ")])]), JUDGE,
                        ["row 0: bad 'messages': the last user turn is empty"]),
    "turn_not_a_message": (lambda t, c: write_jsonl(t / "p.jsonl", [dict(messages=[{"role": "user"}])]), JUDGE,
                           ["p.jsonl:1: bad 'messages': turn 0 is not a {role, content}"]),
    "duplicate_id": (lambda t, c: parquet(t, [dict(id="a", prompt="Hi."), dict(id="b", prompt="Yo."),
                                              dict(id="a", prompt="Hey.")]), JUDGE,
                     ["rows.parquet row 2: duplicate id 'a', first at", "rows.parquet row 0"]),
    "duplicate_prompt_without_id": (lambda t, c: parquet(t, [dict(prompt="Hi."), dict(prompt="Hi.")]), JUDGE,
                                    ["rows.parquet row 1: duplicate id", "hash of its prompt"]),
    "rules_without_instructions": (lambda t, c: parquet(t, [dict(prompt_id="a", prompt="Hi.")]), "rules",
                                   ["rows.parquet row 0: missing field 'instruction_id_list'", "--reward"]),
    "no_prompt_column": (lambda t, c: parquet(t, [dict(question="Hi?", answer="Yes.")]), JUDGE,
                         ["rows.parquet: no 'prompt' or 'messages' column", "columns: question, answer"]),
    "missing_column": (lambda t, c: parquet(t, ultra_rows(1)) + "::question", JUDGE,
                       ["rows.parquet: no column 'question'; columns: prompt, prompt_id, chosen, rejected"]),
    "split_of_a_file": (lambda t, c: parquet(t, ultra_rows(1)) + ":train", JUDGE, ["a file has no splits"]),
    "json_not_a_list": (lambda t, c: (t / "p.json").write_text('{"rows": []}') and str(t / "p.json"), JUDGE,
                        ["p.json: expected a list of rows"]),
    "json_row_not_an_object": (lambda t, c: (t / "p.json").write_text('[{"prompt": "Hi."}, 3]') and str(t / "p.json"),
                               JUDGE, ["p.json row 1: expected a JSON object"]),
    "plain_folder": (lambda t, c: str(t), JUDGE, ["is a directory", "save_to_disk"]),
    "missing_file": (lambda t, c: str(t / "nope.parquet"), JUDGE, ["nope.parquet: prompt file not found"]),
    "missing_split": (lambda t, c: c({"train_prefs": ultra_rows(1), "test_prefs": ultra_rows(1)}) and f"{REPO}:train",
                      JUDGE, [f"{REPO}: no split 'train'; splits: train_prefs, test_prefs"]),
    "no_default_split": (lambda t, c: c({"train_prefs": ultra_rows(1), "test_prefs": ultra_rows(1)}) and REPO, JUDGE,
                         [f"{REPO}: name a split as {REPO}:SPLIT; splits: train_prefs, test_prefs"]),
    "missing_hub_column": (lambda t, c: c({"train_prefs": ultra_rows(1)}) and f"{REPO}:train_prefs:question", JUDGE,
                           [f"{REPO}[train_prefs]: no column 'question'; columns: prompt, prompt_id"]),
    "bad_hub_row": (lambda t, c: c({"train_prefs": ultra_rows(2) + [dict(ultra_rows(1)[0], prompt_id="uf9",
                                                                        prompt="")]}) and f"{REPO}:train_prefs",
                    JUDGE, [f"{REPO}[train_prefs] row 2: missing or empty field 'prompt'"]),
    "not_in_the_cache": (lambda t, c: c({"train": ultra_rows(1)}) and "Org/Elsewhere:train", JUDGE,
                         ["Org/Elsewhere:train: no such file or folder", "load_dataset('Org/Elsewhere') failed"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_source_is_one_line(tmp_path, offline_cache, case):
    make, reward, expected = BAD[case]
    source = make(tmp_path, offline_cache)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        prompts.read_prompts(source, reward)
    message = str(err.value)
    assert all(e in message for e in expected) and "\n" not in message, message


def test_missing_datasets_library_says_what_to_install(tmp_path, monkeypatch):
    datasets.Dataset.from_list(ultra_rows()).save_to_disk(str(tmp_path / "one"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    for source in (str(tmp_path / "one"), f"{REPO}:train_prefs"):
        with pytest.raises(ValueError, match=r"pip install datasets$"):
            prompts.read_prompts(source, JUDGE)


def test_bad_table_stops_the_command_line_before_any_model_loads(tmp_path):
    # seeds by dataset id from a cache found through HF_HOME (read when datasets is imported), held-out prompts from a
    # parquet file whose row 1 has no constraints: the run stops naming that row, before its folder or any model
    hub_cache(tmp_path, {"train_prefs": ultra_rows(8)})
    heldout = parquet(tmp_path, [dict(id="h0", prompt="Say hi in 2 sentences.",
                                      instruction_id_list=["length_constraints:number_sentences"],
                                      kwargs=[{"num_sentences": 3, "relation": "less than"}]),
                                 dict(id="h1", prompt="Yo.")])
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_DATASETS_CACHE", None)
    out = subprocess.run([sys.executable, str(ROOT / "train_eva.py"), "--preset", "smoke", "--seed_prompts",
                          f"{REPO}:train_prefs", "--heldout_prompts", heldout, "--reward", JUDGE,
                          "--model", str(tmp_path / "no_model"), "--run_dir", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"error: {heldout} row 1: missing field 'instruction_id_list' (the rules reward checks those " \
                   "constraints; a plain prompt needs --reward hf:..., judge:... or py:...)", out.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_dataset_ids_with_dots_are_ids_and_missing_files_are_files():
    assert prompts.looks_like_dataset_id("allenai/tulu-3.1-mix") and prompts.looks_like_dataset_id("Org/Name")
    for path in ("data/missing.jsonl", "./x/y", "a/b/c", "/abs/p", "~/p", "rows.parquet"):
        assert not prompts.looks_like_dataset_id(path), path
    with pytest.raises(FileNotFoundError, match=r"^data/missing\.jsonl: prompt file not found$"):
        prompts.read_prompts("data/missing.jsonl", "rules")
