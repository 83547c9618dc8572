"""A SEDD model without time conditioning (``model.time_conditioning: false``): its raw output does
not depend on σ, the σ-dependence lives in the shift alone, and the flag travels with the checkpoint."""

import json

import pytest
import torch

from sedd.data import get_tokenizer
from sedd.graph import get_graph
from sedd.losses import score_entropy_loss
from sedd.model import SEDD
from sedd.noise import get_noise
from sedd.pretrained import load_pretrained
from tests.helpers import small_model_config

N, L = 30, 12


def _model(tokens=N, **overrides):
    torch.manual_seed(0)
    model = SEDD(small_model_config(tokens, hidden_size=32, cond_dim=16, n_heads=2, length=L, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "output_layer.linear" in name:
                p.normal_(0, 0.3)
    return model.eval()


def test_raw_output_ignores_sigma_and_the_shift_carries_it():
    model = _model(time_conditioning=False)
    x = torch.randint(0, N + 1, (3, L))
    a, b = torch.tensor([0.01, 1.0, 7.0]), torch.tensor([3.0, 0.2, 0.05])
    za, zb = model(x, a, raw=True), model(x, b, raw=True)
    assert torch.equal(za, zb)
    assert za.std() > 0.1  # not the zero output of a fresh model: the test can see σ leak in
    # the scores differ by the shift alone, which is the time-conditioned model's shift
    want = za.float() + model.score_shift(a)[:, None, None]
    torch.testing.assert_close(model(x, a), want.scatter(-1, x.unsqueeze(-1), 0.0))
    torch.testing.assert_close(model.score_shift(a), _model().score_shift(a))
    # a σ-conditioned model of the same weights but sigma_map does read σ
    conditioned = _model()
    assert not torch.equal(conditioned(x, a, raw=True), conditioned(x, b, raw=True))


def test_a_row_does_not_depend_on_its_batch():
    """The cache recomputes changed rows as a sub-batch: a row's output must not depend on which
    rows share its batch."""
    model = _model(time_conditioning=False)
    x = torch.randint(0, N + 1, (6, L))
    full = model(x, torch.rand(6) + 0.1, raw=True)
    for rows in ([0], [2, 5], [1, 3, 4]):
        assert torch.equal(model(x[rows], torch.ones(len(rows)), raw=True), full[rows])


def test_state_dict_keys():
    default = set(_model().state_dict())
    free = set(_model(time_conditioning=False).state_dict())
    assert {k for k in default if k.startswith("sigma_map.")} == default - free
    assert free - default == {"cond_embed"}
    assert _model(time_conditioning=False).cond_embed.shape == (16,)


@pytest.mark.parametrize("overrides,match", [
    (dict(graph="uniform"), "absorbing graph"),
    (dict(scale_by_sigma=False), "scale_by_sigma"),
    (dict(time_conditioning="off"), "true or false"),
])
def test_refused_configurations(overrides, match):
    graph = overrides.pop("graph", "absorb")
    with pytest.raises(ValueError, match=match):
        SEDD(small_model_config(N, graph=graph, **{"time_conditioning": False, **overrides}))


def test_the_flag_round_trips_through_a_checkpoint(tmp_path):
    tok = get_tokenizer("bytes")
    model = _model(tokens=tok.vocab_size, time_conditioning=False)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["time_conditioning"] is False
    loaded = SEDD.from_pretrained(tmp_path)
    assert loaded.time_conditioning is False
    x = torch.randint(0, tok.vocab_size, (2, L))
    assert torch.equal(loaded(x, torch.ones(2), raw=True), model(x, torch.ones(2), raw=True))
    p = load_pretrained(tmp_path, tokenizer="bytes", device="cpu")
    assert p.model.time_conditioning is False
    # the weights do not fit a σ-conditioned model: a clear error, not silently other scores
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["time_conditioning"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sigma_map|cond_embed"):
        SEDD.from_pretrained(tmp_path)


def test_the_loss_trains_the_constant():
    model = _model(time_conditioning=False).train()
    graph, noise = get_graph("absorb", N), get_noise("loglinear")
    loss = score_entropy_loss(model, torch.randint(0, N, (4, L)), graph, noise)
    loss.backward()
    assert torch.isfinite(loss) and model.cond_embed.grad.abs().sum() > 0
