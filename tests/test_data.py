"""Tests of the data pipeline: config validation, corpora, tokenizers, shard cache and batches.

Everything runs offline on corpora made in tmp_path (plus the embedded standard-library corpus); an
autouse fixture makes any TCP/IP connection attempt fail.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import socket
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

from residual_dynamics.data import (
    EOT_TOKEN,
    TokenDataModule,
    prepare_token_data,
    sample_sequences,
    validate_data_config,
)
from residual_dynamics.data import corpus as corpus_module
from residual_dynamics.data import shards as shards_module
from residual_dynamics.data import tokenizer as tokenizer_module
from residual_dynamics.data.config import DataSettings
from residual_dynamics.data.corpus import _load_embedded, _stdlib_sources, open_corpus
from residual_dynamics.data.datamodule import RandomWindowBatches
from residual_dynamics.data.shards import resolve_shard_dtype
from residual_dynamics.errors import ConfigError, DataError

BPE = {"name": "bpe", "vocab_size": 300}
WORDS = (
    "the residual stream of a small transformer grows with depth while attention heads read and write "
    "features that later layers clean up so the norm of each token vector tells us how much was added"
).split()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any TCP/IP connection (Unix sockets, used by DataLoader workers, stay allowed)."""
    real_connect = socket.socket.connect

    def connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access in a test: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def make_documents(n: int, words: int = 80, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(words)) + "." for i in range(n)]


@pytest.fixture
def txt_dir(tmp_path) -> tuple[Path, list[str]]:
    """A directory of 30 .txt documents (doc00.txt ... doc29.txt) and the documents in sorted order."""
    root = tmp_path / "corpus"
    root.mkdir()
    docs = make_documents(30)
    for i, doc in enumerate(docs):
        (root / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return root, docs


def text_cfg(root: Path, **overrides) -> dict:
    return {"name": "text_files", "path": str(root), "val_fraction": 0.2, **overrides}


def make_module(
    data_cfg: dict, cache_dir: Path, tokenizer_cfg: dict = BPE, seq_len: int = 16, batch_size: int = 4, **kw
) -> TokenDataModule:
    """A TokenDataModule (seed 0 unless given) after prepare_data() and setup()."""
    dm = data_module(data_cfg, tokenizer_cfg, cache_dir, seq_len=seq_len, batch_size=batch_size, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def data_module(data_cfg: dict, tokenizer_cfg: dict, cache_dir, seq_len: int = 16, batch_size: int = 4,
                seed: int = 0, num_workers: int = 0) -> TokenDataModule:
    """A TokenDataModule from validated settings, as the training entry point builds it."""
    data, tokenizer = validate_data_config({**data_cfg, "seq_len": seq_len, "batch_size": batch_size,
                                            "num_workers": num_workers}, tokenizer_cfg, seq_len)
    return TokenDataModule(data, tokenizer, str(cache_dir), seed=seed)


def expected_stream(tok: PreTrainedTokenizerFast, docs: list[str]) -> list[int]:
    return [t for doc in docs for t in tok(doc, add_special_tokens=False).input_ids + [tok.eos_token_id]]


def contains_window(tokens: np.ndarray, window: np.ndarray) -> bool:
    """Whether ``window`` occurs as a contiguous run in ``tokens``."""
    views = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens, dtype=np.int64), len(window))
    return bool((views == np.asarray(window)).all(axis=1).any())


# --- config validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data_cfg, tokenizer_cfg, field",
    [
        ({"name": "wikipedia"}, BPE, "data.name"),
        ({"name": "text_files"}, BPE, "data.path"),
        ({"name": "text_files", "path": "/nonexistent/corpus"}, BPE, "data.path"),
        ({"name": "embedded", "val_fraction": 0.0}, BPE, "data.val_fraction"),
        ({"name": "embedded", "val_fraction": 0.9}, BPE, "data.val_fraction"),
        ({"name": "embedded", "val_batches": 0}, BPE, "data.val_batches"),
        ({"name": "embedded", "shard_dtype": "int8"}, BPE, "data.shard_dtype"),
        ({"name": "embedded", "shard_dtype": "uint16"}, {"name": "bpe", "vocab_size": 70000}, "data.shard_dtype"),
        ({"name": "embedded", "val_fration": 0.1}, BPE, "data.val_fration"),
        ({"name": "openwebtext", "data_files": "/nonexistent/*.parquet"}, BPE, "data.data_files"),
        ({"name": "openwebtext", "max_documents": 0}, BPE, "data.max_documents"),
        ({"name": "embedded"}, {"name": "bpe", "vocab_size": 100}, "tokenizer.vocab_size"),
        ({"name": "embedded"}, {"name": "sentencepiece"}, "tokenizer.name"),
        ({"name": "embedded"}, {"name": "gpt2", "path": "/nonexistent/tokenizer"}, "tokenizer.path"),
    ],
)
def test_bad_config_names_the_field(data_cfg, tokenizer_cfg, field):
    with pytest.raises(ConfigError) as err:
        validate_data_config(data_cfg, tokenizer_cfg, seq_len=16)
    assert err.value.field == field


