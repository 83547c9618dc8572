"""Block diffusion (sedd.model.BlockSEDD, sedd.block_diffusion, sedd.sampling.block): the block-causal
mask, the loss against a per-block reference, b = L is SEDD, the bound against the exact likelihood
of a toy (b = 1: its autoregressive factorisation), the KV cache against a recompute, generation
from the exact conditionals, and the stop at EOS."""

import copy
import itertools
import math
import warnings

import pytest
import torch

import sedd.sampling.block as block_sampling
from sedd import ops
from sedd.block_diffusion import (
    block_diffusion_bounds,
    block_diffusion_loss,
    block_diffusion_sequence_bounds,
    block_diffusion_validation_losses,
    block_times,
    clipped_times,
    mask_rate_range,
    noise_blocks,
)
from sedd.graph import Absorbing
from sedd.likelihood import make_blocks, sequence_bounds, summarize
from sedd.losses import score_entropy_loss
from sedd.model import SEDD, BlockSEDD
from sedd.model.block import block_diffusion_mask
from sedd.model.layers import PerToken
from sedd.noise import Geometric, LogLinear
from sedd.sampling import sample_block_diffusion
from tests.helpers import assert_same_grads, chi2_pvalue, random_sedd, run_on_two_processes, wrap_for_two_processes

pytestmark = pytest.mark.usefixtures("one_thread")

N = 11
GRAPH, NOISE = Absorbing(N), LogLinear()


def _model(block_size=4, length=12, dtype=torch.float64, seed=0, time_conditioning=False) -> BlockSEDD:
    torch.manual_seed(seed)
    config = BlockSEDD.config_for("cpu", block_size=block_size, tokens=N, hidden_size=32, cond_dim=16, n_blocks=2,
                                  n_heads=2, length=length, time_conditioning=time_conditioning)
    model = BlockSEDD(config).to(dtype).eval()
    # adaLN (the gates included) and the head start at zero, which would make every block the
    # identity: random weights, so that attention carries information the tests can see
    # (drawn through the state dict, the public layout: the head's V rows, so the draws do not
    # depend on the aligned head's padding, which stays zero)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name in params:
                p.normal_(0, 0.3)
    return model


def _tokens(B=3, L=12, seed=1):
    return torch.randint(0, N, (B, L), generator=torch.Generator().manual_seed(seed))


def _noisy(x0, seed=2, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(x0.shape, generator=g) < p, GRAPH.mask_id, x0)


# -- the model -----------------------------------------------------------------------------------


def test_the_mask_is_the_block_causal_rule():
    b, n_noisy, n_clean, start = 2, 4, 6, 2  # noisy blocks 1, 2 after clean blocks 0, 1, 2
    mask = block_diffusion_mask(n_noisy, n_clean, b, start=start)
    for q, k in itertools.product(range(n_noisy + n_clean), repeat=2):
        q_clean, k_clean = q >= n_noisy, k >= n_noisy
        qb = (q - n_noisy) // b if q_clean else (start + q) // b
        kb = (k - n_noisy) // b if k_clean else (start + k) // b
        want = (kb <= qb if k_clean else False) if q_clean else (kb < qb if k_clean else kb == qb)
        assert bool(mask[q, k]) == want, (q, k)
        # a context of one block also keeps every query from the clean blocks two or more before its own
        near = block_diffusion_mask(n_noisy, n_clean, b, start=start, context=b)
        assert bool(near[q, k]) == (want and kb >= qb - 1), (q, k)


