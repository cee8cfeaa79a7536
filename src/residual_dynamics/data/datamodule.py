"""Batches over the token shards: the Lightning data module and the fixed held-out samples.

Training batches are random windows of ``seq_len + 1`` tokens (inputs plus next-token targets) from the
training split; batch number ``step`` is a pure function of ``(seed, rank, step)``, so a run resumed
from a checkpoint sees the same batches as an uninterrupted one. Validation batches, the probe batch
and :func:`sample_sequences` use fixed windows spread evenly over the held-out split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerFast

from residual_dynamics.data.config import DataSettings, TokenizerSettings
from residual_dynamics.data.corpus import open_corpus
from residual_dynamics.data.shards import TokenShards, build_or_load_shards, fixed_window_starts
from residual_dynamics.data.tokenizer import load_tokenizer
from residual_dynamics.errors import DataError

_NOT_READY = "TokenDataModule: call prepare_data() and setup() first"


def prepare_token_data(
    data: DataSettings, tokenizer: TokenizerSettings, cache_dir: str | Path
) -> tuple[PreTrainedTokenizerFast, TokenShards]:
    """Open the corpus, load or train the tokenizer, and build or load the verified shards (all cached)."""
    cache_dir = Path(cache_dir)
    corpus = open_corpus(data, cache_dir)
    tok = load_tokenizer(tokenizer, corpus, data.val_period, cache_dir)
    return tok, build_or_load_shards(corpus, tok, data.val_period, data.shard_dtype, cache_dir)


def _gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """LongTensor [len(starts), length] of the windows ``tokens[s : s + length]``."""
    return torch.from_numpy(np.stack([tokens[s : s + length].astype(np.int64) for s in starts]))


def fixed_windows(shards: TokenShards, split: str, n: int, length: int) -> torch.Tensor:
    """LongTensor [n, length]: ``n`` windows spread evenly over a split, the same on every call."""
    tokens = shards.tokens(split)
    return _gather(tokens, fixed_window_starts(len(tokens), n, length), length)


def sample_sequences(data: DataSettings, tokenizer: TokenizerSettings, cache_dir: str | Path, n: int,
                     seq_len: int) -> torch.Tensor:
    """LongTensor [n, seq_len] of fixed held-out sequences from any corpus, e.g. prompts for a pretrained model.

    Builds (or loads) the same cached shards as :class:`TokenDataModule`; the sequences are windows
    spread evenly over the held-out split (they overlap only if it holds fewer than ``n * seq_len`` tokens).
    """
    _, shards = prepare_token_data(data, tokenizer, cache_dir)
    return fixed_windows(shards, "val", n, seq_len)


class _MemmapTokens:
    """Lazily memory-maps a shard; the map is reopened (not pickled) in each DataLoader worker."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self._tokens: Optional[np.memmap] = None

    @property
    def tokens(self) -> np.memmap:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        return self._tokens

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


class RandomWindowBatches(_MemmapTokens, IterableDataset):
    """Endless training batches, LongTensor [batch_size, seq_len + 1], starting at batch ``start_step``.

    Batch ``step`` holds ``batch_size`` windows at uniform random offsets drawn from
    ``np.random.default_rng([seed, rank, step])``. With ``num_workers > 0`` worker ``w`` of ``W`` makes
    batches ``start_step + w``, ``start_step + w + W``, ...; the DataLoader's round-robin keeps them in order.
    """

    def __init__(
        self, path: Path, dtype: np.dtype, seq_len: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0
    ):
        super().__init__(path, dtype)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.start_step, self.rank = start_step, rank

    def batch(self, step: int) -> torch.Tensor:
        length = self.seq_len + 1
        rng = np.random.default_rng([self.seed, self.rank, step])
        starts = rng.integers(0, len(self.tokens) - length, size=self.batch_size, endpoint=True)
        return _gather(self.tokens, starts, length)

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker = get_worker_info()
        step, stride = self.start_step, 1
        if worker is not None:
            step, stride = step + worker.id, worker.num_workers
        while True:
            yield self.batch(step)
            step += stride


