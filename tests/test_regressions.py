"""Regression tests of bugs found in review, one per bug, each on the smallest model that shows it
(untrained tiny checkpoints: no training run, no download)."""

from __future__ import annotations

import pytest
import torch

from sedd.data import get_tokenizer
from sedd.model import BlockSEDD
from sedd.pretrained import load_pretrained


@pytest.fixture
def block_checkpoint(tmp_path):
    """An untrained block-diffusion checkpoint (b = 4, 16 positions) over the bytes tokenizer."""
    tok = get_tokenizer("bytes")
    config = BlockSEDD.config_for("cpu", block_size=4, tokens=tok.vocab_size, hidden_size=32, cond_dim=16,
                                  n_blocks=1, n_heads=2, length=16)
    BlockSEDD(config).save_pretrained(tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    return tmp_path


def test_harness_default_generation_of_a_block_model_stops_at_eos(block_checkpoint, one_thread):
    # generate_until cuts its text at EOS, so a block model need generate nothing after one; with
    # the default sampler (first hitting) the stop used to be skipped: every block was generated
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from sedd.harness import SEDDLM

    p = load_pretrained(str(block_checkpoint), device="cpu")
    with torch.no_grad():
        p.model.output_layer.linear.bias[p.tokenizer.eos_id] = 20.0  # EOS first, everywhere
    lm = SEDDLM(pretrained=p, batch_size=8)
    request = Instance("generate_until", {}, ("ab", {"max_gen_toks": 40, "until": ["\n\n"]}), 0)
    (text,) = lm.generate_until([request])
    record = lm.estimates[-1]
    assert text == "" and record["sampler"]["sampler"] == "first_hitting"
    assert record["sampler"]["stop_at_eos"] is True
    # the block holding the prompt's end and the EOS is denoised (2 free positions: 2 evaluations);
    # nothing after it
    assert record["nfe"] == 2


@pytest.mark.parametrize("objective", ["sedd", "ar", "block"])
def test_loss_plot_names_the_objectives_loss_in_the_units_it_plots(objective, tmp_path, monkeypatch):
    # plot_losses' legend loop reused the name of its label argument: every loss.png said
    # "validation (EMA)" on its y axis; and the block objective's label said "per sequence" where
    # train/run.py logs (and loss.png plots) nats per token
    import matplotlib.pyplot as plt

    from sedd.objectives import get_objective
    from train import checkpoint

    labels = []

    def capture(path, write):  # atomic_write, reading the figure before it is saved
        labels.append(plt.gcf().axes[0].get_ylabel())

    monkeypatch.setattr(checkpoint, "atomic_write", capture)
    label = get_objective(objective).loss_label
    checkpoint.plot_losses([{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0, "val_loss": 4.5}],
                           tmp_path / "loss.png", label)
    assert labels == [label] and label.endswith("(nats per token)")
