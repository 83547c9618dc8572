"""sedd.data.public: the public SEDD evaluation pipeline (rows, EOS after every one, blocks per
batch of rows in contiguous shards, remainders dropped)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sedd.data import get_tokenizer
from sedd.data.public import public_blocks, public_rows

BYTES = get_tokenizer("bytes")  # one id per byte, EOS = 0


def _ids(text: str) -> list[int]:
    return BYTES.encode(text)


def test_rows_of_a_local_wikitext_file(tmp_path):
    path = tmp_path / "wiki.test.txt"
    path.write_text(" = Title = \n \n Some text @-@ here . \n\n Last line")
    assert public_rows(path, detokenizer=None) == [" = Title = \n", "", " Some text @-@ here . \n", "", " Last line"]
    # the detokenizer runs on every row, empty ones too
    assert public_rows(path, detokenizer="wikitext")[2] == " Some text-here.\n"


def test_eos_after_every_row_and_remainders_dropped_per_batch():
    rows = ["abc", "", "d", "fghij", "", "k"]
    # one shard, batches of 3 rows: [abc|, |, d|] = 7 tokens -> one block of 4, 3 dropped;
    # [fghij|, |, k|] = 9 tokens -> two blocks, 1 dropped
    blocks = public_blocks(rows, BYTES, 4, num_proc=1, batch_rows=3)
    stream1 = _ids("abc") + [0, 0] + _ids("d") + [0]
    stream2 = _ids("fghij") + [0, 0] + _ids("k") + [0]
    assert blocks.tolist() == [stream1[:4], stream2[:4], stream2[4:8]]
    # without batches the remainder would be cut once: a different set of blocks
    whole = public_blocks(rows, BYTES, 4, num_proc=1, batch_rows=100)
    assert len(whole) == 4 and whole.tolist() != blocks.tolist()


def test_shards_are_contiguous_and_split_as_datasets_does():
    rows = [str(i % 10) for i in range(10)]
    # 10 rows, 3 shards: [0, 4), [4, 7), [7, 10); each row is 2 tokens (digit, EOS)
    blocks = public_blocks(rows, BYTES, 3, num_proc=3, batch_rows=1000)
    expected = []
    for start, end in ((0, 4), (4, 7), (7, 10)):
        stream = list(itertools.chain(*(_ids(r) + [0] for r in rows[start:end])))
        expected += [stream[i : i + 3] for i in range(0, len(stream) // 3 * 3, 3)]
    assert blocks.tolist() == expected
    assert public_blocks(["a"], BYTES, 8).shape == (0, 8)  # no batch fills a block


def test_matches_datasets_map_as_the_public_code_calls_it():
    """The oracle: datasets.map(batched=True, num_proc=2) with the public group_texts logic."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    rows = ["".join(rng.choice(list("xyz "), size=int(n))) for n in rng.integers(0, 6, size=2300)]
    block = 16

    def tokenize(batch):
        return {"input_ids": [ids + [BYTES.eos_id] for ids in BYTES.encode_batch(batch["text"])]}

    def group(batch):
        stream = list(itertools.chain(*batch["input_ids"]))
        n = len(stream) // block * block
        return {"input_ids": [stream[i : i + block] for i in range(0, n, block)]}

    ds = datasets.Dataset.from_dict({"text": rows})
    tokenized = ds.map(tokenize, batched=True, remove_columns=["text"])
    for num_proc in (1, 2):
        chunked = tokenized.map(group, batched=True, num_proc=num_proc)
        ours = public_blocks(rows, BYTES, block, num_proc=num_proc)
        assert ours.tolist() == chunked["input_ids"], num_proc
