"""The sampler's cache (``sample(..., cache=...)``) and its counts of network rows.

For a model without time conditioning the cached sampler must draw the very tokens of the uncached
one with the same generator, on both backends, with and without fixed positions and the masked-rows
head, while computing strictly fewer network rows. Stronger than equal tokens (a last-bit change of
a score rarely flips a draw): every step receives bit-identical scores, in the same chunks."""

import warnings

import pytest
import torch

import sedd.sampling.cache as cache_module
from sedd import ops
from sedd.graph import get_graph
from sedd.model import SEDD
from sedd.noise import get_noise
from sedd.sampling import sample
from tests.helpers import FactorizedScore, small_model_config

N, L, B = 40, 16, 5


def _model(time_conditioning=False, seed=0):
    torch.manual_seed(seed)
    model = SEDD(small_model_config(N, hidden_size=32, cond_dim=16, n_heads=2, length=L,
                                    time_conditioning=time_conditioning))
    with torch.no_grad():  # the modulations and the output layer start at zero: make z depend on x_t
        for name, p in model.named_parameters():
            if "adaLN" in name or "output_layer.linear" in name:
                p.normal_(0, 0.3)
    return model.eval()


def _fixed():
    g = torch.Generator().manual_seed(11)
    return dict(fixed_tokens=torch.randint(0, N, (B, L), generator=g), fixed_mask=torch.rand(B, L, generator=g) < 0.3)


def _run(model, monkeypatch, *, cache, backend, **kwargs):
    """Tokens, stats and the scores every analytic/denoise step received."""
    seen = []
    for kind in ("analytic_step", "denoise_step"):
        real = getattr(ops, kind)

        def record(log_score, *args, _real=real, **kw):
            seen.append(log_score.clone())
            return _real(log_score, *args, **kw)

        monkeypatch.setattr(ops, kind, record)
    with ops.use_backend(backend):
        x, stats = sample(model, get_graph("absorb", N), get_noise("loglinear"), batch_size=B, length=L,
                          generator=torch.Generator().manual_seed(3), cache=cache, return_stats=True, **kwargs)
    monkeypatch.undo()
    return x, stats, seen


# Every combination on the eager backend; on Triton the two that pair the masked rows' head with
# fixed positions and the full head without them: the cache is the same code on both backends, and
# these two give the kernel both layouts ([rows, 1, V] and [B, L, V]) and both kinds of position,
# at ~100 interpreted launches a case (the two other pairings added 9 s a run on the 2-core machine;
# these two, ~5 s each, are slow).
@pytest.mark.parametrize("fixed, masked_only, backend", [
    *((fixed, masked_only, "torch") for fixed in (False, True) for masked_only in (True, False)),
    pytest.param(True, True, "triton", marks=pytest.mark.slow),
    pytest.param(False, False, "triton", marks=pytest.mark.slow),
])
def test_cached_sampler_draws_the_uncached_tokens_with_fewer_rows(monkeypatch, one_thread, backend, masked_only,
                                                                   fixed):
    model = _model()
    steps = 48 if backend == "torch" else 24  # the Triton interpreter is slow
    kwargs = dict(steps=steps, masked_only=masked_only, **(_fixed() if fixed else {}))
    x, plain, scores = _run(model, monkeypatch, cache=False, backend=backend, **kwargs)
    y, cached, cached_scores = _run(model, monkeypatch, cache=True, backend=backend, **kwargs)
    assert torch.equal(x, y)
    assert int(x.max()) < N
    if fixed:
        f = _fixed()
        assert torch.equal(y[f["fixed_mask"]], f["fixed_tokens"][f["fixed_mask"]])
    assert len(scores) == len(cached_scores)
    assert all(torch.equal(a, b) for a, b in zip(scores, cached_scores))  # same chunks, same bits
    # every uncached forward runs the whole batch; the cache skips the rows the last step left alone
    assert plain.forward_rows == plain.forward_calls * B and torch.equal(plain.nfe, torch.full((B,), plain.forward_calls))
    assert cached.forward_rows < plain.forward_rows
    assert cached.reused_rows > 0 and int(cached.nfe.sum()) == cached.forward_rows
    assert bool((cached.nfe < plain.nfe).all())


def test_cached_and_uncached_steps_share_their_chunks(monkeypatch, one_thread):
    """With chunks of 3 rows, the cached step hands the step the chunks of the uncached one, in its
    order: both run sedd.model.scoring.step_on_rows over row_chunks, so this rests on shared code."""
    import sedd.model.scoring as scoring

    model = _model()
    rows = model.output_layer.rows  # a chunk's rows are the aligned head's: V_pad values each
    monkeypatch.setattr(scoring, "HEAD_CHUNK_BYTES", 3 * rows * 4)  # 3 rows of fp32 scores
    x, plain, scores = _run(model, monkeypatch, cache=False, backend="torch", steps=24)
    monkeypatch.setattr(scoring, "HEAD_CHUNK_BYTES", 3 * rows * 4)  # _run undid it
    y, cached, cached_scores = _run(model, monkeypatch, cache=True, backend="torch", steps=24)
    assert torch.equal(x, y) and cached.forward_rows < plain.forward_rows
    assert [s.shape[0] for s in scores] == [s.shape[0] for s in cached_scores] and max(s.shape[0] for s in scores) == 3
    assert all(torch.equal(a, b) for a, b in zip(scores, cached_scores))


