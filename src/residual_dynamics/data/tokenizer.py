"""Tokenizers, always returned as a ``transformers.PreTrainedTokenizerFast``.

* ``tokenizer=bpe``: a byte-level BPE (GPT-2 style pre-tokenizer, no unknown tokens) trained with the
  ``tokenizers`` library on the training split of the corpus, with ``<|endoftext|>`` (id 0) as its only
  special token, used as bos/eos/unk like GPT-2's. Cached under ``<cache_dir>/tokenizers/`` keyed by the
  corpus, the split and ``vocab_size``. On a tiny corpus the vocabulary may end up smaller than asked:
  use ``len(tokenizer)``.
* ``tokenizer=gpt2``: ``AutoTokenizer.from_pretrained(path)``, a hub name or a local directory; it
  must be a fast tokenizer with an eos token (the document separator).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from residual_dynamics.data.cache import build_lock, remove_stale_temporaries, stable_hash
from residual_dynamics.data.config import TokenizerSettings
from residual_dynamics.data.corpus import Corpus
from residual_dynamics.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"


def load_tokenizer(
    settings: TokenizerSettings, corpus: Corpus, val_period: int, cache_dir: Path
) -> PreTrainedTokenizerFast:
    """The tokenizer named by validated settings; ``bpe`` is trained on the corpus's training split."""
    if settings.name == "gpt2":
        return load_pretrained_tokenizer(settings.path)
    return cached_bpe_tokenizer(corpus, val_period, settings.vocab_size, Path(cache_dir))


def train_bpe(documents: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with ``<|endoftext|>`` as id 0 on ``documents``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def cached_bpe_tokenizer(corpus: Corpus, val_period: int, vocab_size: int, cache_dir: Path) -> PreTrainedTokenizerFast:
    """:func:`train_bpe` on the training documents, saved once under ``cache_dir/tokenizers/bpe-<key>``.

    A cache that fails to load is logged and trained again. Training holds the entry's
    :func:`~residual_dynamics.data.cache.build_lock`, so concurrent runs train it once.
    """
    key = stable_hash(
        {"corpus": corpus.key, "val_period": val_period, "vocab_size": vocab_size, "tokenizers": tokenizers.__version__}
    )
    final = cache_dir / "tokenizers" / f"bpe-{key}"
    if final.exists():
        try:
            return _checked(PreTrainedTokenizerFast.from_pretrained(str(final)), str(final))
        except (OSError, ValueError, ConfigError):
            pass  # looked at again under the lock, where it is retrained
    with build_lock(final):  # one process trains it, the others wait and load it
        if final.exists():
            try:
                return _checked(PreTrainedTokenizerFast.from_pretrained(str(final)), str(final))
            except (OSError, ValueError, ConfigError) as e:
                log.warning("tokenizer cache %s is unusable (%s); training it again", final, e)
                shutil.rmtree(final)
        remove_stale_temporaries(final.parent, prefix=f".{final.name}.")
        return _train_and_cache(corpus, val_period, vocab_size, final)


def _train_and_cache(corpus: Corpus, val_period: int, vocab_size: int, final: Path) -> PreTrainedTokenizerFast:
    log.info("training a %d-token byte-level BPE on the %s corpus", vocab_size, corpus.name)
    tok = train_bpe(corpus.train_documents(val_period), vocab_size)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    tok.save_pretrained(str(tmp))
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same tokenizer first; its copy is identical
        shutil.rmtree(tmp)
    # reload from the cache, so a fresh run gets exactly the tokenizer (and name_or_path) a cached run gets
    return _checked(PreTrainedTokenizerFast.from_pretrained(str(final)), str(final))


def load_pretrained_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """``AutoTokenizer.from_pretrained(path)`` (hub name or local directory), checked for a fast tokenizer with eos."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load tokenizer {path!r} (tokenizer.path; a hub name or a local directory): {e}") from e
    return _checked(tok, path)


def _checked(tok: object, path: str) -> PreTrainedTokenizerFast:
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ConfigError("tokenizer.path", f"{path!r} is not a fast (tokenizers-backed) tokenizer")
    if tok.eos_token_id is None:
        raise ConfigError("tokenizer.path", f"{path!r} has no end-of-text (eos) token to separate documents")
    return tok


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """sha256 of the full tokenizer definition (vocabulary, merges, special tokens) and its eos id.

    Stored in the shard manifest and in every training checkpoint (``hyper_parameters["data"]``); a
    resume whose tokenizer has another fingerprint is refused, naming both."""
    blob = f"{tok.eos_token_id}\n{tok.backend_tokenizer.to_str()}".encode()
    return hashlib.sha256(blob).hexdigest()


def document_encoder(tok: PreTrainedTokenizerFast) -> Tokenizer:
    """A copy of the backend tokenizer that encodes special-token strings found in text as plain text,
    so only the separators inserted between documents are end-of-text tokens."""
    encoder = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    encoder.encode_special_tokens = True
    return encoder
