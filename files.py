"""JSON Lines in and out, and atomic writes: the one place eva reads and writes its record files.

    numbered_jsonl(path) -> [(line number, record)]   bad input raises one line naming file:line
    read_jsonl(path)     -> [record]
    write_atomic(path, text_or_object)                 temporary name, fsync, rename (torch.save for non-text)
    write_jsonl(path, records)                         one JSON object per line, atomically
"""
import json
import os
from pathlib import Path


def numbered_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line, so errors name the file's own line numbers."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(file, "rb") as f:  # lines end at \n only: JSON strings may hold U+2028 unescaped
            raw_lines = f.readlines()
    except OSError as err:  # a directory, a file without read permission, ...
        raise ValueError(f"{path}: cannot be read ({err.strerror or err})") from None
    records = []
    for lineno, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # utf-8-sig: a leading byte-order mark is fine
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {err.start + 1} of the line is "
                             f"{raw[err.start]:#04x}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append((lineno, record))
    return records


def read_jsonl(path: str | Path) -> list[dict]:
    return [record for _, record in numbered_jsonl(path)]


def write_atomic(path: str | Path, content) -> None:
    """Write to a temporary name, fsync, then rename: a killed run never leaves a half file that looks whole.
    content: text, or any object for torch.save (checkpoints)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = isinstance(content, str)
    with open(tmp, "w" if text else "wb", encoding="utf-8" if text else None) as f:
        if text:
            f.write(content)
        else:
            import torch  # only checkpoints need it
            torch.save(content, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a lost node keeps no empty "finished" file
    os.replace(tmp, path)


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
