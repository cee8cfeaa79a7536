"""Prompt sets for probing pretrained models, and their tokenization into right-padded batches.

The default set (``pretrained/prompt_sets/default_prompts.json``, package data) is 43 short English texts written for
this project, tagged by genre -- news, fiction, code, dialogue, lists, science, recipes, history,
email, poetry, reviews and more -- each about 60-115 tokens long with a GPT-2-style BPE tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Optional, Sequence

import torch

from residual_dynamics.errors import ConfigError

DEFAULT_PROMPTS = "default_prompts.json"
PROMPT_SOURCES = ("default", "corpus")


@dataclass
class PromptsConfig:
    """``prompts`` of ``python -m residual_dynamics.probe``.

    source:  default (the shipped prompt set) | corpus (held-out documents of the ``data`` group).
    n:       number of prompts / documents.
    max_len: tokens per prompt, BOS included; longer ones are cut, shorter ones padded and masked.
    """

    source: str = "default"
    n: int = 32
    max_len: int = 128

    def validated(self) -> "PromptsConfig":
        if self.source not in PROMPT_SOURCES:
            raise ConfigError("prompts.source", f"must be one of {', '.join(PROMPT_SOURCES)}, got {self.source!r}")
        for key, minimum in (("n", 1), ("max_len", 2)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"prompts.{key}", f"must be an integer >= {minimum}, got {value!r}")
        return self


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
