"""Tests of sedd.data: tokenizers, corpora, the token cache and packed batches (CPU, offline)."""

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import sedd.data as D
from sedd.data import corpora, offline, tokenizers

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GPT2_DIR = SHARED / "gpt2"
WIKITEXT2 = SHARED / "wikitext-2"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"

needs_shared = pytest.mark.skipif(not GPT2_DIR.is_dir(), reason="../shared/data is not here")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A small directory corpus: 40 text files of Shakespeare, plus files that must be skipped."""
    root = tmp_path_factory.mktemp("corpus")
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text()[:200_000]
    else:  # real text that is always here: no blank lines (they split documents), no EOS string
        source = (Path(D.__file__).parents[1] / "model.py").read_text()
        text = "\n".join(line for line in source.splitlines() if line.strip()) * 4
    chunk = len(text) // 40
    for i in range(40):
        sub = root / f"part{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i:02d}.txt").write_text(text[i * chunk:(i + 1) * chunk])
    (root / "binary.bin").write_bytes(b"\x00\x01\x02binary")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("never read")
    (root / "empty.txt").write_text("\n\n")
    return root


@pytest.fixture(scope="module")
def small_bpe(text_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return D.get_tokenizer("bpe:320", corpus=str(text_dir), cache_dir=cache, progress=False), cache


# ------------------------------------------------------------------------------------------------
# Tokenizers


@needs_shared
def test_gpt2_local_directory():
    tok = D.get_tokenizer(str(GPT2_DIR))
    assert tok.encode("Hello world,") == [15496, 995, 11]
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.encode_batch(["Hello world,", " foo"]) == [[15496, 995, 11], tok.encode(" foo")]
    text = (WIKITEXT2 / "test.txt").read_text()[:20_000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == text
    assert tok.decode(torch.tensor(ids)) == text
    # the name is a content hash: loading again gives the same name (it keys token caches)
    assert D.get_tokenizer(str(GPT2_DIR)).name == tok.name


def test_tokenizer_spec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        D.get_tokenizer("./no/such/dir")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        D.get_tokenizer("gpt7")
    with pytest.raises(ValueError, match="bpe:<vocab size>"):
        D.get_tokenizer("bpe:many")
    with pytest.raises(ValueError, match="vocab.json"):
        D.get_tokenizer(str(tmp_path))  # a directory without tokenizer files


def test_bpe_trains_once_and_round_trips(text_dir, tmp_path, monkeypatch):
    calls = []
    real_train = tokenizers._train_bpe_tokenizer
    monkeypatch.setattr(tokenizers, "_train_bpe_tokenizer", lambda *a: calls.append(1) or real_train(*a))
    tok = D.get_tokenizer("bpe:300", corpus=str(text_dir), cache_dir=tmp_path, progress=False)
    assert calls == [1]
    (cached,) = (tmp_path / "tokenizers").glob("bpe300-*.json")
    mtime = cached.stat().st_mtime_ns

    again = D.get_tokenizer("bpe:300", corpus=str(text_dir), cache_dir=tmp_path, progress=False)
    assert calls == [1] and cached.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert again.name == tok.name and tok.name.startswith("bpe300-")
    assert tok.vocab_size == 300
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>") == 0
    assert tok.encode("<|endoftext|>") == [tok.eos_id]
    text = "To be, or not to be: that is the question. \u00e9\u4e2d\U0001f600\n\ttabs"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any text round trips

    monkeypatch.setenv("SEDD_CACHE", str(tmp_path))  # the env var is the default cache dir
    D.get_tokenizer("bpe:300", corpus=str(text_dir), progress=False)
    assert calls == [1]
    with pytest.raises(ValueError, match="at least 257"):
        D.get_tokenizer("bpe:100", corpus=str(text_dir), cache_dir=tmp_path)


@pytest.mark.slow
def test_default_corpus_and_bpe(tmp_path):
    """The one test that reads the whole standard library (a few seconds)."""
    train = D.get_corpus("default", "train")
    valid = D.get_corpus("default", "validation")
    train_keys = [k for k, _ in train.items()]
    valid_keys = [k for k, _ in valid.items()]
    everything = [k for k, _ in D.get_corpus("default", "all").items()]
    assert len(valid_keys) > 5 and len(train_keys) > 50 * len(valid_keys) // 2
    assert not set(train_keys) & set(valid_keys)
    assert sorted(train_keys + valid_keys) == sorted(everything) == everything  # sorted by path
    assert not any("site-packages" in k for k in everything)
    assert [k for k, _ in D.get_corpus("default", "valid").items()] == valid_keys  # deterministic
    assert D.get_corpus("default", "valid").fingerprint == valid.fingerprint != train.fingerprint
    assert valid.num_docs == len(valid_keys)
    assert sum(map(len, train)) > 10_000_000  # tens of MB of real text
    with pytest.raises(ValueError, match="no test split"):
        D.get_corpus("default", "test")

    tok = D.get_tokenizer("bpe:1024", cache_dir=tmp_path, progress=False)
    tokens = D.tokenize(valid, tok, cache_dir=tmp_path, progress=False)
    assert tokens.dtype == np.uint16 and int((tokens == tok.eos_id).sum()) == len(valid_keys)
    docs = D.split_documents(tokens, tok.eos_id)
    assert tok.decode(docs[0]) == next(iter(valid))


# ------------------------------------------------------------------------------------------------
# Corpora


def test_local_directory(text_dir):
    train = D.get_corpus(str(text_dir), "train", valid_fraction=0.25)
    valid = D.get_corpus(text_dir, "validation", valid_fraction=0.25)  # PathLike works too
    every = D.get_corpus(text_dir, "all")
    keys = [k for k, _ in every.items()]
    # hidden, binary, non-UTF-8 and blank files are skipped; files are read in sorted order
    assert keys == sorted(f"part{i % 3}/doc{i:02d}.txt" for i in range(40))
    train_keys, valid_keys = [k for k, _ in train.items()], [k for k, _ in valid.items()]
    assert valid_keys and not set(train_keys) & set(valid_keys)
    assert sorted(train_keys + valid_keys) == keys
    again = D.get_corpus(str(text_dir), "train", valid_fraction=0.25)
    assert [k for k, _ in again.items()] == train_keys
    assert list(every)[0] == (text_dir / "part0" / "doc00.txt").read_text()
    with pytest.raises(ValueError, match="no test split"):
        D.get_corpus(str(text_dir), "test")


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data is not here")
def test_local_file_is_cut_into_paragraphs():
    train = D.get_corpus(str(SHAKESPEARE), "train")
    valid = D.get_corpus(str(SHAKESPEARE), "validation")
    docs = list(D.get_corpus(str(SHAKESPEARE), "all"))
    assert len(docs) > 5000 and docs[0].startswith("First Citizen:\nBefore we proceed")
    assert all(d.strip() and "\n\n" not in d for d in docs)
    n_train, n_valid = sum(1 for _ in train), sum(1 for _ in valid)
    assert n_train + n_valid == len(docs) and 0.005 < n_valid / len(docs) < 0.05
    whole = list(D.get_corpus(str(SHAKESPEARE), "all", doc_split="file"))
    assert whole == [SHAKESPEARE.read_text()]


@needs_shared
def test_split_file_directory_and_detokenizer():
    test = D.get_corpus(str(WIKITEXT2), "test")
    docs = list(test)
    assert docs[0].strip() == "= Robert <unk> ="
    assert "@-@" in "".join(docs)
    detok = list(D.get_corpus(str(WIKITEXT2), "test", detokenizer="wikitext"))
    assert len(detok) == len(docs) and "@-@" not in "".join(detok)
    assert D.get_corpus(str(WIKITEXT2), "valid").fingerprint != test.fingerprint
    with pytest.raises(FileNotFoundError, match="train.txt"):
        D.get_corpus(str(WIKITEXT2), "train")
    ptb = list(D.get_corpus(str(SHARED / "ptb" / "test.txt"), "all"))  # no blank lines: lines
    assert len(ptb) > 3000 and all("\n" not in d for d in ptb)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        D.get_corpus(str(tmp_path / "no_such_file.txt"))
    with pytest.raises(ValueError, match="wikitext-103"):  # lists the known names
        D.get_corpus("not-a-dataset")
    with pytest.raises(ValueError, match="split"):
        D.get_corpus("default", "training")
    with pytest.raises(ValueError, match="splits"):
        D.get_corpus("lambada", "train")  # checked before touching the hub


def test_hub_dataset_mapping_without_network(monkeypatch):
    """The name -> load_dataset mapping, with load_dataset replaced by an in-memory dataset."""
    import datasets

    seen = {}

    def fake_load_dataset(path, name=None, split=None, **kw):
        seen.update(path=path, name=name, split=split)
        return datasets.Dataset.from_dict({"sentence": ["a b 's c", "", "no N more"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(corpora, "hub_offline_reason", lambda: None)  # as if online
    corpus = D.get_corpus("ptb", "valid")
    assert seen == {"path": "ptb_text_only", "name": None, "split": "validation"}
    assert list(corpus) == ["a b's c", "no 1 more"]  # PTB detokenizer applied, empty rows dropped
    assert corpus.num_docs == 3 and corpus.name == "ptb"
    assert list(D.get_corpus("ptb", "valid", detokenizer=None)) == ["a b 's c", "no N more"]

    def unreachable(*a, **kw):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face hub.*--data PATH"):
        D.get_corpus("wikitext-103", "test")

    def broken(*a, **kw):
        raise ValueError("Dataset scripts are no longer supported")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(RuntimeError, match="scripts.*--data PATH"):
        D.get_corpus("lm1b", "test")


def test_hub_unreachable_fails_at_once_naming_the_local_alternative(tmp_path, monkeypatch):
    """No offline variable set, but the Hub endpoint refuses connections: one probe says so, and
    neither datasets nor huggingface_hub is asked (their retries take half a minute)."""
    import datasets
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty caches
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(offline, "_probe_result", {})

    def must_not_run(*a, **kw):
        raise AssertionError("the hub client was called although the probe failed")

    monkeypatch.setattr(datasets, "load_dataset", must_not_run)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", must_not_run)
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:9 cannot be reached.*--data PATH"):
        D.get_corpus("wikitext-103", "test")
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:9 cannot be reached.*--tokenizer DIR.*vocab\.json and merges\.txt") as err:
        D.get_tokenizer("gpt2")
    assert "shared" not in str(err.value)
    assert offline.hub_offline_reason() is not None and len(offline._probe_result) == 1  # probed once

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert offline.hub_offline_reason() == "HF_DATASETS_OFFLINE is set"
    # something in the cache for the dataset: then the cache is worth a try
    (tmp_path / "hf" / "datasets" / "wikitext").mkdir(parents=True)
    assert offline.cache_may_hold("Salesforce/wikitext") and not offline.cache_may_hold("ptb_text_only")


def test_no_text_found(tmp_path):
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("\n   \n\n")
    (blank / "b.txt").write_text("")
    (blank / "c.bin").write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match=r"no text found in .*blank \(3 files read, 1 skipped as binary"):
        list(D.get_corpus(blank, "train"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no text found in .*empty \(0 files read.*holds no files"):
        list(D.get_corpus(empty, "all"))
    with pytest.raises(ValueError, match=r"no text found in .*a\.txt \(1 file read, 0 skipped"):
        list(D.get_corpus(blank / "a.txt", "all"))


@pytest.mark.slow
def test_hub_offline_errors_in_subprocess(tmp_path):
    """With the hub really unreachable (offline mode, empty caches), both hub paths fail fast
    with errors that say what to do instead. A subprocess keeps the env vars out of this one."""
    script = textwrap.dedent("""
        import sedd.data as D
        for call in (lambda: D.get_tokenizer("gpt2"), lambda: D.get_corpus("wikitext-2", "test")):
            try:
                call()
            except ConnectionError as e:
                print("ConnectionError:", e)
            else:
                print("no error")
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "ds"),
               HF_HUB_CACHE=str(tmp_path / "hub"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("ConnectionError", "no error"))]
    assert len(lines) == 2, out.stdout + out.stderr
    assert "cannot reach the Hugging Face hub" in lines[0]
    assert "vocab.json and merges.txt" in lines[0]
    assert "cannot reach the Hugging Face hub" in lines[1] and "wikitext-2" in lines[1]
    assert "--data PATH" in lines[1]


