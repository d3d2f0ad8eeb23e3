"""Prompt records for --seed_prompts and --heldout_prompts, read from where users keep them (docs/data.md).

    read_prompts(source, reward_spec, limit=0) -> [record]   every row checked; a bad one stops the run, named

A source is `WHERE[:split[:column]]`. WHERE is a local file (.jsonl JSON Lines; .json a list of rows or
{"data": [...]}; .parquet), a folder written by datasets' save_to_disk, or a Hugging Face dataset id `Org/Name` that
`datasets.load_dataset` finds (offline: in the local datasets cache). The split defaults to the only one or `train`;
the column names the prompt field (default `prompt`, else `messages`). Examples:

    data/seed_prompts.jsonl      HuggingFaceH4/ultrafeedback_binarized:train_prefs      rows.parquet::question

A row's prompt is a string, or a conversation (a list of {role, content}): its last user turn is the prompt and the
turns before it are kept as `context`. Rows without an id are named by a hash of their prompt.
"""
import hashlib
import json
import re
from pathlib import Path

import files
import instructions
import parallel
import reward

ROOT = Path(__file__).resolve().parent
ID_FIELDS = ("id", "key", "prompt_id")  # the first present is the id: eva's, IFEval's, UltraFeedback's


def read_prompts(source: str, reward_spec: str, limit: int = 0) -> list[dict]:
    """Prompt records from a source (above); the first `limit` rows (0 = all) are read and checked.

    A record needs a prompt; the id is `id`, `key` or `prompt_id`, else a hash of the prompt; the rules reward also
    needs its constraints (`instruction_id_list`, `kwargs`), which other rewards ignore. Any bad row stops the run
    before work starts, named `file:line` (JSON Lines) or `source[split] row N` (tables, counted from 0)."""
    if not source:
        raise ValueError("no prompt source given")
    rows, column = load_rows(source, limit)
    records, seen = [], {}
    for where, row in rows:
        records.append(make_record(row, where, column, reward_spec, seen))
    if not records:
        raise ValueError(f"{source}: no prompts")
    conversations = sum("context" in r for r in records)
    if conversations:
        parallel.print0(f"{source}: {conversations} of {len(records)} prompts continue a conversation; their "
                        f"earlier turns are kept as 'context', but the solver is shown only the last user turn")
    return records


# ------------------------------------------------------------------------------------------------ where rows come from
def local_path(text: str) -> Path | None:
    """An existing file or folder: as given, or relative to the repository (where the default data/ lives)."""
    path = Path(text).expanduser()
    for candidate in (path, ROOT / path):
        if candidate.exists():
            return candidate
    return None


FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")  # a missing file, not a dataset id


def looks_like_dataset_id(text: str) -> bool:
    """`Org/Name` (dots allowed, as in `Org/Name-1.5`), not a path: one slash, no leading . / ~, no file suffix."""
    return (re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", text) is not None
            and Path(text).suffix.lower() not in FILE_SUFFIXES)


def load_rows(source: str, limit: int) -> tuple[list[tuple[str, dict]], str]:
    """([(where, row)], prompt column or "") of the first `limit` rows of a source."""
    path = local_path(source)
    if path is not None:  # a whole name that exists wins, colons and all
        where, split, column = source, "", ""
    else:
        where, _, rest = source.partition(":")
        split, _, column = rest.partition(":")
        if ":" in column:
            raise ValueError(f"{source}: expected WHERE[:split[:column]], with at most two ':'")
        path = local_path(where) if where else None
    if path is None:
        if not looks_like_dataset_id(where):
            raise FileNotFoundError(f"{where}: prompt file not found")
        return hub_rows(source, where, split, column, limit), column
    if path.is_dir():
        if not any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
            raise ValueError(f"{where}: is a directory; give a prompt file (.jsonl, .json, .parquet) or a folder "
                             f"written by save_to_disk")
        datasets = import_datasets(f"{where}: a save_to_disk folder")
        try:
            found = datasets.load_from_disk(str(path))
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
            raise ValueError(f"{where}: cannot load the save_to_disk folder ({first_line(err)})") from None
        return dataset_rows(found, where, split, column, limit), column
    if split:
        raise ValueError(f"{source}: a file has no splits; name a column as {where}::{split}")
    if path.suffix == ".parquet":
        return parquet_rows(path, where, column, limit), column
    if path.suffix == ".json":
        return json_rows(path, where, limit), column
    return [(f"{where}:{n}", row) for n, row in files.numbered_jsonl(path)][:limit or None], column


