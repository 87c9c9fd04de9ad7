"""What an evaluation generates from: prompts (from a file) or class labels, one per sample.

Prompt files, COCO-captions style:

- ``.txt``: one prompt per line (blank lines skipped);
- ``.csv``: a header row with a ``caption``, ``prompt`` or ``text`` column;
- ``.jsonl``: one JSON object per line with a ``caption``, ``prompt`` or ``text`` key (or a bare
  JSON string);
- ``.json``: a COCO captions annotation file (``{"annotations": [{"caption": ...}, ...]}``) or a
  JSON list of strings / objects as in ``.jsonl``.

Every sample has a *group*: the index of its prompt or its class label. Samples of one group
differ only in their seed, which is what per-condition diversity compares.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

import torch

from ..errors import StepdistillError

PROMPT_KEYS = ("caption", "prompt", "text")


@dataclass(frozen=True)
class Conditions:
    """One condition per sample: ``prompts`` (text-to-image), ``labels`` (class-conditional) or neither."""

    groups: torch.Tensor  # int64 [N]: prompt index or class label of each sample
    prompts: list[str] | None = None  # [N] when prompt-conditioned
    labels: torch.Tensor | None = None  # int64 [N] when class-conditioned

    def __len__(self) -> int:
        return int(self.groups.shape[0])

    @property
    def kind(self) -> str:
        return "prompts" if self.prompts is not None else "labels" if self.labels is not None else "none"

    def head(self, count: int) -> "Conditions":
        """The first ``count`` samples' conditions."""
        return Conditions(
            groups=self.groups[:count],
            prompts=None if self.prompts is None else self.prompts[:count],
            labels=None if self.labels is None else self.labels[:count],
        )


def _prompt_from_record(record, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        for key in PROMPT_KEYS:
            if isinstance(record.get(key), str):
                return record[key]
    raise StepdistillError(f"{where}: expected a string or an object with a {'/'.join(PROMPT_KEYS)} field")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise StepdistillError(f"prompts file not found: {path}") from None
    except IsADirectoryError:
        raise StepdistillError(f"prompts file is a directory: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StepdistillError(f"cannot read prompts file {path}: {exc}".splitlines()[0]) from None


def load_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a ``.txt`` / ``.csv`` / ``.jsonl`` / ``.json`` file, in file order."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".txt", ".csv", ".jsonl", ".json"):
        raise StepdistillError(f"prompts file {path} must end in .txt, .csv, .jsonl or .json")
    text = _read_text(path)
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines()]
    elif suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        columns = [c for c in PROMPT_KEYS if rows and c in rows[0]]
        if not columns:
            found = ", ".join(rows[0].keys()) if rows else "none"
            raise StepdistillError(f"{path}: need a {'/'.join(PROMPT_KEYS)} column in the header row (found: {found})")
        prompts = [(row[columns[0]] or "").strip() for row in rows]
    elif suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StepdistillError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            prompts.append(_prompt_from_record(record, f"{path}:{number}").strip())
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StepdistillError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        records = data.get("annotations") if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise StepdistillError(f"{path}: expected a COCO captions file (an 'annotations' list) or a JSON list")
        prompts = [_prompt_from_record(r, f"{path}[{i}]").strip() for i, r in enumerate(records)]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise StepdistillError(f"prompts file {path} holds no prompts")
    return prompts


def prompt_conditions(prompts: list[str], samples_per_prompt: int) -> Conditions:
    """Each prompt ``samples_per_prompt`` times, seed-major: the first ``len(prompts)`` samples
    cover every prompt once (what the sample grid shows), then the second seed of each, etc."""
    if samples_per_prompt < 1:
        raise StepdistillError(f"samples per prompt must be at least 1; got {samples_per_prompt}")
    if not prompts:
        raise StepdistillError("no prompts to evaluate")
    groups = torch.arange(len(prompts)).repeat(samples_per_prompt)
    return Conditions(groups=groups, prompts=[prompts[int(g)] for g in groups])


def label_conditions(labels: torch.Tensor) -> Conditions:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0:
        raise StepdistillError("no class labels to evaluate")
    return Conditions(groups=labels.clone(), labels=labels)


def unconditional(num_samples: int) -> Conditions:
    """For unconditional pipelines: all samples form one group."""
    return Conditions(groups=torch.zeros(num_samples, dtype=torch.long))
