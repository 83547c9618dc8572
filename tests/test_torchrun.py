"""The entry points under several processes (torchrun): train/eval.py splits the blocks and
train/sample.py the --input requests, and the first process writes the one report; the entry
points that run in one process refuse several with one line naming what to run instead.

The two-process runs call each entry point's ``main`` in two spawned CPU processes joined by gloo
(tests.helpers.run_on_two_processes), with torchrun's environment variables set, and compare the
report with one process's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from pathlib import Path

import pytest
import torch

from sedd.data import get_tokenizer
from sedd.model import SEDD, ARModel
from tests.helpers import run_on_two_processes, small_model_config
from train import eval as eval_cli
from train import harness as harness_cli
from train import quality as quality_cli
from train import sample as sample_cli
from train import train_judge

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness. "


@pytest.fixture(autouse=True)
def _one_thread(one_thread, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SEDD_CACHE", str(tmp_path_factory.getbasetemp() / "sedd_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _checkpoints(folder: Path) -> dict[str, Path]:
    """A tiny diffusion and a tiny autoregressive checkpoint over bytes (32 positions)."""
    torch.manual_seed(0)
    models = {"sedd": SEDD(small_model_config(257, length=32, n_blocks=1)),
              "ar": ARModel(ARModel.config_for("cpu", tokens=257, hidden_size=64, cond_dim=32, n_blocks=1,
                                               n_heads=4, length=32))}
    out = {}
    for name, model in models.items():
        torch.nn.init.normal_(model.output_layer.linear.weight, std=0.3)  # away from the zero-initialised output
        out[name] = folder / name
        model.save_pretrained(out[name])
        get_tokenizer("bytes").save(out[name] / "tokenizer.json")
    return out


def _eval_argv(ckpt: Path, data: Path, json_path: Path) -> list[str]:
    return [str(ckpt), "--data", str(data), "--doc-split", "file", "--detokenizer", "none", "-K", "4",
            "--batch-size", "2", "--device", "cpu", "--threads", "1", "--json", str(json_path), "--no-progress"]


def _sample_argv(ckpt: Path, requests: Path, jsonl: Path) -> list[str]:
    return [str(ckpt), "--input", str(requests), "--jsonl", str(jsonl), "--batch-size", "2", "--length", "12",
            "--steps", "4", "--seed", "7", "--device", "cpu", "--threads", "1", "--no-progress"]


def _worker(folder: str, rank: int, world: int) -> None:
    """One of two torchrun processes: every entry point's main, with what it prints kept per rank."""
    folder = Path(folder)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    with open(folder / f"stdout.{rank}", "w") as out, open(folder / f"stderr.{rank}", "w") as err, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for name in ("sedd", "ar"):
            code = eval_cli.main(_eval_argv(folder / name, folder / "data.txt", folder / f"eval-{name}.2.json"))
            assert code == 0, f"eval.py {name}: exit status {code}"
        code = sample_cli.main(_sample_argv(folder / "sedd", folder / "requests.jsonl", folder / "samples.2.jsonl"))
        assert code == 0, f"sample.py: exit status {code}"


@pytest.mark.slow
def test_eval_and_sample_split_their_work_over_two_processes(tmp_path, capsys):
    ckpts = _checkpoints(tmp_path)
    (tmp_path / "data.txt").write_text(TEXT * 2)  # 220 bytes and EOS: 7 blocks of 32
    requests = ["def ", {"prefix": "x = ", "suffix": "\n"}, "import", {"template": "a[MASK:3]b"}, "class "]
    (tmp_path / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in requests) + "\n")

    run_on_two_processes(functools.partial(_worker, str(tmp_path)))

    assert (tmp_path / "stdout.1").read_text() == "" and (tmp_path / "stderr.1").read_text() == ""  # one report
    for name in ("sedd", "ar"):
        assert eval_cli.main(_eval_argv(ckpts[name], tmp_path / "data.txt", tmp_path / f"eval-{name}.1.json")) == 0
        one, two = (json.loads((tmp_path / f"eval-{name}.{n}.json").read_text()) for n in (1, 2))
        assert one["processes"] == 1 and two["processes"] == 2
        assert one["blocks"] == two["blocks"] == 7 and one["tokens"] == two["tokens"] == 2 * len(TEXT) + 1
        if name == "ar":  # exact: the same number whatever the split
            assert two["nats_per_token"] == pytest.approx(one["nats_per_token"], rel=1e-9)
            assert two["stderr_nats_per_token"] == 0
        else:  # the second process's draws are its own: the same bound within the standard errors
            se = math.hypot(one["stderr_nats_per_token"], two["stderr_nats_per_token"])
            assert 0 < two["stderr_nats_per_token"] and abs(two["nats_per_token"] - one["nats_per_token"]) < 4 * se
    capsys.readouterr()

    assert sample_cli.main(_sample_argv(ckpts["sedd"], tmp_path / "requests.jsonl", tmp_path / "samples.1.jsonl")) == 0
    one, two = ([json.loads(line) for line in (tmp_path / f"samples.{n}.jsonl").read_text().splitlines()]
                for n in (1, 2))
    assert [s["index"] for s in two] == list(range(10)) and [s["line"] for s in two] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    for a, b in zip(one, two):  # every request on its own generator: the samples of one process
        assert a["tokens"] == b["tokens"] and a["text"] == b["text"] and a["seed"] == b["seed"]
        assert a["settings"]["processes"] == 1 and b["settings"]["processes"] == 2


@pytest.mark.parametrize("main, argv, instead", [
    (quality_cli.main, ["CKPT", "--judge", "J"], "run python train/quality.py"),
    (sample_cli.main, ["CKPT", "--prefix", "a"], "run python train/sample.py without torchrun"),
    (harness_cli.main, ["--model", "sedd", "--model_args", "pretrained=CKPT", "--tasks", "t"],
     "run python train/harness.py"),
    (train_judge.main, ["--out", "J"], "run python train/train_judge.py"),
])
def test_entry_points_in_one_process_refuse_several_in_one_line(monkeypatch, capsys, main, argv, instead):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(argv) == 2
        err = capsys.readouterr().err
        if rank == "1":  # the first process says it, once
            assert err == ""
            continue
        assert err.count("\n") == 1 and "torchrun started 2" in err and instead in err, err