def test_text_files_without_matching_files_fails_before_compute(tmp_path):
    (tmp_path / "notes.md").write_text("not a corpus file")
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as err:
        data_module(text_cfg(tmp_path), BPE, cache)
    assert err.value.field == "data.path"
    assert not cache.exists()


def test_config_files_parse_and_default_to_the_documented_values():
    from omegaconf import OmegaConf

    from composed import group_node

    for name in ("embedded", "text_files", "openwebtext"):
        cfg = group_node("data", name)
        assert cfg.name == name and cfg.seq_len == 128 and cfg.batch_size == 16 and cfg.num_workers == 0
        assert set(cfg) == set(DataSettings.__dataclass_fields__)
    assert group_node("data", "openwebtext").val_fraction == 0.01
    bpe, gpt2 = (group_node("tokenizer", name) for name in ("bpe", "gpt2"))
    assert (bpe.name, bpe.vocab_size) == ("bpe", 4096)
    assert (gpt2.name, gpt2.path) == ("gpt2", "gpt2")
    # The default pair validates as is (embedded needs no path).
    validate_data_config(group_node("data", "embedded"), bpe, 128)


def test_shard_dtype_resolution():
    assert resolve_shard_dtype("auto", 65536) == np.uint16
    assert resolve_shard_dtype("auto", 65537) == np.uint32
    assert resolve_shard_dtype("uint32", 300) == np.uint32
    with pytest.raises(ConfigError) as err:
        resolve_shard_dtype("uint16", 100_000)
    assert err.value.field == "data.shard_dtype"


# --- corpora -----------------------------------------------------------------------------------------


def test_text_files_reads_txt_and_jsonl_in_sorted_order(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"body": "second"}\n\n{"body": "third", "id": 3}\n')
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("fourth")
    (tmp_path / "sub" / "empty.txt").write_text("  \n")
    (tmp_path / "README.md").write_text("ignored")
    corpus = open_corpus(DataSettings.from_cfg(text_cfg(tmp_path, text_field="body")), tmp_path / "cache")
    assert list(corpus.documents()) == ["first", "second", "third", "fourth"]
    # val_fraction 0.5: documents 0 and 2 are held out.
    assert [doc for is_val, doc in corpus.split_documents(2) if is_val] == ["first", "third"]


@pytest.mark.parametrize(
    "content, message", [('{"text": "ok"}\n{"text": 5}\n', "b.jsonl:2"), ('{"text": "ok"}\nnot json\n', "b.jsonl:2")]
)
def test_bad_jsonl_line_is_a_data_error_naming_file_and_line(tmp_path, content, message):
    (tmp_path / "b.jsonl").write_text(content)
    corpus = open_corpus(DataSettings.from_cfg(text_cfg(tmp_path)), tmp_path / "cache")
    with pytest.raises(DataError, match=message):
        list(corpus.documents())


