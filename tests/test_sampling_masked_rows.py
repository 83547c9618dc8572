"""The absorbing sampler that runs the head only at MASK positions draws from the same
distribution as the full-head sampler, and never allocates a [B, L, V] tensor."""

import pytest
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode

import sedd.model.scoring
from sedd.graph import get_graph
from sedd.model import SEDD
from sedd.noise import noise_from_config
from sedd.sampling import conditioning, sample


def _model(seed=0, tokens=3, graph="absorb", **kwargs):
    torch.manual_seed(seed)
    model = SEDD(SEDD.config_for("cpu", tokens=tokens, graph=graph, n_blocks=1, hidden_size=16, n_heads=2), **kwargs)
    with torch.no_grad():  # the output layer starts at zero (uniform scores): make the scores vary
        for p in model.output_layer.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def _joint(model, masked_only, predictor, seed, n=1500, tokens=3):
    graph, noise = get_graph("absorb", tokens), noise_from_config(model.config)
    x = sample(model, graph, noise, batch_size=n, length=2, steps=3, predictor=predictor,
               generator=torch.Generator().manual_seed(seed), masked_only=masked_only)
    assert x.max() < tokens  # denoised: no MASK left
    return torch.bincount(x[:, 0] * tokens + x[:, 1], minlength=tokens * tokens)


@pytest.mark.parametrize("predictor", ["analytic", "euler"])
def test_masked_rows_sampler_matches_full_head_sampler(predictor):
    model = _model()
    rows_only = _joint(model, True, predictor, seed=1)
    full = _joint(model, False, predictor, seed=2)
    assert _two_sample_p(rows_only, full) > 1e-3, (rows_only.tolist(), full.tolist())
    # the test has power: another model's joint distribution is told apart
    other = _joint(_model(seed=7), True, predictor, seed=3)
    assert _two_sample_p(other, full) < 1e-3, (other.tolist(), full.tolist())


def _two_sample_p(a, b):
    """χ² homogeneity test of two count vectors over the same cells (empty cells dropped)."""
    table = torch.stack([a, b])
    return stats.chi2_contingency(table[:, table.sum(0) > 0].numpy())[1]


class _LargestScores(TorchDispatchMode):
    """The largest floating tensor (in elements) with last dimension V that any op returns, views
    of the model's parameters (the head's weight transposed) aside."""

    def __init__(self, V, model):
        super().__init__()
        self.V, self.largest = V, 0
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() and t.shape[-1] == self.V):
                continue
            if t.untyped_storage().data_ptr() not in self.params:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_score_tensor_during_sampling(monkeypatch):
    model = _model(tokens=9, pad_head_to=1)  # V columns, as the spy counts them
    graph, noise = get_graph("absorb", 9), noise_from_config(model.config)
    B, L, V = 4, 6, 10
    monkeypatch.setattr(sedd.model.scoring, "HEAD_CHUNK_BYTES", 5 * V * 4)  # 5 rows of fp32 scores
    for masked_only, expected in ((True, 5 * V), (False, B * L * V)):
        with _LargestScores(V, model) as spy:
            sample(model, graph, noise, batch_size=B, length=L, steps=2, masked_only=masked_only,
                   generator=torch.Generator().manual_seed(0))
        assert spy.largest == expected, (masked_only, spy.largest)


def test_masked_rows_sampler_keeps_fixed_positions():
    model = _model(tokens=9)
    graph, noise = get_graph("absorb", 9), noise_from_config(model.config)
    tokens, mask = conditioning(8, {0: [1, 2], 6: [3, 4]})
    x = sample(model, graph, noise, batch_size=3, length=8, steps=3, fixed_tokens=tokens, fixed_mask=mask,
               generator=torch.Generator().manual_seed(0))
    assert (x[:, mask] == tokens[mask]).all() and x.max() < 9


def test_masked_rows_sampler_on_the_triton_backend_interpreted():
    from sedd import ops

    model = _model(tokens=5)
    graph, noise = get_graph("absorb", 5), noise_from_config(model.config)
    with ops.use_backend("triton"):
        x = sample(model, graph, noise, batch_size=2, length=3, steps=2, generator=torch.Generator().manual_seed(0))
        assert ops.last_backend() == "triton"
    assert x.shape == (2, 3) and x.max() < 5