# ------------------------------------------------------------------------------------------------
# Token cache


def test_token_cache(text_dir, small_bpe, monkeypatch):
    tok, cache = small_bpe
    corpus = D.get_corpus(str(text_dir), "all")
    docs = list(corpus)
    tokens = D.tokenize(corpus, tok, cache_dir=cache, progress=False)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.ndim == 1
    eos = np.flatnonzero(tokens == tok.eos_id)
    assert len(eos) == len(docs) and eos[-1] == len(tokens) - 1  # EOS after every document
    assert [tok.decode(d) for d in D.split_documents(tokens, tok.eos_id)] == docs

    (bin_path,) = (cache / "tokens" / tok.name).glob("*.bin")
    meta = json.loads(bin_path.with_suffix(".json").read_text())
    assert meta["num_tokens"] == len(tokens) and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == tok.name and meta["corpus_fingerprint"] == corpus.fingerprint
    assert not list(bin_path.parent.glob("*.tmp"))
    mtime = bin_path.stat().st_mtime_ns

    monkeypatch.setattr(type(tok), "encode_batch", lambda *a: pytest.fail("re-encoded"))
    again = D.load_tokens(str(text_dir), "all", tok, cache_dir=cache, progress=False)
    assert np.array_equal(again, tokens) and bin_path.stat().st_mtime_ns == mtime