def test_openwebtext_local_parquet_goes_through_the_hub_code_path(tmp_path, monkeypatch):
    docs = make_documents(40)
    pq.write_table(pa.table({"text": docs[:25], "url": ["u"] * 25}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"text": docs[25:], "url": ["u"] * 15}), tmp_path / "part-1.parquet")
    local_cfg = {"name": "openwebtext", "data_files": str(tmp_path / "*.parquet"), "max_documents": 30}
    local = DataSettings.from_cfg(local_cfg)
    assert list(open_corpus(local, tmp_path).documents()) == docs[:30]

    # The default config streams the hub's Parquet conversion through the very same function.
    calls = []
    monkeypatch.setattr(corpus_module, "iter_parquet_documents", lambda *args: calls.append(args) or iter(["x"]))
    hub = DataSettings.from_cfg({"name": "openwebtext", "max_documents": 7})
    list(open_corpus(hub, tmp_path).documents())
    list(open_corpus(local, tmp_path).documents())
    assert calls == [
        (("hf://datasets/Skylion007/openwebtext@refs/convert/parquet/*/*train/*.parquet",), "text", 7),
        ((str(tmp_path / "*.parquet"),), "text", 30),
    ]


def test_openwebtext_local_parquet_end_to_end(tmp_path):
    pq.write_table(pa.table({"text": make_documents(40)}), tmp_path / "owt.parquet")
    data_cfg = {"name": "openwebtext", "data_files": str(tmp_path / "owt.parquet"), "val_fraction": 0.1}
    dm = make_module(data_cfg, tmp_path / "cache")
    assert dm.shards.n_documents == {"train": 36, "val": 4}
    assert next(iter(dm.train_dataloader())).shape == (4, 17)


def test_parquet_without_the_text_column_is_a_data_error(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    data = DataSettings.from_cfg({"name": "openwebtext", "data_files": str(tmp_path / "x.parquet")})
    corpus = open_corpus(data, tmp_path)
    with pytest.raises(DataError, match="no column 'text'"):
        list(corpus.documents())


def test_stdlib_sources_are_sorted_and_skip_tests():
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [p.relative_to(root).as_posix() for p in _stdlib_sources(root)]
    assert rel == sorted(rel) and "json/__init__.py" in rel and "this.py" in rel
    assert not any(part in {"test", "tests", "site-packages"} for r in rel for part in r.split("/"))


def test_corrupt_embedded_corpus_cache_is_detected(tmp_path, caplog):
    path = tmp_path / "embedded.json"
    docs = ["alpha", "beta"]
    path.write_text(json.dumps({"sha256": hashlib.sha256(json.dumps(docs).encode()).hexdigest(), "documents": docs}))
    assert _load_embedded(path)[0] == docs
    path.write_text(path.read_text().replace("beta", "bets"))
    with caplog.at_level(logging.WARNING):
        assert _load_embedded(path) == (None, None)
    assert "corrupt" in caplog.text


@pytest.fixture(scope="module")
def embedded_module(tmp_path_factory) -> TokenDataModule:
    """The offline default (embedded corpus + byte-level BPE), with a small vocabulary to keep it quick."""
    cache = tmp_path_factory.mktemp("embedded-cache")
    return make_module({"name": "embedded"}, cache, {"name": "bpe", "vocab_size": 512}, seq_len=64, batch_size=8)


def test_embedded_default_is_real_english_offline(embedded_module):
    dm = embedded_module
    assert sum(dm.shards.n_documents.values()) > 500
    assert dm.shards.n_tokens["train"] > 500_000 and dm.shards.dtype == np.uint16
    assert dm.vocab_size == len(dm.tokenizer) == 512
    text = dm.tokenizer.decode(dm.probe_batch(8, 64).flatten())
    assert sum(text.count(f" {w} ") for w in ("the", "of", "a", "is", "to")) > 20


# --- tokenizers --------------------------------------------------------------------------------------


def test_bpe_is_byte_level_with_end_of_text_and_cached(txt_dir, tmp_path, monkeypatch):
    root, _ = txt_dir
    data, tok_settings = validate_data_config(text_cfg(root), BPE, 16)
    corpus = open_corpus(data, tmp_path)
    tok = tokenizer_module.load_tokenizer(tok_settings, corpus, data.val_period, tmp_path)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == tok.bos_token == EOT_TOKEN and tok.eos_token_id == 0
    assert 257 <= len(tok) <= 300
    text = "naïve café — 😀 unseen\n\ttabs"
    assert tok.decode(tok(text).input_ids) == text

    # A second call loads the cached tokenizer instead of training.
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda *a: pytest.fail("retrained a cached tokenizer"))
    again = tokenizer_module.load_tokenizer(tok_settings, corpus, data.val_period, tmp_path)
    assert again.get_vocab() == tok.get_vocab()