class FixedWindows(_MemmapTokens, Dataset):
    """Map-style dataset of the windows ``tokens[s : s + length]`` for fixed starts ``s``."""

    def __init__(self, path: Path, dtype: np.dtype, starts: np.ndarray, length: int):
        super().__init__(path, dtype)
        self.starts, self.length = starts, length

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        s = self.starts[i]
        return torch.from_numpy(self.tokens[s : s + self.length].astype(np.int64))


class TokenDataModule(L.LightningDataModule):
    """Token batches for language-model training on the corpus and tokenizer of the config.

    ``data`` / ``tokenizer`` are the validated ``data`` and ``tokenizer`` settings (``seq_len``,
    ``batch_size`` and ``num_workers`` are read from ``data``). :meth:`prepare_data` / :meth:`setup` build
    or load the cached corpus, tokenizer and shards under ``cache_dir``; after that :attr:`tokenizer`,
    :attr:`vocab_size`, the dataloaders and :meth:`probe_batch` are available.

    The training dataloader is endless (set the trainer's ``max_steps``). When attached to a trainer it
    starts at batch ``global_step * accumulate_grad_batches``, which continues a resumed run exactly.
    """

    def __init__(self, data: DataSettings, tokenizer: TokenizerSettings, cache_dir: str | Path, seed: int):
        super().__init__()
        self.data, self.tokenizer_settings = data, tokenizer
        self.cache_dir = Path(cache_dir)
        self.seq_len, self.batch_size, self.num_workers = data.seq_len, data.batch_size, data.num_workers
        self.seed = seed
        self._tokenizer: Optional[PreTrainedTokenizerFast] = None
        self._shards: Optional[TokenShards] = None

    def prepare_data(self) -> None:
        self._load()

    def setup(self, stage: Optional[str] = None) -> None:
        self._load()

    def _load(self) -> None:
        if self._shards is not None:
            return
        tok, shards = prepare_token_data(self.data, self.tokenizer_settings, self.cache_dir)
        for split, n_tokens in shards.n_tokens.items():
            if n_tokens < self.seq_len + 1:
                raise DataError(
                    f"{shards.path(split)}: the {split} split has {n_tokens} tokens, fewer than seq_len + 1 = "
                    f"{self.seq_len + 1}; use a bigger corpus, a shorter seq_len or another data.val_fraction"
                )
        self._tokenizer, self._shards = tok, shards

    @property
    def shards(self) -> TokenShards:
        if self._shards is None:
            raise RuntimeError(_NOT_READY)
        return self._shards

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        if self._tokenizer is None:
            raise RuntimeError(_NOT_READY)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)``: every token id in the shards is below it."""
        return self.shards.vocab_size

    def train_dataloader(self) -> DataLoader:
        start_step, rank = 0, 0
        if self.trainer is not None:
            start_step = self.trainer.global_step * self.trainer.accumulate_grad_batches
            rank = self.trainer.global_rank
        batches = RandomWindowBatches(
            self.shards.path("train"), self.shards.dtype, self.seq_len, self.batch_size, self.seed, start_step, rank
        )
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Up to ``data.val_batches`` batches of non-overlapping windows spread over the held-out split."""
        length = self.seq_len + 1
        n_val = self.shards.n_tokens["val"]
        n = min(self.data.val_batches * self.batch_size, n_val // length)
        starts = fixed_window_starts(n_val, n, length)
        windows = FixedWindows(self.shards.path("val"), self.shards.dtype, starts, length)
        return DataLoader(windows, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def probe_batch(self, n: int, seq_len: int) -> torch.Tensor:
        """LongTensor [n, seq_len], a fixed held-out batch (the same on every call)."""
        return fixed_windows(self.shards, "val", n, seq_len)