def test_token_cache_uint32_and_invalidation(tmp_path):
    class WideTokenizer:  # any object with the Tokenizer interface works
        name, vocab_size, eos_id = "wide", 70_000, 69_999

        def encode_batch(self, texts):
            return [[60_000 + len(t)] * len(t) for t in texts]

    src = tmp_path / "data.txt"
    src.write_text("ab\n\ncde\n")
    tokens = D.tokenize(D.get_corpus(src, "all"), WideTokenizer(), cache_dir=tmp_path / "c",
                        progress=False)
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [60_002, 60_002, 69_999, 60_003, 60_003, 60_003, 69_999]
    os.utime(src, ns=(1, 1))  # a changed source file has a new fingerprint: rebuilt
    src.write_text("xyz\n")
    tokens = D.tokenize(D.get_corpus(src, "all"), WideTokenizer(), cache_dir=tmp_path / "c",
                        progress=False)
    assert tokens.tolist() == [60_003] * 3 + [69_999]


# ------------------------------------------------------------------------------------------------
# Packing and batching


def _stream(n=1000):
    return np.arange(n, dtype=np.uint32)  # block i starts with token i * L: identifiable


def test_packed_blocks(tmp_path):
    blocks = D.PackedBlocks(_stream(1000), 64)
    assert len(blocks) == 15  # 1000 // 64; the tail is dropped
    assert blocks[3].dtype == torch.int64 and blocks[3].tolist() == list(range(192, 256))
    batch = blocks.get_batch([5, 0])
    assert batch.shape == (2, 64) and batch[:, 0].tolist() == [320, 0]

    # a memmap-backed dataset pickles (DataLoader workers) as the file name, not the data
    _stream(1000).astype(np.uint16).tofile(tmp_path / "t.bin")
    mapped = D.PackedBlocks(np.memmap(tmp_path / "t.bin", dtype=np.uint16, mode="r"), 64)
    payload = pickle.dumps(mapped)
    assert len(payload) < 1000 and torch.equal(pickle.loads(payload).get_batch([5, 0]), batch)
    assert torch.equal(pickle.loads(pickle.dumps(blocks))[3], blocks[3])  # in-memory too