def test_a_noisy_block_sees_itself_and_the_clean_blocks_before_it_only():
    """The gradient of block k's scores with respect to the embedded inputs is nonzero exactly on
    noisy block k and on clean blocks < k (both streams; x0's last block is not even an input)."""
    model, b, L = _model(), 4, 12
    x0, x_t = _tokens(), _noisy(_tokens())
    inputs = {}

    def keep(module, args, out):
        out.retain_grad()
        inputs["h"] = out
        return out

    handle = model.vocab_embed.register_forward_hook(keep)
    try:
        for k in range(L // b):
            model.zero_grad()
            model(x_t, x0, raw=True)[:, k * b : (k + 1) * b].sum().backward()
            seen = inputs["h"].grad.abs().sum(-1).sum(0) > 0  # [2L − b]: noisy stream, then clean
            assert seen.shape == (2 * L - b,)
            want = torch.zeros(2 * L - b, dtype=torch.bool)
            want[k * b : (k + 1) * b] = True  # itself
            want[L : L + k * b] = True  # the clean blocks before it
            assert torch.equal(seen, want), k
    finally:
        handle.remove()


def test_per_token_conditioning_equals_the_per_sequence_path_when_every_token_reads_the_same():
    """The trunk's blocks and output layer with PerToken conditioning whose tokens all read their
    sequence's row give SEDD's per-sequence numbers (to fp32 rounding: the adaLN linear runs on
    [B, 1, C] rows instead of [B, C])."""
    sedd = random_sedd(N + 1, 12)
    x = _tokens(L=12)
    sigma = torch.tensor([0.2, 1.5, 6.0])
    want = sedd(x, sigma, raw=True)
    c = torch.nn.functional.silu(sedd.sigma_map(sigma))  # [B, C]
    got = sedd._run_blocks(sedd.vocab_embed(x), PerToken(c[:, None], torch.zeros(12, dtype=torch.long)), None,
                           None, None)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(want[0], want[1], atol=1e-3)  # the premise: σ reaches the scores


def test_each_noisy_block_reads_its_own_sigma_and_the_clean_stream_none():
    """σ-conditioned: block k's scores depend on σ_k and on no other block's σ (the gradient), and
    changing every σ leaves the clean stream's keys and values (what the KV cache holds) unchanged."""
    model, x0 = _model(time_conditioning=True), _tokens()
    x_t = _noisy(x0)
    sigma = torch.tensor([[0.3, 1.0, 2.0]] * 3, dtype=torch.float64, requires_grad=True)
    for k in range(3):
        sigma.grad = None
        model(x_t, x0, sigma, raw=True)[:, 4 * k : 4 * k + 4].sum().backward()
        seen = sigma.grad.abs().sum(0) > 0
        assert seen.tolist() == [j == k for j in range(3)], k
    keys = {}
    handles = [block.attn_qkv.register_forward_hook(lambda mod, args, out, i=i: keys.__setitem__(i, out.detach()))
               for i, block in enumerate(model.blocks)]
    try:
        clean = []
        for s in (sigma.detach(), 3 * sigma.detach()):
            model(x_t, x0, s, raw=True)
            clean.append([keys[i][:, 12:] for i in range(len(model.blocks))])  # the clean stream's q, k, v
    finally:
        for h in handles:
            h.remove()
    for a, b in zip(*clean):
        assert torch.equal(a, b)


def test_layouts_refusals_and_the_checkpoint(tmp_path):
    model, x0 = _model(), _tokens()
    x_t = _noisy(x0)
    # padding is never attended to: other tokens under it change no real token's scores
    pad = torch.ones(3, 12, dtype=torch.bool)
    pad[:, 10:] = False
    other = x_t.clone()
    other[:, 10:] = (other[:, 10:] + 1) % N
    assert not torch.allclose(model(x_t, x0, raw=True)[:, 8:10], model(other, x0, raw=True)[:, 8:10])
    torch.testing.assert_close(model(x_t, x0, raw=True, attention_mask=pad)[:, :10],
                               model(other, x0, raw=True, attention_mask=pad)[:, :10], rtol=1e-12, atol=1e-12)
    # no attention across documents: a block after a document boundary ignores the clean block before it
    docs = torch.tensor([[0] * 4 + [1] * 8] * 3)
    other = x0.clone()
    other[:, :4] = (other[:, :4] + 1) % N
    assert not torch.allclose(model(x_t, x0, raw=True)[:, 4:8], model(x_t, other, raw=True)[:, 4:8])
    torch.testing.assert_close(model(x_t, x0, raw=True, segment_ids=docs)[:, 4:],
                               model(x_t, other, raw=True, segment_ids=docs)[:, 4:], rtol=1e-12, atol=1e-12)
    sigma = torch.full((3, 3), 0.7)
    scores = model(x_t, x0, sigma)
    assert scores.dtype == torch.float32 and torch.equal(model.postprocess(model(x_t, x0, raw=True), x_t, sigma), scores)

    with pytest.raises(TypeError, match="model\\(x_t, x0, sigma\\)"):
        model(x_t, sigma)  # called as a SEDD model
    with pytest.raises(ValueError, match="not a multiple of the block size 4"):
        model(x_t[:, :10], x0[:, :10], raw=True)
    with pytest.raises(ValueError, match="the noise of every block"):
        model(x_t, x0, torch.ones(3))
    config = BlockSEDD.config_for("cpu", block_size=5, tokens=N, length=12)
    with pytest.raises(ValueError, match="must divide model.length"):
        BlockSEDD(config)
    with pytest.raises(ValueError, match="a block model needs the absorbing graph"):
        BlockSEDD({**config, "graph": {"type": "uniform"}, "model": {**config["model"], "block_size": 4}})
    with pytest.raises(ValueError, match="sigma is missing: this block model reads the noise of every block"):
        _model(time_conditioning=True)(x_t, x0, raw=True)
    with pytest.raises(ValueError, match="model.block_size must be a positive integer"):
        BlockSEDD({**config, "model": {**config["model"], "block_size": 2.0}})
    with pytest.raises(ValueError, match="block_size is missing"):
        BlockSEDD({**config, "model": {k: v for k, v in config["model"].items() if k != "block_size"}})
    with pytest.raises(ValueError, match="SDPA"):
        model.attn_backend = "flash"
    with pytest.raises(ValueError, match="which sedd.model.BlockSEDD loads"):
        SEDD(model.config)

    model.save_pretrained(tmp_path)
    loaded = BlockSEDD.from_pretrained(tmp_path).double()
    assert loaded.config["objective"] == "block" and loaded.block_size == 4
    # the weights were saved in fp64 and loaded into an fp32 model
    torch.testing.assert_close(loaded(x_t, x0, raw=True), model(x_t, x0, raw=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_block_size_L_is_sedd(time_conditioning):
    """One block and nothing clean: the forward, the loss and the bound are SEDD's, number for number
    (σ-conditioned: SEDD's per-sequence conditioning, the per-token path is not taken)."""
    block = _model(block_size=12, dtype=torch.float32, time_conditioning=time_conditioning)
    config = copy.deepcopy(block.config)
    del config["objective"]
    sedd = SEDD(config).eval()
    sedd.load_state_dict(block.state_dict())
    x0 = _tokens()
    x_t = _noisy(x0)
    sigma = torch.tensor([0.3, 1.0, 4.0])
    assert torch.equal(block(x_t, x0, sigma[:, None], raw=True), sedd(x_t, sigma, raw=True))
    for fused in (True, False):
        got = block_diffusion_loss(block, x0, GRAPH, NOISE, generator=torch.Generator().manual_seed(0), fused=fused)
        want = score_entropy_loss(sedd, x0, GRAPH, NOISE, generator=torch.Generator().manual_seed(0), fused=fused)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    got = block_diffusion_sequence_bounds(block, x0, GRAPH, NOISE, num_samples=6, generator=torch.Generator().manual_seed(3))
    want = sequence_bounds(sedd, x0, GRAPH, NOISE, num_samples=6, generator=torch.Generator().manual_seed(3))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parameter_dtypes_compute_as_sedd_does(dtype):
    model = _model(dtype=torch.float32)
    x0 = _tokens()
    x_t = _noisy(x0)
    low = copy.deepcopy(model).to(dtype)
    assert low.compute_dtype("cpu") == dtype and low(x_t, x0, raw=True).dtype == dtype
    scores = low(x_t, x0, torch.full((3, 3), 0.5))
    assert scores.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(scores, model(x_t, x0, torch.full((3, 3), 0.5)), rtol=tol, atol=tol * 10)
    loss = block_diffusion_loss(low, x0, GRAPH, NOISE, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# -- the loss ------------------------------------------------------------------------------------


def _reference_loss(model, x0, t, x_t, mask=None):
    """Σ_k Σ_{i in block k} dσ_k·ℓ, block by block with the graph's own score entropy: [B]."""
    b, K = model.block_size, x0.shape[1] // model.block_size
    sigma, dsigma = NOISE(t)
    scores = model(x_t, x0, sigma, attention_mask=mask).double()
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for k in range(K):
        span = slice(k * b, (k + 1) * b)
        per_token = GRAPH.score_entropy(scores[:, span], sigma[:, k].double(), x_t[:, span], x0[:, span])
        if mask is not None:
            per_token = per_token * mask[:, span]
        total += dsigma[:, k].double() * per_token.sum(-1)
    return total


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_the_loss_is_the_sum_of_the_blocks_score_entropies(time_conditioning):
    model = _model(time_conditioning=time_conditioning)
    x0 = _tokens()
    g = torch.Generator().manual_seed(5)
    t = 0.05 + 0.9 * torch.rand(3, 3, generator=g, dtype=torch.float64)
    x_t = noise_blocks(x0, NOISE(t)[0], GRAPH, g)
    want = _reference_loss(model, x0, t, x_t)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 9:] = False
    for fused in (True, False):
        got = block_diffusion_loss(model, x0, GRAPH, NOISE, t=t, x_t=x_t, reduction="none", fused=fused)
        # the post-processed scores of the reference are fp32, as the model's are
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        mean = block_diffusion_loss(model, x0, GRAPH, NOISE, t=t, x_t=x_t, scale=0.25, fused=fused)
        torch.testing.assert_close(mean, 0.25 * want.mean(), rtol=1e-6, atol=0)
        masked = block_diffusion_loss(model, x0, GRAPH, NOISE, t=t, x_t=x_t, attention_mask=mask, reduction="none",
                                      fused=fused)
        torch.testing.assert_close(masked, _reference_loss(model, x0, t, x_t, mask), rtol=1e-6, atol=0)
        torch.testing.assert_close(masked[1:], want[1:], rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="one time per block"):
        block_diffusion_loss(model, x0, GRAPH, NOISE, t=t[:, 0])
    with pytest.raises(ValueError, match="pass those t too"):
        block_diffusion_loss(model, x0, GRAPH, NOISE, x_t=x_t)
    with pytest.raises(ValueError, match="multiple of the block size 4"):
        block_diffusion_loss(model, x0[:, :10], GRAPH, NOISE)
    with pytest.raises(TypeError, match="block model"):
        block_diffusion_loss(SEDD(SEDD.config_for("cpu", tokens=N, n_blocks=1)), x0, GRAPH, NOISE)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_fused_and_unfused_losses_have_the_same_gradients(time_conditioning):
    model = _model(time_conditioning=time_conditioning)
    x0 = _tokens()

    def grads(fused):
        model.zero_grad(set_to_none=True)
        block_diffusion_loss(model, x0, GRAPH, NOISE, generator=torch.Generator().manual_seed(4), scale=0.5,
                             fused=fused).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, unfused = grads(True), grads(False)
    assert fused.keys() == unfused.keys() and "output_layer.linear.weight" in fused
    assert ("sigma_map.mlp.0.weight" in fused) == time_conditioning
    for name in fused:
        torch.testing.assert_close(fused[name], unfused[name], rtol=1e-9, atol=1e-11, msg=name)


def test_the_clipped_schedule_draws_masking_rates_within_its_range():
    """mask_rate_range (β, ω): every block's time has its masking rate 1 − e^{−σ̄(t)} in [β, ω] and
    the draws span it, on both schedules; 0,1 draws the unclipped loss's times bit for bit; the
    loss draws its times so; ranges outside 0 ≤ β < ω ≤ 1 are one-line errors."""
    for noise in (NOISE, Geometric()):
        t = block_times(400, 8, span=clipped_times(noise, (0.45, 0.95)), generator=torch.Generator().manual_seed(0))
        rate = -torch.expm1(-noise.total(t.double()))
        assert float(rate.min()) >= 0.45 - 1e-6 and float(rate.max()) <= 0.95 + 1e-6, noise
        assert float(rate.min()) < 0.46 and float(rate.max()) > 0.94, noise
    assert clipped_times(NOISE, "0,1") == (1e-3, 1.0)
    assert torch.equal(block_times(4, 3, generator=torch.Generator().manual_seed(1)),
                       block_times(4, 3, span=clipped_times(NOISE, "0,1"), generator=torch.Generator().manual_seed(1)))
    model, x0 = _model(), _tokens()
    g = torch.Generator().manual_seed(5)
    t = block_times(3, 3, span=clipped_times(NOISE, "0.3,0.8"), generator=g)
    x_t = noise_blocks(x0, NOISE(t)[0], GRAPH, g)
    torch.testing.assert_close(
        block_diffusion_loss(model, x0, GRAPH, NOISE, mask_rate_range="0.3,0.8", generator=torch.Generator().manual_seed(5)),
        block_diffusion_loss(model, x0, GRAPH, NOISE, t=t, x_t=x_t), rtol=0, atol=0)
    for bad in ["0.5,0.5", "0.9,0.1", "-0.1,0.5", "0.2,1.1", "a,b", "0.5", (0.1,), "nan,0.5", None]:
        with pytest.raises(ValueError, match="two numbers BETA,OMEGA with 0 <= BETA < OMEGA <= 1") as err:
            mask_rate_range(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="holds no training time above sampling_eps"):
        clipped_times(NOISE, (0, 0.0005))
    with pytest.raises(ValueError, match="pass it or t, not both"):
        block_diffusion_loss(model, x0, GRAPH, NOISE, t=t, mask_rate_range=(0.3, 0.8))


def test_validation_losses_draw_each_sequence_from_its_own_generator():
    model = _model()
    x0 = _tokens(B=4)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    together = block_diffusion_validation_losses(model, x0, GRAPH, NOISE, gens([10, 11, 12, 13]))
    alone = torch.cat([block_diffusion_validation_losses(model, x0[r : r + 1], GRAPH, NOISE, gens([10 + r]))
                       for r in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)
    assert together.shape == (4,) and len(set(together.tolist())) == 4


# -- the bound on the exact-score toy --------------------------------------------------------------


def _p_data(L: int, seed: int, n: int = 2) -> torch.Tensor:
    """Correlated, full support (tests/test_exact_score.py's toy)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(*([n] * L), generator=g, dtype=torch.float64) + 0.1
    for k in range(n):
        p[(k,) * L] += 1.5
    return p / p.sum()


class ExactBlockModel(torch.nn.Module):
    """The exact σ-free block model of a toy p_data over n^L sequences: at a MASK of noisy block k,
    z_y = log p_data(x_i = y | the visible tokens of the block, x0's blocks < k) + log N, so that
    ŝ = z + shift(σ_k) is the exact score (docs/math.md, "Fewer network evaluations"). The head of
    a fused loss or sampler gets z as the hidden state and the identity as the weight."""

    objective = "block"

    def __init__(self, p_data: torch.Tensor, graph, block_size: int):
        super().__init__()
        self.graph, self.block_size, self.length = graph, block_size, p_data.dim()
        self.p = p_data / p_data.sum()
        n = self.p.shape[0]
        # every completion of a block, [n^b, b], and its tokens one-hot [n^b, b, n]
        self.completions = torch.tensor(list(itertools.product(range(n), repeat=block_size)))
        self.one_hot = torch.nn.functional.one_hot(self.completions, n).double()

    def score_shift(self, sigma):
        return self.graph.score_shift(sigma)

    def conditional(self, context: torch.Tensor) -> torch.Tensor:
        """[B, n^b]: p(block = each completion | the clean context [B, k·b] before it)."""
        b, k = self.block_size, context.shape[1]
        later = tuple(range(k + b, self.length))
        table = self.p.sum(dim=later) if later else self.p  # [n] * (k + b)
        rows = table.reshape(-1, self.completions.shape[0])  # one row per context
        code = torch.zeros(context.shape[0], dtype=torch.long)
        for i in range(k):
            code = code * self.p.shape[0] + context[:, i]
        out = rows[code]
        return out / out.sum(-1, keepdim=True)

    def forward(self, x_t, x0, sigma=None, *, raw=False, head=None, only_last_block=False):
        B, L = x_t.shape
        b, n, V = self.block_size, self.p.shape[0], self.graph.dim
        z = torch.zeros(B, L, V, dtype=torch.float64)
        for k in range(L // b) if not only_last_block else [L // b - 1]:
            block = x_t[:, k * b : (k + 1) * b]
            visible = block != self.graph.mask_id
            fits = ((self.completions[None] == block[:, None]) | ~visible[:, None]).all(-1)  # [B, n^b]
            w = self.conditional(x0[:, : k * b]) * fits
            probs = torch.einsum("bc,cin->bin", w, self.one_hot) / w.sum(-1)[:, None, None]
            z[:, k * b : (k + 1) * b, :n] = probs.clamp_min(1e-300).log() + math.log(self.graph.N)
        if only_last_block:
            z = z[:, -b:]
            x_t = x_t[:, -b:]
        if head is not None:
            return head(z, torch.eye(V, dtype=z.dtype), torch.zeros(V, dtype=z.dtype))
        if raw:
            return z
        out = z + self.score_shift(sigma.reshape(-1)).view(sigma.shape).repeat_interleave(b, 1)[:, :, None]
        return out.scatter(-1, x_t[..., None], 0.0)


def _nll_and_kl(p_data, x0, b, eps):
    """Per sequence: −log p(x0) and Σ_k KL(p_{1|0}(block k | x0) ‖ p_1(block k | x0's blocks < k)).
    At t = 1 a position is clean w.p. ε, else MASK, so the KL of block k is
    Σ_{S ⊆ block} ε^|S|·(1 − ε)^{b − |S|}·(−log p(x0_S | blocks < k)), S the visible positions."""
    L = p_data.dim()
    nll, kl = [], []
    for row in x0.tolist():
        nll.append(-math.log(p_data[tuple(row)].item()))
        total = 0.0
        for k in range(L // b):
            context = tuple(row[: k * b])
            table = p_data[context].sum(dim=tuple(range(b, L - k * b))) if L - k * b > b else p_data[context]
            table = table / table.sum()
            for visible in itertools.product([False, True], repeat=b):
                if not any(visible):
                    continue
                marginal = table.sum(dim=tuple(i for i in range(b) if not visible[i])) if not all(visible) else table
                p = marginal[tuple(row[k * b + i] for i in range(b) if visible[i])].item()
                total += eps ** sum(visible) * (1 - eps) ** (b - sum(visible)) * -math.log(p)
        kl.append(total)
    return torch.tensor(nll, dtype=torch.float64), torch.tensor(kl, dtype=torch.float64)


@pytest.mark.parametrize("L,b", [(3, 1), (4, 2), (3, 3)])
def test_the_bound_with_the_exact_conditionals_is_minus_log_p_data(L, b):
    """The block bound's integral with the exact conditionals equals −log p_data(x0) less the
    blocks' KL at t = 1, within Monte Carlo error; b = 1 is the autoregressive factorisation (its
    integral is (1 − ε)·Σ_i −log p(x_i | x_<i)), b = L the SEDD bound of the sequence."""
    p, graph = _p_data(L, seed=11 + L), Absorbing(2)
    model = ExactBlockModel(p, graph, b)
    x0 = torch.tensor([[0] * L, [0, 1] * (L // 2) + [1] * (L % 2), [1] + [0] * (L - 1)])
    out = block_diffusion_sequence_bounds(model, x0, graph, NOISE, num_samples=2000, batch_size=6000,
                                          generator=torch.Generator().manual_seed(6))
    eps = math.exp(-float(NOISE.total(torch.tensor(1.0, dtype=torch.float64))))  # P(clean) at t = 1
    nll, kl = _nll_and_kl(p, x0, b, eps)
    se = out["variance"].sqrt()
    assert (se < 0.1 * nll).all()
    assert ((out["integral"] - (nll - kl)).abs() < 4 * se + 1e-3).all(), (out["integral"], nll - kl, se)
    if b == 1:
        torch.testing.assert_close(nll - kl, (1 - eps) * nll)  # the AR factorisation, ε-weighted
    assert torch.equal(out["tokens"], torch.full((3,), float(L)))


def test_the_conditional_bound_with_the_exact_conditionals(n_fixed=3):
    """Positions outside ``maskable`` stay clean (a context that ends inside a block): the integral
    is −log p(x0[n_fixed:] | x0[:n_fixed]) less each block's KL at t = 1 over its maskable
    positions, within Monte Carlo error; the prior counts those positions only."""
    L, b = 6, 2
    p, graph = _p_data(L, seed=21), Absorbing(2)
    model = ExactBlockModel(p, graph, b)
    x0 = torch.tensor([[0] * L, [0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 1]])
    maskable = torch.arange(L)[None].expand(3, L) >= n_fixed  # the context ends inside block 1
    out = block_diffusion_sequence_bounds(model, x0, graph, NOISE, num_samples=2000, batch_size=6000,
                                          maskable=maskable, generator=torch.Generator().manual_seed(7))
    eps = math.exp(-float(NOISE.total(torch.tensor(1.0, dtype=torch.float64))))
    for row, integral, var in zip(x0.tolist(), out["integral"], out["variance"]):
        nll = -math.log(p[tuple(row)] / p[tuple(row[:n_fixed])].sum())
        kl = 0.0
        for k in range(L // b):
            c = min(max(k * b, n_fixed), (k + 1) * b)  # blocks < k and the block's own context, clean
            free = list(range(c, (k + 1) * b))
            if not free:
                continue
            given = p[tuple(row[:c])]  # [2] * (L − c)
            later = tuple(range(len(free), given.dim()))
            table = given.sum(dim=later) if later else given  # [2] * len(free)
            table = table / table.sum()
            for visible in itertools.product([False, True], repeat=len(free)):
                if any(visible):
                    marginal = table.sum(dim=tuple(i for i, v in enumerate(visible) if not v)) if not all(visible) \
                        else table
                    q = marginal[tuple(row[free[i]] for i, v in enumerate(visible) if v)].item()
                    kl += eps ** sum(visible) * (1 - eps) ** (len(free) - sum(visible)) * -math.log(q)
        se = float(var) ** 0.5
        assert se < 0.1 * nll and abs(float(integral) - (nll - kl)) < 4 * se + 1e-3, (row, float(integral), nll - kl)
    assert torch.equal(out["tokens"], torch.full((3,), float(L - n_fixed)))
    # all maskable: the unconditional bound, draw for draw
    every = block_diffusion_sequence_bounds(model, x0, graph, NOISE, num_samples=8, maskable=torch.ones_like(maskable),
                                            generator=torch.Generator().manual_seed(7))
    plain = block_diffusion_sequence_bounds(model, x0, graph, NOISE, num_samples=8,
                                            generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(every["integral"], plain["integral"], rtol=0, atol=0)


def test_the_corpus_bound_and_its_report():
    model = _model()
    blocks, mask = make_blocks(list(range(N)) * 3, 12)  # 33 tokens: the last block padded
    parts = block_diffusion_bounds(model, blocks, mask, GRAPH, NOISE, num_samples=4, batch_size=2,
                                   generator=torch.Generator().manual_seed(0))
    report = summarize(parts, 4, "stratified")
    assert report.tokens == 33 and report.sequences == 3 and report.stderr_nats_per_token > 0
    assert math.isfinite(report.nats_per_token) and report.prior_nats_per_token > 0


# -- generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_the_kv_cache_gives_the_forward_and_a_one_pass_extend(time_conditioning):
    """σ-conditioned, the cached block at σ_k (per sequence) equals the forward's per-token path."""
    model = _model(time_conditioning=time_conditioning)
    x0 = _tokens()
    x_t = _noisy(x0)
    sigma = torch.tensor([[0.2, 0.9, 3.0], [1.1, 0.05, 0.7], [2.5, 2.5, 0.4]], dtype=torch.float64)
    full = model(x_t, x0, sigma, raw=True)
    step, once = model.new_cache(3), model.new_cache(3)
    model.extend(x0, once)  # all three blocks in one pass, block-causal among themselves
    for k in range(3):
        span = slice(4 * k, 4 * k + 4)
        torch.testing.assert_close(model.block_scores(x_t[:, span], step, sigma=sigma[:, k]), full[:, span],
                                   rtol=1e-12, atol=1e-12)
        rows = torch.tensor([2, 0])
        torch.testing.assert_close(model.block_scores(x_t[rows, span], step, sigma=sigma[rows, k], rows=rows),
                                   full[rows, span], rtol=1e-12, atol=1e-12)
        model.extend(x0[:, span], step)
    for a, b in zip(step.keys + step.values, once.keys + once.values):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x_t, x0, sigma, raw=True, only_last_block=True), full[:, 8:], rtol=1e-12,
                               atol=1e-12)
    if time_conditioning:  # the premise: the scores read σ
        assert not torch.allclose(full, model(x_t, x0, 2 * sigma, raw=True))
    with pytest.raises(ValueError, match="no room"):
        model.block_scores(x_t[:, :4], step, sigma=sigma[:, 0])
    with pytest.raises(RuntimeError, match="eval mode"):
        model.train().extend(x0, model.new_cache(3))


def test_past_the_training_length_a_block_reads_a_window_of_the_cache():
    """Past the training length (12 tokens) a block reads the last window − b = 8 clean tokens:
    the cached steps equal the forward with the same context, and cached samples equal the
    recomputed ones; with one layer (no deeper keys to carry older tokens) a block's scores do
    not depend on anything before its window."""
    model, x0 = _model(), _tokens(L=24)
    x_t = _noisy(x0)
    full = model(x_t, x0, raw=True, context=8)
    assert not torch.allclose(full, model(x_t, x0, raw=True))  # the window binds
    step, once = model.new_cache(3, 24), model.new_cache(3, 24)
    model.extend(x0, once, context=8)
    for k in range(6):
        span = slice(4 * k, 4 * k + 4)
        torch.testing.assert_close(model.block_scores(x_t[:, span], step, context=8), full[:, span],
                                   rtol=1e-12, atol=1e-12)
        model.extend(x0[:, span], step, context=8)
    for a, b in zip(step.keys + step.values, once.keys + once.values):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    shallow = copy.deepcopy(model)
    shallow.blocks = shallow.blocks[:1]
    edited = x0.clone()
    edited[:, :12] = (edited[:, :12] + 1) % N  # every token more than 8 before the last block
    torch.testing.assert_close(shallow(x_t, x0, raw=True, context=8)[:, 20:],
                               shallow(x_t, edited, raw=True, context=8)[:, 20:], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of the block size"):
        model(x_t, x0, raw=True, context=6)
    runs = [sample_block_diffusion(model, GRAPH, NOISE, batch_size=3, length=22, steps=3, kv_cache=kv,
                                   generator=torch.Generator().manual_seed(5)) for kv in (True, False)]
    assert torch.equal(*runs)


@pytest.mark.filterwarnings("ignore:cache='approximate'")
@pytest.mark.parametrize("predictor,cache,time_conditioning", [
    ("analytic", False, False), ("euler", True, False), ("first_hitting", False, False),
    ("analytic", False, True), ("first_hitting", False, True), ("euler", "approximate", True)])
def test_kv_cached_samples_equal_the_recomputed_ones(predictor, cache, time_conditioning):
    """Same generator, same tokens, with prompts ending inside a block and at a block's end;
    σ-conditioned too (the clean blocks' keys and values do not depend on the block's σ)."""
    model = _model(length=16, time_conditioning=time_conditioning)
    prompts = torch.tensor([[1, 2, 3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 0, 0, 0, 0], [3, 3, 0, 0, 0, 0, 0, 0]])
    fixed_tokens = torch.cat([prompts, torch.zeros(3, 8, dtype=torch.long)], 1)
    fixed_mask = torch.zeros(3, 16, dtype=torch.bool)
    for row, n in enumerate([6, 4, 2]):
        fixed_mask[row, :n] = True
    steps = {} if predictor == "first_hitting" else {"steps": 5}  # first hitting refuses a step count
    runs = [sample_block_diffusion(model, GRAPH, NOISE, batch_size=3, **steps, predictor=predictor, cache=cache,
                                   fixed_tokens=fixed_tokens, fixed_mask=fixed_mask, kv_cache=kv, return_stats=True,
                                   generator=torch.Generator().manual_seed(9)) for kv in (True, False)]
    (x, stats), (y, _) = runs
    assert torch.equal(x, y)
    assert torch.equal(x[fixed_mask], fixed_tokens[fixed_mask])
    assert int(x.max()) < N and stats.blocks.tolist() == [3, 3, 4] and stats.lengths.tolist() == [16] * 3
    # every leading block fixed in every row goes to the cache in one pass, and is never denoised
    whole = sample_block_diffusion(model, GRAPH, NOISE, batch_size=2, steps=5, fixed_tokens=fixed_tokens[0],
                                   fixed_mask=torch.arange(16) < 4, return_stats=True,
                                   generator=torch.Generator().manual_seed(9))[1]
    assert whole.blocks.tolist() == [3, 3]


def test_samples_from_the_exact_conditionals_follow_p_data():
    """The exact σ-free conditionals of a correlated toy, sampled block by block with the
    first-hitting sampler (exact per block): the sequences follow p_data (χ²). With a prompt, the
    rest follows the conditional."""
    L, b = 4, 2
    p, graph = _p_data(L, seed=3), Absorbing(2)
    model = ExactBlockModel(p, graph, b).eval()
    x = sample_block_diffusion(model, graph, NOISE, batch_size=6000, predictor="first_hitting", kv_cache=False,
                               generator=torch.Generator().manual_seed(1))
    codes = (x * torch.tensor([8, 4, 2, 1])).sum(-1)
    assert chi2_pvalue(codes, p.flatten()) > 1e-3
    x = sample_block_diffusion(model, graph, NOISE, batch_size=6000, predictor="analytic", steps=32, kv_cache=False,
                               fixed_tokens=torch.tensor([1, 0, 1, 0]), fixed_mask=torch.tensor([True, True, True, False]),
                               generator=torch.Generator().manual_seed(2))
    assert bool((x[:, :3] == torch.tensor([1, 0, 1])).all())
    assert chi2_pvalue(x[:, 3], p[1, 0, 1] / p[1, 0, 1].sum()) > 1e-3


def test_stop_at_eos():
    """A row stops at its first generated EOS: nothing but padding after it, no later block
    denoised for it; an EOS in the prompt does not stop it; with every row stopped the sampler ends."""
    model, eos, pad = _model(length=16), 3, 0
    with torch.no_grad():
        model.output_layer.linear.bias[eos] += 1.5  # EOS likely, not certain: rows stop in different blocks
    prompt = torch.tensor([eos, 5] + [0] * 14)
    x, stats = sample_block_diffusion(model, GRAPH, NOISE, batch_size=12, steps=4, stop_at_eos=True, eos_id=eos, pad_id=pad,
                                      fixed_tokens=prompt, fixed_mask=torch.arange(16) < 2, return_stats=True,
                                      generator=torch.Generator().manual_seed(4))
    stopped = stats.lengths < 16
    assert 0 < int(stopped.sum()) < 12 and len(set(stats.blocks.tolist())) > 1  # the test's premise
    for row, n, blocks in zip(x, stats.lengths.tolist(), stats.blocks.tolist()):
        assert row[0] == eos and row[1] == 5  # the prompt, its EOS included, stays and stops nothing
        generated_eos = (row[2:n] == eos).nonzero()
        if n < 16:
            assert row[n - 1] == eos and generated_eos.numel() == 1 and bool((row[n:] == pad).all())
            assert blocks == (n - 1) // 4 + 1  # no block after the one holding the EOS
        else:
            assert generated_eos.numel() == 0 and blocks == 4
    assert int(stats.nfe.max()) > int(stats.nfe[stopped].min())
    # no stop: the same first block, every block generated
    free = sample_block_diffusion(model, GRAPH, NOISE, batch_size=12, steps=4, fixed_tokens=prompt,
                                  fixed_mask=torch.arange(16) < 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(x[:, :4], torch.where(torch.arange(4) >= stats.lengths[:, None], pad, free[:, :4]))
    with torch.no_grad():
        model.output_layer.linear.bias[eos] += 50.0  # EOS certain: every row stops in its first block
    _, stats = sample_block_diffusion(model, GRAPH, NOISE, batch_size=4, steps=4, stop_at_eos=True, eos_id=eos,
                                      return_stats=True,
                                      generator=torch.Generator().manual_seed(4))
    assert stats.blocks.tolist() == [1] * 4 and stats.lengths.tolist() == [1] * 4
    assert stats.forward_calls <= 5  # the first block's steps, no cache append, no later block


def test_sampler_refusals_and_warnings(monkeypatch):
    model = _model()
    kw = dict(batch_size=2, steps=4)
    with pytest.raises(TypeError, match="needs a block model"):
        sample_block_diffusion(SEDD(SEDD.config_for("cpu", tokens=N, n_blocks=1)), GRAPH, NOISE, **kw)
    with pytest.raises(ValueError, match="the exact cache reuses network outputs only for a model that does not read"):
        sample_block_diffusion(_model(time_conditioning=True), GRAPH, NOISE, cache=True, **kw)
    for bad, match in [(dict(predictor="nope"), "predictor must be one of"), (dict(top_p=1.5), "top_p"),
                       (dict(eos_id=N), "eos_id must be a real token"), (dict(steps=0), "steps must be"),
                       (dict(cache="maybe"), "cache must be")]:
        with pytest.raises(ValueError, match=match):
            sample_block_diffusion(model, GRAPH, NOISE, **{**kw, **bad})
    with pytest.raises(RuntimeError, match="eval mode"):
        sample_block_diffusion(copy.deepcopy(model).train(), GRAPH, NOISE, **kw)
    monkeypatch.setattr(block_sampling, "_warned_later_fixed", False)
    with pytest.warns(UserWarning, match="do not steer the blocks before it"):
        sample_block_diffusion(model, GRAPH, NOISE, fixed_tokens=torch.tensor([0] * 11 + [4]),
                               fixed_mask=torch.arange(12) == 11, **kw)
    with pytest.warns(UserWarning, match="distances never trained"):
        x = sample_block_diffusion(model, GRAPH, NOISE, length=14, window=16, **kw)
    assert x.shape == (2, 14)
    with pytest.raises(ValueError, match="window 3 is shorter than one block"):
        sample_block_diffusion(model, GRAPH, NOISE, length=14, window=3, **kw)
    with pytest.raises(ValueError, match="stop_at_eos needs the EOS token's id"):
        sample_block_diffusion(model, GRAPH, NOISE, stop_at_eos=True, **kw)
    with pytest.raises(ValueError, match="temperature applies to autoregressive models"):
        sample_block_diffusion(model, GRAPH, NOISE, temperature=0.5, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with ops.value_checks(True):
            assert sample_block_diffusion(model, GRAPH, NOISE, length=10, **kw).shape == (2, 10)
            # past the training length with the default window: the relative positions of training
            assert sample_block_diffusion(model, GRAPH, NOISE, length=30, **kw).shape == (2, 30)


# -- DDP and FSDP2 on CPU: gloo, two processes -------------------------------------------------------


def _distributed_worker(rank, world):
    from sedd.objectives import objective_of

    x0 = _tokens(B=2, L=12, seed=10 + rank)
    for wrap in ("ddp", "fsdp"):
        model = _model(dtype=torch.float32).train()
        objective = objective_of(model)
        wrapped = wrap_for_two_processes(model, wrap)
        grads = []
        for fused in (True, False):
            model.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(3 + rank)
            if fused:  # train/run.py's step: the objective's loss, through the fused head
                loss = objective.loss(wrapped, x0, g, 0.5)
            else:
                loss = 0.5 * block_diffusion_loss(wrapped, x0, GRAPH, NOISE, generator=g, fused=False)
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert_same_grads(*grads, wrap)
        if wrap == "fsdp":  # train/run.py's samples under FSDP: every call through forward, no KV cache
            spec = objective.training_spec(fsdp=True)
            assert spec.kv_cache is False
            model.eval()
            x, _ = objective.sample(model, batch_size=2, length=12, spec=spec, generator=torch.Generator().manual_seed(0))
            assert x.shape == (2, 12) and int(x.max()) < N


@pytest.mark.slow
def test_ddp_and_fsdp2_gradients_of_the_objective_match_the_unfused_loss():
    run_on_two_processes(_distributed_worker)
