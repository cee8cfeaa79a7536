"""Prompt sets for probing pretrained models, and their tokenization into right-padded batches.

The default set (``pretrained/prompt_sets/default_prompts.json``, package data) is 43 short English texts written for
this project, tagged by genre -- news, fiction, code, dialogue, lists, science, recipes, history,
email, poetry, reviews and more -- each about 60-115 tokens long with a GPT-2-style BPE tokenizer.

Your own prompts come from ``prompts.file`` (:func:`read_prompt_file`): a ``.txt`` file with one prompt per
line, or a ``.jsonl`` file with one JSON object per line whose ``prompts.text_field`` (default ``text``)
holds the prompt. Blank lines are skipped; the first ``prompts.n`` prompts are used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import torch

from residual_dynamics.errors import ConfigError

DEFAULT_PROMPTS = "default_prompts.json"
PROMPT_SOURCES = ("default", "corpus", "file")
PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")


@dataclass
class PromptsConfig:
    """``prompts`` of ``python -m residual_dynamics.probe``.

    source:     default (the shipped prompt set) | corpus (held-out documents of the ``data`` group) |
                file (``file``; setting ``file`` alone selects it).
    file:       a .txt file (one prompt per line) or a .jsonl file (one JSON object per line, the prompt
                in ``text_field``); read and checked before the model is loaded.
    text_field: the field of a .jsonl line that holds the prompt.
    n:          number of prompts / documents (the first n of a file).
    max_len:    tokens per prompt, BOS included; longer ones are cut, shorter ones padded and masked.
    """

    source: str = "default"
    file: Optional[str] = None
    text_field: str = "text"
    n: int = 32
    max_len: int = 128

    def validated(self) -> "PromptsConfig":
        """Check every field -- a prompt file is read (its first ``n`` prompts) -- and return the config with
        ``source`` resolved (``file`` when a file is given with the default source)."""
        if self.source not in PROMPT_SOURCES:
            raise ConfigError("prompts.source", f"must be one of {', '.join(PROMPT_SOURCES)}, got {self.source!r}")
        for key, minimum in (("n", 1), ("max_len", 2)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"prompts.{key}", f"must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ConfigError("prompts.text_field", f"must be a non-empty string, got {self.text_field!r}")
        if self.file is not None and not str(self.file).strip():
            self.file = None  # an empty string counts as unset
        if self.source == "corpus" and self.file is not None:
            raise ConfigError("prompts.file", f"{self.file} was given with prompts.source=corpus; use one of them")
        if self.source == "file" and self.file is None:
            raise ConfigError("prompts.file", "is mandatory with prompts.source=file: prompts.file=/path/to/prompts.txt")
        if self.file is not None:
            self.source = "file"
            read_prompt_file(self.file, self.text_field, self.n)
        return self


def read_prompt_file(path: str | os.PathLike, text_field: str = "text", n: Optional[int] = None) -> list[str]:
    """The prompts of a .txt file (one per line) or a .jsonl file (``text_field`` of each JSON object line).

    Blank lines are skipped; reading stops after ``n`` prompts (all when None). Lines keep their text as is,
    without the line break. Every problem is a :class:`ConfigError` naming ``prompts.file`` (and the line):
    a missing file, another suffix, a file with no prompt, text that is not UTF-8, a line that is not a JSON
    object, a missing or non-string or empty ``text_field``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError("prompts.file", f"file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise ConfigError("prompts.file", f"{path}: expected a .txt file (one prompt per line) or a .jsonl file "
                                          f"(one JSON object per line), got a {suffix or 'suffix-less'} file")
    prompts: list[str] = []
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                prompts.append(line if suffix == ".txt" else _jsonl_text(line, text_field, path, number))
                if n is not None and len(prompts) >= n:
                    break
    except UnicodeDecodeError as error:
        raise ConfigError("prompts.file", f"{path}: not UTF-8 text ({error})") from None
    if not prompts:
        raise ConfigError("prompts.file", f"{path} holds no prompt (it is empty or blank)")
    return prompts


def _jsonl_text(line: str, text_field: str, path: Path, number: int) -> str:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError("prompts.file", f"{path}, line {number}: not valid JSON ({error.msg})") from None
    if not isinstance(entry, dict):
        raise ConfigError("prompts.file", f"{path}, line {number}: expected a JSON object, got "
                                          f"{type(entry).__name__}")
    if text_field not in entry:
        raise ConfigError("prompts.file", f"{path}, line {number}: no field {text_field!r} (prompts.text_field); "
                                          f"the line has {sorted(entry)}")
    text = entry[text_field]
    if not isinstance(text, str):
        raise ConfigError("prompts.file", f"{path}, line {number}: field {text_field!r} must be a string, got "
                                          f"{type(text).__name__}")
    if not text.strip():
        raise ConfigError("prompts.file", f"{path}, line {number}: field {text_field!r} is empty")
    return text


def load_prompts(name: str = DEFAULT_PROMPTS, *, genres: Optional[Sequence[str]] = None) -> list[str]:
    """The texts of a packaged prompt set (a JSON list of ``{"genre": ..., "text": ...}``).

    genres: keep only prompts of these genres (all when None).
    """
    entries = json.loads(resources.files("residual_dynamics.pretrained").joinpath("prompt_sets", name).read_text("utf-8"))
    if genres is not None:
        unknown = set(genres) - {entry["genre"] for entry in entries}
        if unknown:
            raise ValueError(f"no prompts of genre {sorted(unknown)} in {name}")
        entries = [entry for entry in entries if entry["genre"] in genres]
    return [entry["text"] for entry in entries]


def tokenize_prompts(
    tokenizer, prompts: Sequence[str], *, max_len: int, prepend_bos: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize prompts into one right-padded batch.

    Each prompt is encoded without the tokenizer's own special tokens; when ``prepend_bos`` the BOS
    token is put in front (so the result is the same whether or not the tokenizer adds BOS by itself).
    Prompts are cut to ``max_len`` tokens (BOS included) and padded on the right to the longest one.

    Returns ``(tokens, attention_mask)``, both LongTensor ``[n_prompts, pos]``; the mask is 1 on real
    tokens and 0 on padding. The padding id is the tokenizer's pad token, else its EOS token, else 0 --
    padded positions must be masked out, their value does not matter.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    if not prompts:
        raise ValueError("no prompts to tokenize")
    if max_len < 1 + int(prepend_bos):
        raise ValueError(f"max_len={max_len} leaves no room for a token")
    prefix: list[int] = []
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError(f"prepend_bos=True but {type(tokenizer).__name__} has no BOS token")
        prefix = [tokenizer.bos_token_id]

    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    rows = [(prefix + ids)[:max_len] for ids in encoded]
    empty = [index for index, row in enumerate(rows) if not row]
    if empty:
        raise ValueError(f"prompt {empty[0]} tokenizes to nothing")

    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    width = max(len(row) for row in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, : len(row)] = 1
    return tokens, attention_mask
