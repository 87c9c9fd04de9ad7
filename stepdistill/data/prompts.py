"""Prompt files, COCO-captions style, and inline prompt lists.

- ``.txt``: one prompt per line (blank lines skipped);
- ``.csv``: a header row with a ``caption``, ``prompt`` or ``text`` column;
- ``.jsonl``: one JSON object per line with a ``caption``, ``prompt`` or ``text`` key (or a bare
  JSON string);
- ``.json``: a COCO captions annotation file (``{"annotations": [{"caption": ...}, ...]}``) or a
  JSON list of strings / objects as in ``.jsonl``.
"""

from __future__ import annotations

import csv
import json
import os

from ..errors import DataError

PROMPT_KEYS = ("caption", "prompt", "text")


def _prompt_from_record(record, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in PROMPT_KEYS:
            if isinstance(record.get(key), str):
                return record[key]
    raise DataError(f"{where}: expected a string or an object with a {'/'.join(PROMPT_KEYS)} field")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"prompts file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"prompts file is a directory: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read prompts file {path}: {exc}".splitlines()[0]) from None


def load_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a ``.txt`` / ``.csv`` / ``.jsonl`` / ``.json`` file, in file order."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".txt", ".csv", ".jsonl", ".json"):
        raise DataError(f"prompts file {path} must end in .txt, .csv, .jsonl or .json")
    text = _read_text(path)
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
    elif suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        columns = [c for c in PROMPT_KEYS if rows and c in rows[0]]
        if not columns:
            found = ", ".join(rows[0].keys()) if rows else "none"
            raise DataError(f"{path}: need a {'/'.join(PROMPT_KEYS)} column in the header row (found: {found})")
        prompts = [(row[columns[0]] or "").strip() for row in rows]
    elif suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            prompts.append(_prompt_from_record(record, f"{path}:{number}").strip())
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        records = data.get("annotations") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a COCO captions file (an 'annotations' list) or a JSON list")
        prompts = [_prompt_from_record(r, f"{path}[{i}]").strip() for i, r in enumerate(records)]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DataError(f"prompts file {path} holds no prompts")
    return prompts


def prompt_list(prompts: list[str], prompts_file: str | os.PathLike | None) -> list[str]:
    """A recipe's inline ``prompts`` followed by those of ``prompts_file`` (blank ones dropped)."""
    result = [p.strip() for p in prompts if p.strip()]
    if prompts_file:
        result += load_prompts(prompts_file)
    if not result:
        raise DataError("no prompts: give data.prompts or data.prompts_file")
    return result
