"""Data pipeline: corpora, tokenizers, packed token shards and the Lightning data module.

Config groups ``data`` (embedded | text_files | openwebtext) and ``tokenizer`` (bpe | gpt2); see
:mod:`.config` for the fields, :mod:`.corpus` for the sources and the held-out split, :mod:`.shards`
for the cache format and :mod:`.datamodule` for the batches.
"""

from residual_dynamics.data.config import DataSettings, TokenizerSettings, validate_data_config
from residual_dynamics.data.corpus import Corpus, iter_parquet_documents, open_corpus, stdlib_documents
from residual_dynamics.data.datamodule import TokenDataModule, prepare_token_data, sample_sequences
from residual_dynamics.data.shards import TokenShards, build_or_load_shards
from residual_dynamics.data.tokenizer import EOT_TOKEN, load_tokenizer, train_bpe

__all__ = [
    "EOT_TOKEN",
    "Corpus",
    "DataSettings",
    "TokenDataModule",
    "TokenShards",
    "TokenizerSettings",
    "build_or_load_shards",
    "iter_parquet_documents",
    "load_tokenizer",
    "open_corpus",
    "prepare_token_data",
    "sample_sequences",
    "stdlib_documents",
    "train_bpe",
    "validate_data_config",
]