def test_corrupt_bpe_cache_is_retrained(txt_dir, tmp_path, caplog):
    root, _ = txt_dir
    data, tok_settings = validate_data_config(text_cfg(root), BPE, 16)
    corpus = open_corpus(data, tmp_path)
    tok = tokenizer_module.load_tokenizer(tok_settings, corpus, data.val_period, tmp_path)
    (cached,) = (tmp_path / "tokenizers").glob("bpe-*/tokenizer.json")
    cached.write_text(cached.read_text()[:100])
    with caplog.at_level(logging.WARNING):
        again = tokenizer_module.load_tokenizer(tok_settings, corpus, data.val_period, tmp_path)
    assert "training it again" in caplog.text
    assert again.get_vocab() == tok.get_vocab()


def gpt2_style_tokenizer_dir(tmp_path: Path, docs: list[str]) -> Path:
    """A GPT-2 tokenizer class with a small vocabulary trained here, saved like a hub checkpoint."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=400, special_tokens=[EOT_TOKEN], show_progress=False)
    model = json.loads(bpe._tokenizer.to_str())["model"]
    tok = GPT2TokenizerFast(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    path = tmp_path / "gpt2-tiny"
    tok.save_pretrained(str(path))
    return path


def test_gpt2_path_loads_a_local_tokenizer_and_packs_documents_with_its_eos(txt_dir, tmp_path):
    root, docs = txt_dir
    path = gpt2_style_tokenizer_dir(tmp_path, docs)
    dm = make_module(text_cfg(root), tmp_path / "cache", {"name": "gpt2", "path": str(path)})
    tok = dm.tokenizer
    assert isinstance(tok, PreTrainedTokenizerFast) and type(tok).__name__ == "GPT2Tokenizer"
    assert dm.vocab_size == len(tok) > 257
    assert not list((tmp_path / "cache").glob("tokenizers/*"))  # no BPE was trained
    # val_fraction 0.2: every 5th document, the first included, is held out.
    val_docs = docs[::5]
    train_docs = [d for i, d in enumerate(docs) if i % 5]
    assert dm.shards.tokens("val").tolist() == expected_stream(tok, val_docs)
    assert dm.shards.tokens("train").tolist() == expected_stream(tok, train_docs)


def test_literal_end_of_text_in_a_document_is_not_a_separator(tmp_path):
    (tmp_path / "a.txt").write_text(f"before {EOT_TOKEN} after " * 20)
    (tmp_path / "b.txt").write_text("second document " * 20)
    data, tok_settings = validate_data_config(text_cfg(tmp_path, val_fraction=0.5), BPE, 16)
    tok, shards = prepare_token_data(data, tok_settings, tmp_path / "cache")
    assert shards.tokens("val").tolist().count(tok.eos_token_id) == 1


# --- shards and cache --------------------------------------------------------------------------------


def test_manifest_records_size_and_checksum(txt_dir, tmp_path):
    root, _ = txt_dir
    dm = make_module(text_cfg(root, shard_dtype="uint32"), tmp_path)
    manifest = json.loads((dm.shards.directory / "manifest.json").read_text())
    assert manifest["dtype"] == "uint32" and manifest["eot_id"] == 0
    for split in ("train", "val"):
        entry, data = manifest["splits"][split], dm.shards.path(split).read_bytes()
        assert entry["bytes"] == len(data) == 4 * entry["n_tokens"] == 4 * dm.shards.n_tokens[split]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["splits"]["val"]["n_documents"] == 6
    assert dm.shards.tokens("train").max() < dm.vocab_size


def test_verified_cache_is_reused(txt_dir, tmp_path, monkeypatch):
    root, _ = txt_dir
    first = make_module(text_cfg(root), tmp_path)
    monkeypatch.setattr(shards_module, "_build", lambda *a: pytest.fail("rebuilt a valid cache"))
    assert make_module(text_cfg(root), tmp_path).shards == first.shards


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: flip_byte(d / "train.bin"), id="flipped-byte"),
        pytest.param(lambda d: (d / "val.bin").write_bytes((d / "val.bin").read_bytes()[:-2]), id="truncated"),
        pytest.param(lambda d: (d / "train.bin").unlink(), id="missing-shard"),
        pytest.param(lambda d: (d / "manifest.json").write_text("{"), id="corrupt-manifest"),
    ],
)
def test_damaged_cache_is_detected_and_rebuilt(txt_dir, tmp_path, caplog, damage):
    root, _ = txt_dir
    shards = make_module(text_cfg(root), tmp_path).shards
    originals = {s: shards.path(s).read_bytes() for s in ("train", "val")}
    damage(shards.directory)
    with caplog.at_level(logging.WARNING):
        rebuilt = make_module(text_cfg(root), tmp_path).shards
    assert "rebuilding" in caplog.text
    assert {s: rebuilt.path(s).read_bytes() for s in ("train", "val")} == originals


def test_cache_key_follows_corpus_and_tokenizer(txt_dir, tmp_path):
    root, _ = txt_dir
    base = make_module(text_cfg(root), tmp_path).shards.directory
    other_vocab = make_module(text_cfg(root), tmp_path, {"name": "bpe", "vocab_size": 320}).shards.directory
    (root / "doc03.txt").write_text("An edited document, longer than before. " * 5)
    edited = make_module(text_cfg(root), tmp_path).shards.directory
    assert len({base, other_vocab, edited}) == 3


def test_corpus_too_small_for_a_split_is_a_data_error(tmp_path):
    (tmp_path / "only.txt").write_text("a single document")
    with pytest.raises(DataError, match="at least 2") as err:
        make_module(text_cfg(tmp_path), tmp_path / "cache")
    assert f"data.path={tmp_path.resolve()}" in str(err.value)  # names the corpus, not only the cache


def test_data_path_that_is_a_file_says_so(txt_dir):
    root, _ = txt_dir
    with pytest.raises(ConfigError) as err:
        validate_data_config(text_cfg(root / "doc00.txt"), BPE, seq_len=16)
    assert err.value.field == "data.path" and "is a file" in str(err.value) and "data.pattern='doc00.txt'" in str(err.value)


def test_manifest_records_the_tokenizer_fingerprint(txt_dir, tmp_path):
    root, _ = txt_dir
    dm = make_module(text_cfg(root), tmp_path)
    manifest = json.loads((dm.shards.directory / "manifest.json").read_text())
    assert manifest["tokenizer_fingerprint"] == tokenizer_module.tokenizer_fingerprint(dm.tokenizer)
    assert dm.shards.tokenizer_fingerprint == manifest["tokenizer_fingerprint"]
    manifest["tokenizer_fingerprint"] = "0" * 64  # a manifest of shards made with another tokenizer
    (dm.shards.directory / "manifest.json").write_text(json.dumps(manifest))
    assert make_module(text_cfg(root), tmp_path).shards.tokenizer_fingerprint == dm.shards.tokenizer_fingerprint


def test_temporaries_of_a_killed_build_are_removed(txt_dir, tmp_path):
    """A kill during a shard build leaves .<name>.<random>.tmp files; the next build (holding the lock) removes
    them, and a finished cache is left alone."""
    root, _ = txt_dir
    shards = make_module(text_cfg(root), tmp_path).shards
    stale = [shards.directory / ".train.bin.k1ll3d.tmp", shards.directory / ".val.bin.x.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    (shards.directory / "manifest.json").unlink()  # as if killed before the manifest was written
    make_module(text_cfg(root), tmp_path)
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in shards.directory.iterdir()) == ["manifest.json", "train.bin", "val.bin"]


def _prepare_in_child(data_cfg, cache_dir, log_file, barrier):
    import logging as logging_

    logging_.basicConfig(filename=log_file, level=logging_.INFO, force=True)
    data, tokenizer = validate_data_config(data_cfg, BPE, seq_len=16)
    barrier.wait()  # both start at once, on an empty cache
    _, shards = prepare_token_data(data, tokenizer, cache_dir)
    return shards.n_tokens


def test_concurrent_builders_build_the_cache_once_and_the_other_waits(txt_dir, tmp_path):
    """Two processes (two DDP ranks, two sweep jobs) need the same tokenizer and shards at the same moment:
    one trains and tokenizes, the other waits on the entry's lock and loads what it built."""
    import multiprocessing

    root, _ = txt_dir
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Manager().Barrier(2)
    logs = [tmp_path / f"child{i}.log" for i in range(2)]
    with ctx.Pool(2) as pool:
        results = [pool.apply_async(_prepare_in_child, (text_cfg(root), tmp_path / "cache", str(log), barrier))
                   for log in logs]
        n_tokens = [r.get(timeout=300) for r in results]
    text = "".join(log.read_text() for log in logs)
    assert n_tokens[0] == n_tokens[1]
    assert text.count("tokenizing the text_files corpus") == 1
    assert text.count("training a 300-token byte-level BPE") == 1
    assert "waiting for" in text