def json_rows(path: Path, where: str, limit: int) -> list[tuple[str, dict]]:
    """A JSON document: a list of rows, or {"data": [rows]}. A .json file of JSON Lines is read as JSON Lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object after another: JSON Lines under a .json name
            return [(f"{where}:{n}", r) for n, r in files.numbered_jsonl(path)][:limit or None]
        raise ValueError(f"{where}: not valid JSON ({err.msg} at line {err.lineno})") from None
    rows = doc.get("data") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise ValueError(f'{where}: expected a list of rows or {{"data": [rows]}}, got {type(doc).__name__}')
    rows = rows[:limit or None]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where} row {i}: expected a JSON object, got {type(row).__name__}")
    return [(f"{where} row {i}", row) for i, row in enumerate(rows)]


def parquet_rows(path: Path, where: str, column: str, limit: int) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet
    except ImportError:
        raise ValueError(f"{where}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{where}: not a readable parquet file ({first_line(err)})") from None
    check_columns(table.column_names, column, where)
    return table_rows(table.slice(0, limit or None).to_pylist(), where)


def hub_rows(source: str, name: str, split: str, column: str, limit: int) -> list[tuple[str, dict]]:
    """A dataset on the Hugging Face Hub, as datasets.load_dataset finds it (with HF_HUB_OFFLINE=1: in the cache)."""
    datasets = import_datasets(f"{source}: no such file or folder; as a dataset id it")
    try:
        found = datasets.load_dataset(name)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:  # not cached, offline, several configs
        raise FileNotFoundError(f"{source}: no such file or folder, and datasets.load_dataset({name!r}) failed "
                                f"({first_line(err)})") from None
    return dataset_rows(found, name, split, column, limit)


def dataset_rows(found, where: str, split: str, column: str, limit: int) -> list[tuple[str, dict]]:
    """The rows of a datasets Dataset, or of one split of a DatasetDict."""
    if isinstance(found, dict):  # a DatasetDict: pick the split
        splits = list(found.keys())
        if not split:
            split = splits[0] if len(splits) == 1 else "train" if "train" in splits else ""
            if not split:
                raise ValueError(f"{where}: name a split as {where}:SPLIT; splits: {', '.join(splits)}")
        if split not in splits:
            raise ValueError(f"{where}: no split {split!r}; splits: {', '.join(splits)}")
        found, where = found[split], f"{where}[{split}]"
    elif split:
        raise ValueError(f"{where}: a Dataset folder has no splits; name a column as {where}::{split}")
    check_columns(found.column_names, column, where)
    if limit:
        found = found.select(range(min(limit, len(found))))
    return table_rows(found.to_list(), where)


def import_datasets(what: str):
    try:
        import datasets
    except ImportError:  # an optional extra, imported only when a source needs it
        raise ValueError(f"{what} needs the datasets library: pip install datasets") from None
    return datasets


def check_columns(columns: list[str], column: str, where: str) -> None:
    """The prompt column must exist in a table: the one named, or `prompt` or `messages`."""
    if column and column not in columns:
        raise ValueError(f"{where}: no column {column!r}; columns: {', '.join(columns)}")
    if not column and "prompt" not in columns and "messages" not in columns:
        raise ValueError(f"{where}: no 'prompt' or 'messages' column; name the prompt column as WHERE:split:column; "
                         f"columns: {', '.join(columns)}")


def table_rows(rows: list[dict], where: str) -> list[tuple[str, dict]]:
    """A table has every column in every row: a null cell is a field the row lacks. Values JSON cannot hold (dates,
    bytes) are kept as their text, so that the records can be written to the run folder."""
    return [(f"{where} row {i}", json.loads(json.dumps({k: v for k, v in row.items() if v is not None}, default=str)))
            for i, row in enumerate(rows)]


def first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# ------------------------------------------------------------------------------------------------------ one row
def is_conversation(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def prompt_of(row: dict, column: str, where: str) -> tuple[str, list[dict]]:
    """(prompt, earlier turns) of a row: the named column, else `prompt` (it wins over `messages`), else `messages`."""
    if not column:
        column = "prompt" if row.get("prompt") is not None or row.get("messages") is None else "messages"
    value = row.get(column)
    if isinstance(value, str) or value is None:
        if value is None or not value.strip():
            also = " (or a 'messages' conversation)" if column == "prompt" else ""
            raise ValueError(f"{where}: missing or empty field {column!r}{also}")
        return value, []
    if not isinstance(value, list):
        raise ValueError(f"{where}: field {column!r} is neither a string nor a list of messages")
    for k, turn in enumerate(value):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise ValueError(f"{where}: bad {column!r}: turn {k} is not a {{role, content}} object with string values")
    users = [k for k, turn in enumerate(value) if turn["role"] == "user"]
    if not users:
        raise ValueError(f"{where}: bad {column!r}: no user turn")
    last = users[-1]  # turns after it answer it: someone else's response, not part of the prompt
    if not value[last]["content"].strip():
        raise ValueError(f"{where}: bad {column!r}: the last user turn is empty")
    return value[last]["content"], [dict(role=t["role"], content=t["content"]) for t in value[:last]]


def stable_id(prompt: str, context: list[dict]) -> str:
    """The id of a row that has none: the same prompt (and earlier turns) gets the same id in every run."""
    text = json.dumps([context, prompt], ensure_ascii=False) if context else prompt
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def make_record(row: dict, where: str, column: str, reward_spec: str, seen: dict) -> dict:
    """The record eva works on: the row's fields, its prompt (and context), an id, lineage and constraints.
    Conversation fields (lists of messages, e.g. UltraFeedback's chosen/rejected) hold others' responses: dropped."""
    prompt, context = prompt_of(row, column, where)
    record = {k: v for k, v in row.items()
              if k not in (column, "key") and (k == "context" or not is_conversation(v))}
    record["prompt"] = prompt
    if context:
        record["context"] = context
    ident = next((row[k] for k in ID_FIELDS if row.get(k) is not None), None)
    record["id"] = stable_id(prompt, context) if ident is None else str(ident)
    if record["id"] in seen:
        why = "" if ident is not None else " (a row without an id is named by the hash of its prompt: it repeats)"
        raise ValueError(f"{where}: duplicate id {record['id']!r}, first at {seen[record['id']]}{why}")
    seen[record["id"]] = where
    if reward.is_verifiable(reward_spec) and record.get("instruction_id_list") is None:
        raise ValueError(f"{where}: missing field 'instruction_id_list' (the rules reward checks those "
                         f"constraints; a plain prompt needs --reward hf:..., judge:... or py:...)")
    if record.get("instruction_id_list") is None:
        record["instruction_id_list"] = []
    if record.get("kwargs") is None and isinstance(record["instruction_id_list"], list):
        record["kwargs"] = [{} for _ in record["instruction_id_list"]]
    if isinstance(record.get("kwargs"), list):  # a table gives every kwargs dict every key, unused ones null (IFEval's)
        record["kwargs"] = [{k: v for k, v in kw.items() if v is not None} if isinstance(kw, dict) else kw
                            for kw in record["kwargs"]]
    if reward.is_verifiable(reward_spec):
        instructions.validate_record(record, where)
    record.setdefault("parent", None)
    record.setdefault("iteration", 0)
    record.setdefault("method", None)
    return record
