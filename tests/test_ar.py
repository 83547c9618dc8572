"""The autoregressive baseline (sedd.model.ARModel): its loss, the head fused with it, causality,
the KV cache, ancestral sampling, and its checkpoints."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from sedd import ops
from sedd.losses import ar_loss
from sedd.model import SEDD, ARModel
from sedd.sampling import ancestral, sample_ancestral
from sedd.sampling.ancestral import truncate_probs
from tests.helpers import assert_same_grads, chi2_pvalue, run_on_two_processes, wrap_for_two_processes

N, L = 11, 12


def _model(dtype=torch.float64, seed=0, **overrides) -> ARModel:
    torch.manual_seed(seed)
    config = ARModel.config_for("cpu", tokens=N, hidden_size=32, cond_dim=16, n_blocks=2, n_heads=2, length=L,
                                **overrides)
    model = ARModel(config).to(dtype)
    # adaLN and the head start at zero (every position would score alike): random weights so that
    # the logits depend on the context and the tests can see it
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def _tokens(B=3, seed=1):
    return torch.randint(0, N, (B, L), generator=torch.Generator().manual_seed(seed))


def _grads(model, loss_fn):
    # no gradient left when the forward runs: under FSDP2 a root parameter's gradient present at the
    # forward was added to the next backward's (seen on cond_embed) though set to None in between
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- the loss ------------------------------------------------------------------------------------


def test_loss_is_cross_entropy_on_the_shifted_targets():
    model = _model().eval()
    x = _tokens()
    # the inputs spelled out: BOS, then each target one position late, read by step() as they are
    inputs = torch.cat([torch.full((3, 1), model.bos_id), x[:, :-1]], dim=1)
    logits = model.step(inputs, model.new_cache(3))
    expected = F.cross_entropy(logits.reshape(-1, N), x.reshape(-1), reduction="sum") / 3
    for fused in (True, False):
        assert torch.allclose(ar_loss(model, x, fused=fused), expected, rtol=1e-12)
    per_sequence = F.cross_entropy(logits.transpose(1, 2), x, reduction="none").sum(-1)
    assert torch.allclose(ar_loss(model, x, reduction="none"), per_sequence, rtol=1e-12)
    # every position is predicted, the first from BOS alone; the last token is never an input
    assert torch.equal(model(x)[:, 0], model(_tokens(seed=7))[:, 0])
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % N
    assert torch.equal(model(x), model(y))


def test_loss_with_padding_documents_and_scale():
    model = _model()
    x = _tokens()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, 7:] = False
    seg = torch.zeros_like(x)
    seg[:, 5:] = 1
    logits = model(x, attention_mask=mask, segment_ids=seg)
    per_token = F.cross_entropy(logits.transpose(1, 2), x, reduction="none") * mask
    for fused in (True, False):
        got = ar_loss(model, x, attention_mask=mask, segment_ids=seg, reduction="none", fused=fused)
        assert torch.allclose(got, per_token.sum(-1), rtol=1e-12)
        got = ar_loss(model, x, attention_mask=mask, segment_ids=seg, scale=0.25, fused=fused)
        assert torch.allclose(got, 0.25 * per_token.sum() / 3, rtol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"reduction": "none"}, {"attention_mask": True}, {"scale": 0.5}])
def test_fused_and_unfused_losses_have_the_same_gradients(kw):
    model = _model()
    x = _tokens()
    if "attention_mask" in kw:
        mask = torch.ones_like(x, dtype=torch.bool)
        mask[1, 4:] = False
        kw = {"attention_mask": mask}
    grads = []
    for fused in (True, False):
        grads.append(_grads(model, lambda: ar_loss(model, x, fused=fused, **kw).sum()))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-10, atol=1e-13), name


# -- the fused head --------------------------------------------------------------------------------


def _head_case(dtype, V=37, D=16, B=3, L=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, D, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(V, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (B, L), generator=g)
    return hidden, weight, bias, targets


def _unfused(hidden, weight, bias, targets, mask=None, loss_weight=None):
    logits = hidden @ weight.t() + bias
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    loss = loss.view(targets.shape)
    if mask is not None:
        loss = loss * mask
    if loss_weight is not None:
        loss = loss * loss_weight[:, None]
    return loss


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True, "sync_free"])
def test_fused_head_equals_the_unfused_one(dtype, tol, reduction, masked):
    hidden, weight, bias, targets = _head_case(dtype)
    mask = None
    if masked:
        mask = torch.rand(targets.shape, generator=torch.Generator().manual_seed(3)) < 0.7
    loss_weight = torch.tensor([1.0, 0.5, 2.0], dtype=dtype)
    ref = _unfused(hidden, weight, bias, targets, mask, loss_weight)
    ref = {"batchmean": ref.sum() / 3, "sum": ref.sum(), "none": ref}[reduction]
    upstream = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (hidden, weight, bias))
    with ops.sync_free(masked == "sync_free"):
        # 64 bytes of fp32 logits: 1 row per chunk when V = 37 does not fit twice (every chunk path)
        got = ops.linear_cross_entropy(hidden, weight, bias, targets, mask=mask, loss_weight=loss_weight,
                                       reduction=reduction, chunk_bytes=4 * 37 * 4)
    assert got.dtype == dtype and got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=tol, atol=tol)
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight, bias))
    for name, a, b in zip(("hidden", "weight", "bias"), got_grads, ref_grads):
        assert torch.allclose(a, b, rtol=tol, atol=tol), name
    if mask is not None:  # padding rows get exactly no gradient
        assert torch.equal(got_grads[0][~mask], torch.zeros_like(got_grads[0][~mask]))


def test_fused_head_without_bias_and_only_some_gradients():
    hidden, weight, _, targets = _head_case(torch.float64)
    weight = weight.detach()
    got = ops.linear_cross_entropy(hidden, weight, None, targets)
    ref = _unfused(hidden, weight, torch.zeros(weight.shape[0], dtype=weight.dtype), targets).sum() / 3
    assert torch.allclose(got, ref, rtol=1e-12)
    (a,) = torch.autograd.grad(got, hidden)
    (b,) = torch.autograd.grad(ref, hidden)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kw,message", [
    ({"targets": "big"}, "outside"),
    ({"mask": "float"}, "mask must be a bool tensor"),
    ({"reduction": "mean"}, "reduction must be one of"),
    ({"chunk_bytes": 0}, "chunk_bytes must be a positive integer"),
])
def test_fused_head_bad_arguments(kw, message):
    hidden, weight, bias, targets = _head_case(torch.float32)
    if kw.get("targets") == "big":
        kw["targets"] = targets + 37
    if kw.get("mask") == "float":
        kw["mask"] = torch.ones(targets.shape)
    args = {"targets": targets, **kw}
    with pytest.raises((ValueError, TypeError), match=message):
        ops.linear_cross_entropy(hidden, weight, bias, args.pop("targets"), **args)


# -- causality, documents, padding ------------------------------------------------------------------


@pytest.mark.parametrize("j", [0, 5, L - 2])
def test_changing_a_token_changes_no_earlier_logits(j):
    model = _model()
    x = _tokens()
    y = x.clone()
    y[:, j] = (y[:, j] + 3) % N
    a, b = model(x), model(y)
    # position i reads x[:, :i]: the logits up to and including j cannot change, the next ones do
    assert torch.equal(a[:, : j + 1], b[:, : j + 1])
    assert (a[:, j + 1] - b[:, j + 1]).abs().max() > 1e-3


def test_documents_and_padding_are_never_attended_across():
    model = _model()
    x = _tokens()
    seg = torch.zeros_like(x)
    seg[:, 6:] = 1  # x[:, 5] is the last token of the first document, read by position 6
    y = x.clone()
    y[:, :5] = (y[:, :5] + 1) % N
    a, b = model(x, segment_ids=seg), model(y, segment_ids=seg)
    assert torch.equal(a[:, 6:], b[:, 6:])
    assert (a[:, 5] - b[:, 5]).abs().max() > 1e-3
    # padding on the left and on the right: the real tokens score as the same tokens unpadded
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 3:9] = True
    z = torch.where(mask, x, (x + 5) % N)
    a, b = model(x, attention_mask=mask), model(z, attention_mask=mask)
    alone = model(x[:, 3:9])
    # equal up to the fp32 rotary tables (rotary computes in fp32 whatever the model's dtype), whose
    # phases round differently 3 positions later; a padding token read anywhere would differ by ~0.1
    assert torch.allclose(a[:, 3:9], alone, rtol=0, atol=1e-6)
    assert torch.allclose(b[:, 3:9], alone, rtol=0, atol=1e-6)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_the_cache_gives_the_forward_logits():
    model = _model().eval()
    x = _tokens()
    full = model(x)
    inputs = torch.cat([torch.full((3, 1), model.bos_id), x[:, :-1]], dim=1)
    cache = model.new_cache(3)
    parts = [model.step(inputs[:, :4], cache), model.step(inputs[:, 4:5], cache), model.step(inputs[:, 5:], cache)]
    assert cache.length == L
    assert torch.allclose(torch.cat(parts, dim=1), full, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="do not fit"):
        model.step(inputs[:, :1], cache)
    with pytest.raises(RuntimeError, match="eval mode"):
        model.train().step(inputs[:, :1], model.new_cache(3))


# -- ancestral sampling ------------------------------------------------------------------------------


def test_ancestral_sampling_is_reproducible_and_keeps_the_prompt():
    model = _model().eval()
    prompt = torch.tensor([4, 1, 7])
    fixed = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.bool)
    fixed[0, :3], mask[0, :3] = prompt, True
    fixed[1, :2], mask[1, :2] = prompt[:2], True  # rows with prompts of different lengths

    def draw(**kw):
        return sample_ancestral(model, batch_size=2, length=L, fixed_tokens=fixed, fixed_mask=mask,
                                generator=torch.Generator().manual_seed(9), return_stats=True, **kw)

    (a, stats), (b, _), (c, stats_plain) = draw(), draw(), draw(kv_cache=False)
    assert torch.equal(a, b) and torch.equal(a, c)
    # the 2 positions fixed in every row are read at once
    assert stats.nfe.tolist() == stats_plain.nfe.tolist() == [L - 2, L - 2] and stats.forward_calls == L - 2
    assert a[0, :3].tolist() == prompt.tolist() and a[1, :2].tolist() == prompt[:2].tolist()
    assert not torch.equal(a, draw(top_k=2)[0]) or not torch.equal(a, draw(temperature=0.5)[0])
    other = sample_ancestral(model, batch_size=2, length=L, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(a[:, 3:], other[:, 3:])
    unconditional, stats = sample_ancestral(model, batch_size=2, length=L, return_stats=True)
    assert stats.nfe.tolist() == [L, L] and stats.forward_rows == 2 * L and unconditional.shape == (2, L)


class CountedSteps:
    """The KV-cached evaluations of an ARModel: the positions each one scored."""

    def __init__(self, model, monkeypatch):
        self.scored = []
        step = model.step

        def counted(inputs, cache):
            self.scored.append(cache.length + inputs.shape[1] - 1)
            return step(inputs, cache)

        monkeypatch.setattr(model, "step", counted)


def test_ancestral_sampling_evaluates_only_free_positions(monkeypatch):
    """No evaluation at the fixed positions after the last free one (a suffix), and fixed positions
    every row holds are read with the next evaluation: the NFE counts the evaluations that ran."""
    model = _model().eval()
    fixed = torch.randint(0, N, (2, L))
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, :3] = mask[:, 6:8] = mask[:, L - 4 :] = True  # a prefix, a span and a suffix in every row
    mask[1, 3] = True  # and a position fixed in one row only: the batch evaluates it
    free = [i for i in range(L) if not mask[:, i].all()]
    counted = CountedSteps(model, monkeypatch)
    monkeypatch.setattr(ancestral, "_warned_infill", False)  # once per process: here, and in the test below
    with pytest.warns(UserWarning, match="reads only the tokens before"):
        x, stats = sample_ancestral(model, batch_size=2, length=L, fixed_tokens=fixed, fixed_mask=mask,
                                    generator=torch.Generator().manual_seed(4), return_stats=True)
    assert counted.scored == free and stats.nfe.tolist() == [len(free)] * 2 and stats.forward_calls == len(free)
    assert torch.equal(x[mask], fixed[mask])
    plain, plain_stats = sample_ancestral(model, batch_size=2, length=L, fixed_tokens=fixed, fixed_mask=mask,
                                          generator=torch.Generator().manual_seed(4), return_stats=True,
                                          kv_cache=False)
    assert torch.equal(plain, x) and plain_stats.nfe.tolist() == stats.nfe.tolist()  # the same draws either way


def test_ancestral_draws_follow_the_model():
    model = _model(seed=2).eval()
    fixed = torch.tensor([3, 0])
    mask = torch.tensor([True, False])
    x = torch.tensor([[3, 0]])
    with torch.no_grad():
        probs = torch.softmax(model(x)[0, 1].double() / 0.8, dim=-1)
    kept = truncate_probs(probs[None], top_k=4)[0]
    for kw, p in (({}, probs), ({"top_k": 4}, kept / kept.sum())):
        draws = sample_ancestral(model, batch_size=4000, length=2, fixed_tokens=fixed, fixed_mask=mask,
                                 temperature=0.8, generator=torch.Generator().manual_seed(1), **kw)[:, 1]
        assert chi2_pvalue(draws, p) > 1e-3, kw
    greedy = sample_ancestral(model, batch_size=3, length=2, fixed_tokens=fixed, fixed_mask=mask, temperature=0)
    assert (greedy[:, 1] == probs.argmax()).all()


def test_truncation_conventions():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    assert truncate_probs(p, top_k=2)[0].tolist() == [0.4, 0.3, 0.0, 0.0]
    assert (truncate_probs(p, top_k=2)[1] > 0).all()  # ties at the boundary are kept
    assert truncate_probs(p, top_p=0.6)[0].tolist() == [0.4, 0.3, 0.0, 0.0]  # the crossing token is kept
    assert truncate_probs(p, top_p=0.7)[0].tolist() == [0.4, 0.3, 0.0, 0.0]
    assert truncate_probs(p, top_k=3, top_p=0.5)[0].tolist() == [0.4, 0.3, 0.0, 0.0]  # 0.5 of the kept 0.9


def test_fixed_text_after_generated_text_warns_and_bad_arguments():
    model = _model().eval()
    fixed = torch.zeros(L, dtype=torch.long)
    mask = torch.zeros(L, dtype=torch.bool)
    fixed[-2:], mask[-2:] = torch.tensor([5, 6]), True
    with pytest.warns(UserWarning, match="reads only the tokens before"):
        x = sample_ancestral(model, batch_size=2, length=L, fixed_tokens=fixed, fixed_mask=mask)
    assert x[:, -2:].tolist() == [[5, 6], [5, 6]]
    for kw, message in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"length": 0}, "length")):
        with pytest.raises(ValueError, match=message):
            sample_ancestral(model, **{"batch_size": 1, "length": L, **kw})
    with pytest.raises(ValueError, match="real tokens"):
        sample_ancestral(model, batch_size=1, length=L, fixed_tokens=fixed + N, fixed_mask=mask)
    with pytest.raises(TypeError, match="autoregressive"):
        sample_ancestral(SEDD(SEDD.config_for("cpu", tokens=N, n_blocks=1)), batch_size=1, length=L)


# -- checkpoints -------------------------------------------------------------------------------------


def _byte_checkpoint(folder):
    """A one-block AR model over byte tokens (length 16) saved with its tokenizer in ``folder``;
    its output weights drawn larger than at init, so samples differ from draw to draw."""
    from sedd.data import get_tokenizer

    tok = get_tokenizer("bytes")
    model = ARModel(ARModel.config_for("cpu", tokens=tok.vocab_size, n_blocks=1, length=16))
    with torch.no_grad():
        model.output_layer.linear.weight.normal_()
    model.save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    return model, tok


def test_checkpoint_round_trip_and_the_other_class_refuses_it(tmp_path):
    from sedd.pretrained import load_pretrained

    model, tok = _byte_checkpoint(tmp_path)
    p = load_pretrained(tmp_path, device="cpu")
    assert isinstance(p.model, ARModel) and p.objective == "ar" and p.graph is None and p.noise is None
    for name, value in model.state_dict().items():
        assert torch.equal(p.model.state_dict()[name], value), name
    assert p.model.vocab_embed.embedding.shape[0] == tok.vocab_size + 1  # the BOS row
    assert p.model.state_dict()["output_layer.linear.weight"].shape[0] == tok.vocab_size  # no MASK row (the
    # public layout: the aligned head's padding rows exist in memory only)
    with pytest.raises(ValueError, match="objective 'ar'.*ARModel"):
        SEDD.from_pretrained(tmp_path)
    SEDD(SEDD.config_for("cpu", tokens=tok.vocab_size, n_blocks=1)).save_pretrained(tmp_path / "sedd")
    with pytest.raises(ValueError, match="objective 'sedd'.*sedd.model.SEDD"):
        ARModel.from_pretrained(tmp_path / "sedd")
    assert load_pretrained(tmp_path / "sedd", tokenizer="bytes", device="cpu").objective == "sedd"


def test_generate_and_the_harness_with_an_autoregressive_checkpoint(tmp_path):
    from sedd import generate, generate_samples
    from sedd.harness import SEDDLM, HarnessError

    _, tok = _byte_checkpoint(tmp_path)
    texts = generate(str(tmp_path), ["def ", "x = "], length=12, seed=0, device="cpu")
    assert texts[0].startswith("def ") and texts[1].startswith("x = ")
    assert texts == generate(str(tmp_path), ["def ", "x = "], length=12, seed=0, device="cpu")
    # past the model's 16 positions: window by window, every window holding the tokens before it
    (long,) = generate_samples(str(tmp_path), "import ", length=40, seed=1, temperature=0.7, top_k=50)
    assert len(long.tokens) == 40 and long.text.startswith("import ")
    (plain,) = generate_samples(str(tmp_path), "import ", length=40, seed=1, temperature=0.7, top_k=50,
                                kv_cache=False)
    assert plain.tokens == long.tokens  # re-running the prefix at every token: the same draws
    with pytest.raises(ValueError, match="kv_cache applies to autoregressive and block-diffusion models"):
        generate(SEDD(SEDD.config_for("cpu", tokens=tok.vocab_size, n_blocks=1, length=16)), "a", length=8,
                 tokenizer=tok, kv_cache=False)
    with pytest.raises(ValueError, match="temperature applies to autoregressive models"):
        generate(SEDD(SEDD.config_for("cpu", tokens=tok.vocab_size, n_blocks=1, length=16)), "a", length=8,
                 tokenizer=tok, temperature=0.5)
    # the harness answers for it (tests/test_harness.py), and refuses the draws of t it has no use for
    with pytest.raises(HarnessError, match="mc_samples does not apply to an autoregressive checkpoint"):
        SEDDLM(pretrained=str(tmp_path), device="cpu", mc_samples=8)


def test_no_sigma_input_and_the_trunk_of_sedd():
    ar = ARModel(ARModel.config_for("cpu", tokens=N))
    sedd = SEDD(SEDD.config_for("cpu", tokens=N))
    names = {n for n, _ in ar.named_parameters()}
    assert "cond_embed" in names and not any(n.startswith("sigma_map") for n in names)
    # the same blocks, shape for shape; only the conditioning and the vocabulary rows differ
    blocks = {n: p.shape for n, p in sedd.named_parameters() if n.startswith("blocks.")}
    assert blocks == {n: p.shape for n, p in ar.named_parameters() if n.startswith("blocks.")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hasattr(ar, "score_shift")  # so the SEDD losses and samplers never take it for a score model


# -- DDP and FSDP2 on CPU: gloo, two processes -------------------------------------------------------


def _distributed_worker(rank, world):
    x = _tokens(B=2, seed=10 + rank)
    for wrap in ("ddp", "fsdp"):
        model = _model(torch.float32)
        wrapped = wrap_for_two_processes(model, wrap)
        grads = [_grads(model, lambda: ar_loss(wrapped, x, fused=fused)) for fused in (True, False)]
        assert_same_grads(*grads, wrap)
        if wrap == "fsdp":  # train/run.py's samples under FSDP: the forward on every position, no cache
            model.eval()
            x = sample_ancestral(model, batch_size=2, length=L, generator=torch.Generator().manual_seed(0),
                                 kv_cache=False)
            assert x.shape == (2, L) and int(x.max()) < N


@pytest.mark.slow
def test_ddp_and_fsdp2_gradients_of_the_fused_head_match_the_logits_path():
    run_on_two_processes(_distributed_worker)