def test_batch_iterator_deterministic_and_resumable():
    blocks = D.PackedBlocks(_stream(), 10)  # 100 blocks
    def run(it, n):
        return [next(it) for _ in range(n)]

    a = run(D.BatchIterator(blocks, 8, seed=1), 30)  # 12 batches per epoch: crosses 2 epochs
    b = run(D.BatchIterator(blocks, 8, seed=1), 30)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape == (8, 10)
    assert not torch.equal(a[0], run(D.BatchIterator(blocks, 8, seed=2), 1)[0])
    firsts = torch.cat([x[:, 0] for x in a[:12]]) // 10
    assert len(set(firsts.tolist())) == 96  # one epoch: no block twice
    assert not torch.equal(a[0], a[12])  # a new permutation each epoch

    it = D.BatchIterator(blocks, 8, seed=1)
    run(it, 17)
    state = json.loads(json.dumps(it.state_dict()))  # plain ints: survives a checkpoint
    resumed = D.BatchIterator(blocks, 8, seed=123)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    assert all(torch.equal(x, y) for x, y in zip(run(resumed, 13), a[17:]))

    # elastic: half the global batch (say 1 process instead of 2) re-splits the global position:
    # 17 batches of 8 = 40 blocks into epoch 1, then the same blocks in batches of 4
    half = D.BatchIterator(blocks, 4, seed=1)
    half.load_state_dict(state)
    assert half.epoch == 1
    assert torch.equal(torch.cat(run(half, 2)), a[17]) and torch.equal(torch.cat(run(half, 2)), a[18])
    with pytest.raises(ValueError, match="not a whole number of global batches of 16"):
        D.BatchIterator(blocks, 16, seed=1).load_state_dict(state)  # 40 blocks: not 16 x n
    small = D.BatchIterator(blocks, 4, seed=1)
    run(small, 24)  # 96 of the 100 blocks of epoch 0: batches of 32 do not fit in its 96 first
    big = D.BatchIterator(blocks, 32, seed=1)
    big.load_state_dict(small.state_dict())
    assert big.epoch == 1 and big.position == 3
    with pytest.raises(ValueError, match="the data changed"):
        D.BatchIterator(D.PackedBlocks(_stream()[:500], 10), 8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot fill"):
        D.BatchIterator(blocks, 101)


def test_batch_iterator_rank_sharding():
    blocks = D.PackedBlocks(_stream(), 10)
    world = 4
    its = [D.BatchIterator(blocks, 3, seed=7, rank=r, world_size=world) for r in range(world)]
    single = D.BatchIterator(blocks, 3 * world, seed=7)
    for _ in range(len(blocks) // (3 * world)):  # one epoch
        parts = [next(it) for it in its]
        assert torch.equal(torch.cat(parts), next(single))  # ranks tile the global batch
    # resuming with another world size but the same global batch continues the same stream
    it2 = D.BatchIterator(blocks, 6, seed=7, rank=1, world_size=2)
    it2.load_state_dict(its[0].state_dict())
    assert torch.equal(next(it2), next(single)[6:])

    for world in (1, 3):
        shards = [torch.cat(list(D.eval_batches(blocks, 4, rank=r, world_size=world)))
                  for r in range(world)]
        assert torch.equal(torch.cat(shards)[:, 0], torch.arange(0, 1000, 10))  # cover, in order


def test_segment_ids():
    eos = 0
    x = torch.tensor([[5, 6, 0, 7, 0, 0, 8], [0, 1, 2, 3, 4, 5, 6]])
    assert D.segment_ids(x, eos).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert D.segment_ids(x[0], eos).shape == (7,)


@needs_shared
def test_tokenizer_save_and_reload(tmp_path):
    tok = D.get_tokenizer(str(GPT2_DIR))
    tok.save(tmp_path / "ckpt" / "tokenizer.json")
    again = D.get_tokenizer(str(tmp_path / "ckpt"))
    text = "Hello world, the <|endoftext|> token."
    assert again.encode(text) == tok.encode(text)
    assert again.eos_id == tok.eos_id == 50256 and again.vocab_size == tok.vocab_size