def test_val_split_shorter_than_a_window_is_a_data_error(txt_dir, tmp_path):
    root, _ = txt_dir
    with pytest.raises(DataError, match="seq_len"):
        make_module(text_cfg(root), tmp_path, seq_len=5000)


# --- batches -----------------------------------------------------------------------------------------


def test_train_batches_are_seeded_windows_of_the_train_split(txt_dir, tmp_path):
    root, _ = txt_dir
    dm = make_module(text_cfg(root), tmp_path, batch_size=4)
    batches = [b for _, b in zip(range(3), dm.train_dataloader())]
    assert all(b.shape == (4, 17) and b.dtype == torch.long for b in batches)
    train = dm.shards.tokens("train")
    assert all(contains_window(train, row.numpy()) for b in batches for row in b)
    assert not torch.equal(batches[0], batches[1])

    same_seed = make_module(text_cfg(root), tmp_path, batch_size=4)
    assert all(torch.equal(a, b) for a, b in zip(batches, same_seed.train_dataloader()))
    other_seed = make_module(text_cfg(root), tmp_path, batch_size=4, seed=1)
    assert not torch.equal(batches[0], next(iter(other_seed.train_dataloader())))


def test_workers_keep_the_batch_order(txt_dir, tmp_path):
    root, _ = txt_dir
    dm = make_module(text_cfg(root), tmp_path, num_workers=2)
    dataset = RandomWindowBatches(dm.shards.path("train"), dm.shards.dtype, 16, 4, seed=0)
    loaded = [b for _, b in zip(range(5), dm.train_dataloader())]
    assert all(torch.equal(b, dataset.batch(step)) for step, b in enumerate(loaded))


