"""What a checkpoint's config.json and an explicit tokenizer may be: every field of the wrong type
is one error naming it (never a traceback deep inside, never a silent misreading), and a tokenizer
given explicitly must be the one the checkpoint records."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from sedd import generate
from sedd.data import get_corpus, get_tokenizer, train_bpe
from sedd.model import SEDD
from sedd.pretrained import load_pretrained
from train import sample as sample_cli


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _save(folder: Path, tokenizer, *, tokens: int | None = None, record: str | None = None,
          with_tokenizer: bool = True) -> Path:
    torch.manual_seed(0)
    model = SEDD(SEDD.config_for("cpu", tokens=tokens or tokenizer.vocab_size, length=16, n_blocks=1,
                                 hidden_size=32, cond_dim=16, n_heads=2))
    if record is not None:
        model.config["tokenizer"] = record
    model.save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def bytes_ckpt(tmp_path_factory) -> Path:
    return _save(tmp_path_factory.mktemp("bytes_ckpt"), get_tokenizer("bytes"), record="bytes")


@pytest.fixture
def bpe300(argparse_bpe):
    return argparse_bpe  # the session's 300-id BPE of argparse.py


def _edited(ckpt: Path, folder: Path, edit) -> Path:
    shutil.copytree(ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


WRONG = [
    ("model.n_heads", lambda c: c["model"].update(n_heads=0)),
    ("model.length", lambda c: c["model"].update(length=-5)),
    ("model.length", lambda c: c["model"].update(length=None)),
    ("noise", lambda c: c.update(noise=None)),
    ("noise.eps", lambda c: c["noise"].update(eps="0.001")),
    ("tokens", lambda c: c.update(tokens=[257])),
    ("model.scale_by_sigma", lambda c: c["model"].update(scale_by_sigma="false")),  # was read as True
    ("tokens", lambda c: c.update(tokens=257.9)),  # was read as 257
]


@pytest.mark.parametrize("field, edit", WRONG, ids=[f"{f}-{i}" for i, (f, _) in enumerate(WRONG)])
def test_a_field_of_the_wrong_type_is_one_error_naming_it(bytes_ckpt, tmp_path, capsys, field, edit):
    folder = _edited(bytes_ckpt, tmp_path / "ckpt", edit)
    with pytest.raises(ValueError, match=rf"config\.json'?: config {field} must be"):
        load_pretrained(folder, device="cpu")
    with pytest.raises(ValueError, match=rf"config {field} must be"):
        SEDD.from_pretrained(folder)
    assert sample_cli.main([str(folder), "--length", "8", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sample.py: error:") and f"config {field} must be" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_config_that_is_not_an_object(bytes_ckpt, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(bytes_ckpt, folder)
    (folder / "config.json").write_text("[257, 64]")
    with pytest.raises(ValueError, match="holds a JSON list, not an object"):
        load_pretrained(folder, device="cpu")
    assert sample_cli.main([str(folder), "--length", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a JSON list" in err and len(err.strip().splitlines()) == 1, err


def test_the_short_form_of_the_graph_loads(bytes_ckpt, tmp_path):
    folder = _edited(bytes_ckpt, tmp_path / "ckpt", lambda c: c.update(graph="absorb"))
    p = load_pretrained(folder, device="cpu")  # crashed reading graph["type"]
    assert p.graph.name == "absorb" and p.model.config["graph"] == {"type": "absorb"}
    reference = load_pretrained(bytes_ckpt, device="cpu")
    assert generate(p, "ab", length=12, steps=2, seed=0) == generate(reference, "ab", length=12, steps=2, seed=0)


def test_an_explicit_tokenizer_must_be_the_checkpoints(bytes_ckpt, bpe300, tmp_path, capsys):
    own = _save(tmp_path / "own", bpe300, record="bpe:300")  # tokenizer.json in the checkpoint
    spec_only = _save(tmp_path / "spec_only", bpe300, record="bpe:300", with_tokenizer=False)
    for folder in (own, spec_only):
        # 257 ids fit in 300 tokens, so the size check alone let this through
        with pytest.raises(ValueError, match="bytes"):
            load_pretrained(folder, tokenizer="bytes", device="cpu")
        assert sample_cli.main([str(folder), "--tokenizer", "bytes", "--length", "8", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sample.py: error: tokenizer bytes-") and "--tokenizer" in err, err
    # another BPE of the same size is another vocabulary too
    other = train_bpe(get_corpus(Path(sysconfig.get_paths()["stdlib"]) / "typing.py", "all"), 300,
                      cache_dir=tmp_path / "cache", progress=False)
    other.save(tmp_path / "other.json")
    with pytest.raises(ValueError, match="is not this checkpoint's tokenizer"):
        load_pretrained(own, tokenizer=str(tmp_path / "other.json"), device="cpu")
    # the checkpoint's own tokenizer, given explicitly, is fine
    p = load_pretrained(own, tokenizer=str(own / "tokenizer.json"), device="cpu")
    assert p.tokenizer.vocab_size == 300

    # generate(p, tokenizer=...) checked nothing at all
    with pytest.raises(ValueError, match="is not this checkpoint's tokenizer"):
        generate(p, "ab", tokenizer="bytes", length=8, steps=1)
    same = generate(p, "ab", tokenizer=bpe300, length=8, steps=1, seed=0)
    assert same == generate(p, "ab", length=8, steps=1, seed=0)
    bare = SEDD(SEDD.config_for("cpu", tokens=100, length=16, n_blocks=1, hidden_size=32, cond_dim=16, n_heads=2))
    with pytest.raises(ValueError, match="257 ids but the model has only 100 tokens"):
        generate(bare, "ab", tokenizer="bytes", length=8, steps=1)