def test_cached_sampler_with_truncation(monkeypatch, one_thread):
    model = _model()
    kwargs = dict(steps=40, top_p=0.8, top_k=5, **_fixed())
    x, plain, _ = _run(model, monkeypatch, cache=False, backend="torch", **kwargs)
    y, cached, _ = _run(model, monkeypatch, cache=True, backend="torch", **kwargs)
    assert torch.equal(x, y) and cached.forward_rows < plain.forward_rows


def test_cache_true_refuses_a_time_conditioned_model():
    model = _model(time_conditioning=True)
    graph, noise = get_graph("absorb", N), get_noise("loglinear")
    with pytest.raises(ValueError, match="time_conditioning: false"):
        sample(model, graph, noise, batch_size=2, length=L, steps=4, cache=True)
    with pytest.raises(ValueError, match="time_conditioning: false"):  # nor any model that does not say so
        sample(FactorizedScore(torch.ones(N), graph), graph, noise, batch_size=2, length=L, steps=4, cache=True)
    for bad in ("yes", 1.0, "exact"):
        with pytest.raises(ValueError, match="cache must be"):
            sample(model, graph, noise, batch_size=2, length=L, steps=4, cache=bad)


def test_approximate_cache_warns_once_and_reuses_outputs(monkeypatch):
    model = _model(time_conditioning=True)
    graph, noise = get_graph("absorb", N), get_noise("loglinear")
    monkeypatch.setattr(cache_module, "_warned_approximate", False)
    kwargs = dict(batch_size=B, length=L, steps=40, generator=torch.Generator().manual_seed(0), return_stats=True)
    with pytest.warns(UserWarning, match="approximate"):
        x, stats = sample(model, graph, noise, cache="approximate", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(model, graph, noise, cache="approximate", **kwargs)
        # a model without time conditioning is exact under "approximate": no warning
        monkeypatch.setattr(cache_module, "_warned_approximate", False)
        sample(_model(), graph, noise, cache="approximate", **kwargs)
    assert int(x.max()) < N and stats.reused_rows > 0 and bool((stats.nfe < 41).all())


def test_no_cache_under_sync_free(one_thread):
    """ops.sync_free() reads no count on the host, which finding the changed rows needs: the cache
    is off there (the same tokens as the uncached sync-free sampler, every row computed)."""
    model = _model()
    graph, noise = get_graph("absorb", N), get_noise("loglinear")
    kwargs = dict(batch_size=B, length=L, steps=12, return_stats=True)
    with ops.sync_free():
        x, stats = sample(model, graph, noise, cache=True, generator=torch.Generator().manual_seed(1), **kwargs)
        y, _ = sample(model, graph, noise, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(x, y)
    assert stats.reused_rows == 0 and stats.forward_rows == 13 * B  # 12 steps and the denoiser, every row


def test_stats_of_the_uncached_masked_rows_sampler():
    """No MASK left in the batch: the masked-rows step runs no network, and the counts say so."""
    model = _model()
    graph, noise = get_graph("absorb", N), get_noise("loglinear")
    fixed = torch.arange(L) % N
    mask = torch.ones(L, dtype=torch.bool)
    x, stats = sample(model, graph, noise, batch_size=2, length=L, steps=5, fixed_tokens=fixed, fixed_mask=mask,
                      return_stats=True)
    assert torch.equal(x, fixed.expand(2, L)) and stats.forward_calls == 0 and stats.nfe.tolist() == [0, 0]


def test_windows_and_text_generation_cache_and_count(one_thread):
    """sample_blockwise (several windows, a prompt) draws the same tokens cached and uncached and
    sums each sequence's rows over the windows; generate_samples reports every sample's NFE, for
    first hitting exactly its generated positions."""
    from sedd.data import byte_tokenizer
    from sedd.generation import generate_samples, sample_blockwise

    model = _model()
    graph, noise = get_graph("absorb", N), get_noise("loglinear")
    prompt = torch.zeros(40, dtype=torch.long)
    prompt_mask = torch.arange(40) < 5
    kwargs = dict(batch_size=3, length=40, window=L, stride=8, steps=24, fixed_tokens=prompt, fixed_mask=prompt_mask,
                  return_stats=True)
    x, plain = sample_blockwise(model, graph, noise, generator=torch.Generator().manual_seed(0), **kwargs)
    y, cached = sample_blockwise(model, graph, noise, generator=torch.Generator().manual_seed(0), cache=True, **kwargs)
    assert torch.equal(x, y) and bool((cached.nfe < plain.nfe).all())
    # uncached, every window's forwards run the whole batch: 4 windows of at most 25 forwards
    assert plain.nfe.tolist() == [plain.forward_calls] * 3 and 4 <= plain.forward_calls <= 4 * 25

    tok = byte_tokenizer()
    text_model = SEDD(small_model_config(tok.vocab_size, hidden_size=32, cond_dim=16, n_heads=2, length=L,
                                         time_conditioning=False)).eval()
    samples = generate_samples(text_model, ["ab", "abcd"], tokenizer=tok, length=L, predictor="first_hitting",
                               tokens_per_step=2, seed=0)
    assert [s.nfe for s in samples] == [(L - 2) // 2, (L - 4) // 2]
    samples = generate_samples(text_model, "ab", tokenizer=tok, length=L, steps=32, cache=True, seed=0)
    assert 0 < samples[0].nfe < 33