def test_val_batches_and_probe_batch_are_fixed_held_out_windows(txt_dir, tmp_path):
    root, _ = txt_dir
    dm = make_module(text_cfg(root, val_batches=2), tmp_path, batch_size=4)
    val = dm.shards.tokens("val")
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(first) == 2 and all(b.shape == (4, 17) for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    windows = np.lib.stride_tricks.sliding_window_view(val, 17)
    starts = [int(np.flatnonzero((windows == row.numpy()).all(axis=1))[0]) for row in torch.cat(first)]
    assert all(b - a >= 17 for a, b in zip(starts, starts[1:]))  # windows of the val split, spread out, no overlap

    probe = dm.probe_batch(6, 32)
    assert probe.shape == (6, 32) and probe.dtype == torch.long
    assert torch.equal(probe, dm.probe_batch(6, 32))
    assert all(contains_window(val, row.numpy()) for row in probe)
    assert torch.equal(sample_sequences(*validate_data_config(text_cfg(root, val_batches=2), BPE, 32), str(tmp_path), 6, 32), probe)


def test_tokenizer_and_vocab_size_need_setup(txt_dir, tmp_path):
    root, _ = txt_dir
    dm = data_module(text_cfg(root), BPE, tmp_path)
    with pytest.raises(RuntimeError, match="setup"):
        dm.vocab_size


class _RecordBatches(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.clone())
        return self.weight * batch.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm: TokenDataModule, max_steps: int, ckpt_path=None, save_to=None) -> list[torch.Tensor]:
    module = _RecordBatches()
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module.seen


def test_resumed_training_sees_the_same_batches(txt_dir, tmp_path):
    root, _ = txt_dir
    uninterrupted = _fit(make_module(text_cfg(root), tmp_path), max_steps=6)
    ckpt = tmp_path / "half.ckpt"
    first_half = _fit(make_module(text_cfg(root), tmp_path), max_steps=3, save_to=ckpt)
    second_half = _fit(make_module(text_cfg(root), tmp_path), max_steps=6, ckpt_path=ckpt)
    assert len(uninterrupted) == 6 and len(first_half) == 3 and len(second_half) == 3
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, first_half + second_half))
