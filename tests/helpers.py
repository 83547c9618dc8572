"""Brute-force oracles and statistics shared by the tests (never used by the library)."""

from __future__ import annotations

import contextlib
import io
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from sedd import ops
from sedd.graph import Absorbing, Graph
from sedd.model import SEDD


def full_Q(graph: Graph) -> torch.Tensor:
    """The dense rate matrix Q[to, from] (columns sum to zero), float64. Tests only: V×V."""
    V = graph.dim
    if graph.absorbing:
        Q = -torch.eye(V, dtype=torch.float64)
        Q[graph.mask_id, :] += 1.0
        Q[graph.mask_id, graph.mask_id] = 0.0
    else:
        Q = torch.full((V, V), 1.0 / graph.N, dtype=torch.float64) - torch.eye(V, dtype=torch.float64)
    return Q


def expm(graph: Graph, sigma: float) -> torch.Tensor:
    return torch.linalg.matrix_exp(sigma * full_Q(graph))


def chi2_pvalue(draws: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of integer draws against a categorical distribution (cells with p = 0
    must never be drawn; tiny cells are pooled so the χ² approximation holds)."""
    probs = probs.double().cpu().numpy()
    counts = np.bincount(draws.cpu().numpy().ravel(), minlength=len(probs)).astype(np.float64)
    n = counts.sum()
    zero = probs <= 0
    assert counts[zero].sum() == 0, f"drew a zero-probability outcome: {np.nonzero(counts * zero)[0]}"
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big]) + ([counts[~big & ~zero].sum()] if (~big & ~zero).any() else [])
    exp = list(expected[big]) + ([expected[~big & ~zero].sum()] if (~big & ~zero).any() else [])
    if len(obs) < 2:
        return 1.0
    exp = np.array(exp) * (np.sum(obs) / np.sum(exp))
    # χ² survival function as the regularised upper incomplete gamma Q(df/2, χ²/2), in torch:
    # the GPU image that runs tests/test_kernels_cuda.py has no scipy
    chi2 = float(((np.array(obs) - exp) ** 2 / exp).sum())
    half_df = torch.tensor((len(obs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(half_df, torch.tensor(chi2 / 2, dtype=torch.float64)))


class FactorizedScore(torch.nn.Module):
    """The exact concrete score of a product distribution: every position i.i.d. with law π.

    Under either graph p_t(y) = Σ_{x0} π_{x0} p_{t|0}(y | x0) per position, and the model output
    is log p_t(y) − log p_t(x_t), the same contract as SEDD (ŝ[x_t] = 0). Samplers driven by it
    must reproduce π at every position.
    """

    def __init__(self, pi: torch.Tensor, graph: Graph):
        super().__init__()
        self.register_buffer("pi", pi.double() / pi.sum())
        self.graph = graph

    def marginal(self, sigma: torch.Tensor) -> torch.Tensor:
        """p_t(·) [B, V] float64."""
        sigma = sigma.double().reshape(-1, 1)
        stay = torch.exp(-sigma)
        if self.graph.absorbing:
            return torch.cat([stay * self.pi, -torch.expm1(-sigma)], dim=-1)
        return stay * self.pi + (-torch.expm1(-sigma)) / self.graph.N

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        logp = self.marginal(sigma).log()[:, None, :].expand(*x_t.shape, -1)
        return (logp - logp.gather(-1, x_t.unsqueeze(-1))).float()


class ExactSequenceScore(torch.nn.Module):
    """The exact concrete score of a distribution p0 over all sequences of length L ≤ 3 on N ≤ 3
    tokens, found by enumerating the forward process: p_t(x) = Σ_{x0} p0(x0) Π_i p_{t|0}(x_i | x0_i).
    Output ŝ[b, i, y] = log p_t(x with x_i = y) − log p_t(x), as a SEDD model's."""

    def __init__(self, p0: torch.Tensor, graph: Graph, perturb: float = 0.0, seed: int = 0):
        super().__init__()
        self.graph, self.L = graph, p0.dim()
        self.register_buffer("p0", (p0 / p0.sum()).double())
        g = torch.Generator().manual_seed(seed)
        self.perturb = perturb * torch.randn(*([graph.dim] * self.L), self.L, graph.dim, generator=g, dtype=torch.float64)

    def marginal(self, sigma: float) -> torch.Tensor:
        """p_t over all V^L sequences, as a tensor with L axes of size V (float64)."""
        N, V = self.graph.N, self.graph.dim
        # P[y, x0] = p_{t|0}(y | x0) for one position
        P = self.graph.transition_probs(torch.arange(N).unsqueeze(0), torch.tensor([sigma]))[0].double().T
        out = self.p0
        for axis in range(self.L):  # contract each clean axis with P
            out = torch.tensordot(P, out, dims=([1], [axis])).movedim(0, axis)
        assert out.shape == (V,) * self.L
        return out

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        B, L = x_t.shape
        out = torch.empty(B, L, self.graph.dim, dtype=torch.float64)
        for b in range(B):
            logp = self.marginal(float(sigma[b])).clamp_min(1e-300).log()
            here = tuple(x_t[b].tolist())
            for i in range(L):
                index = list(here)
                index[i] = slice(None)
                out[b, i] = logp[tuple(index)] - logp[here] + self.perturb[here][i]
                out[b, i, here[i]] = 0.0
        return out.float()


class JointExactScore(torch.nn.Module):
    """Exact concrete score of ``p_data`` (a tensor with L axes of size N, L ≤ 3), vectorised over the batch."""

    def __init__(self, p_data: torch.Tensor, graph):
        super().__init__()
        self.graph, self.L = graph, p_data.dim()
        self.p_data = (p_data / p_data.sum()).double()
        V = graph.dim
        self.strides = torch.tensor([V ** (self.L - 1 - i) for i in range(self.L)])

    def kernel(self, sigma: torch.Tensor) -> torch.Tensor:
        """[B, V, N]: p_{t|0}(y | x0) for one position, per row's σ."""
        N = self.graph.N
        x0 = torch.arange(N).expand(sigma.shape[0], N)
        return self.graph.transition_probs(x0, sigma.double()).double().transpose(1, 2)

    def marginal(self, sigma: torch.Tensor) -> torch.Tensor:
        """p_t over all V^L noisy sequences, [B, V^L] float64."""
        P = self.kernel(sigma)
        letters = "abc"[: self.L]
        noisy = "".join(ch.upper() for ch in letters)
        spec = ",".join(f"z{u}{c}" for u, c in zip(noisy, letters)) + f",{letters}->z{noisy}"
        return torch.einsum(spec, *([P] * self.L), self.p_data).reshape(sigma.shape[0], -1)

    def forward(self, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.reshape(-1)
        logp = self.marginal(sigma).clamp_min(1e-300).log()  # [B, V^L]
        code = (x_t.long() * self.strides).sum(-1)  # [B]
        y = torch.arange(self.graph.dim)
        neighbours = code[:, None, None] + (y[None, None, :] - x_t.long()[:, :, None]) * self.strides[None, :, None]
        rows = logp.gather(1, neighbours.reshape(len(code), -1)).reshape(neighbours.shape)
        return (rows - logp.gather(1, code[:, None])[:, :, None]).float()


def sequence_codes(x: torch.Tensor, N: int) -> torch.Tensor:
    """Each row of ``x`` [B, L] (tokens < N) as one integer, the index of its cell in an N^L table."""
    strides = torch.tensor([N ** (x.shape[1] - 1 - i) for i in range(x.shape[1])])
    return (x * strides).sum(-1)


def correlated_p_data(N: int, L: int, seed: int) -> torch.Tensor:
    """Correlated, full-support: a random table plus a large bonus on the 'all equal' sequences."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(*([N] * L), generator=g, dtype=torch.float64) + 0.1
    for k in range(N):
        p[(k,) * L] += 1.5
    return p / p.sum()


# One file of this interpreter's standard library: text every machine has, nothing to download.
ARGPARSE = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"


def small_model_config(tokens: int, graph: str = "absorb", **model_overrides) -> dict:
    """A whole config of a small DDiT (width 64, 2 blocks: the former "tiny" preset), cheap enough
    for tests on CPU; ``model_overrides`` change the model section."""
    return SEDD.config_for("cpu", tokens=tokens, graph=graph,
                           **{"hidden_size": 64, "cond_dim": 32, "n_blocks": 2, **model_overrides})


def random_sedd(tokens: int, length: int, time_conditioning: bool = True, seed: int = 0) -> SEDD:
    """A small SEDD (width 32, eval mode) with its adaLN and output weights drawn N(0, 0.3²) (zero
    at initialisation): scores that differ between tokens, positions and σ, for the samplers' tests."""
    torch.manual_seed(seed)
    model = SEDD(small_model_config(tokens, hidden_size=32, cond_dim=16, n_heads=2, length=length,
                                    time_conditioning=time_conditioning))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "output_layer.linear" in name:
                p.normal_(0, 0.3)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Score-entropy cases (the kernel tests on CPU and on CUDA)

SIGMAS = [1e-5, 0.3, 0.7, 5.0, 20.0]  # one row per σ: from nearly clean to nearly all noise


def score_entropy_case(graph, L=4, dtype=torch.float32, masked=0.5, sigmas=SIGMAS, raw=True, garbage=True, seed=0):
    """Inputs with one row per σ; absorbing: a fraction ``masked`` of positions at MASK; uniform:
    half the positions moved to a random token. ``garbage`` puts NaN at every x_t column (ignored)."""
    gen = torch.Generator().manual_seed(seed)
    B, V = len(sigmas), graph.dim
    z = (2 * torch.randn(B, L, V, generator=gen)).to(dtype)
    x0 = torch.randint(0, graph.N, (B, L), generator=gen)
    x_t = x0.clone()
    move = torch.rand(B, L, generator=gen) < masked
    if graph.absorbing:
        x_t[move] = graph.mask_id
    else:
        x_t[move] = torch.randint(0, graph.N, (B, L), generator=gen)[move]
    if garbage:
        z.scatter_(-1, x_t.unsqueeze(-1), float("nan"))
    sigma = torch.tensor(sigmas)
    shift = torch.randn(B, generator=gen) if raw else None
    weight = torch.rand(B, generator=gen) + 0.5 if raw else None
    return z, sigma, x_t, x0, shift, weight


def compiled_score_entropy_matches_eager(device, backend: str, inplace: bool) -> None:
    """torch.compile(fullgraph) of ops.score_entropy (bf16 scores, raw output) gives the eager loss and gradient."""
    graph = Absorbing(36)
    z, sigma, x_t, x0, shift, weight = (
        t.to(device) if t is not None else None for t in score_entropy_case(graph, dtype=torch.bfloat16, garbage=False)
    )

    def step(w):
        return ops.score_entropy(w * 1, sigma, x_t, x0, graph, shift=shift, weight=weight,
                                 reduction="batchmean", inplace_backward=inplace)

    a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
    want = step(a)
    want.backward()
    got = torch.compile(step, fullgraph=True, backend=backend)(b)
    got.backward()  # the backward graph AOTAutograd compiled with the forward
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(b.grad, a.grad)


def reverse_step(kind, log_score, x_t, graph, gen):
    """One ``sedd.ops`` reverse step of ``kind`` with fixed moderate scalars (Δσ = 0.3; Euler:
    dσ = 0.5, Δt = 0.01), for tests about what a step does with unusual scores or tokens."""
    B = log_score.shape[0]
    if kind == "euler":
        return ops.euler_step(log_score, x_t, torch.full((B,), 0.5), 0.01, graph, gen)
    if kind == "analytic":
        return ops.analytic_step(log_score, x_t, torch.full((B,), 0.3), graph, gen)
    return ops.denoise_step(log_score, x_t, torch.full((B,), 0.3), graph, gen)


# -- two CPU processes joined by gloo (DDP and FSDP2 tests) ------------------------------------------


def _gloo_process(rank: int, world: int, rendezvous: str, errors, worker) -> None:
    import warnings

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        worker(rank, world)
    except BaseException as e:
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    else:
        # neither rank tears gloo down while the other may still use it: a rank that exited first
        # once aborted the other in its teardown ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_two_processes(worker) -> None:
    """Run ``worker(rank, world)`` (a module-level function: it is pickled) in two spawned CPU
    processes joined by a gloo process group, one thread each; a failure in either fails the
    calling test with the ranks' messages. The processes meet through a file, not a TCP port
    chosen beforehand, which another test (another pytest-xdist worker) could take in between."""
    import tempfile

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        try:
            mp.start_processes(_gloo_process, args=(2, f"{folder}/rendezvous", errors, worker), nprocs=2,
                               start_method="spawn")
        except Exception as e:
            msgs = []
            while not errors.empty():
                msgs.append(errors.get())
            pytest.fail(f"{msgs or e}")


def wrap_for_two_processes(model, kind: str):
    """``model`` wrapped as train/run.py wraps it in a process group: ``kind`` "ddp" (DDP) or
    "fsdp" (FSDP2 over every DDiT block and the root); what the losses get."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    if kind == "ddp":
        return DDP(model)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def assert_same_grads(a: dict, b: dict, kind: str) -> None:
    """Two {name: gradient} of one model match (``kind`` "fsdp": DTensor shards, this rank's)."""
    assert a.keys() == b.keys() and "output_layer.linear.weight" in a, kind
    for name, x in a.items():
        y = b[name]
        if kind == "fsdp":
            x, y = x.to_local(), y.to_local()
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), (kind, name)


def tiny_judge(tokenizer, folder: Path, n_positions: int = 64) -> Path:
    """A one-layer GPT-2 (width 16) over ``tokenizer``'s ids saved in ``folder`` with its tokenizer
    files: a judge for train/quality.py and sedd.metrics that needs no training and no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from train.train_judge import hf_tokenizer

    hf_tokenizer(tokenizer, folder)
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=n_positions, n_embd=16, n_layer=1,
                               n_head=2, bos_token_id=tokenizer.eos_id,
                               eos_token_id=tokenizer.eos_id)).save_pretrained(folder)
    return folder


# -- an entry point's main(argv) in this process ----------------------------------------------------


@dataclass
class Ran:
    """What an entry point did, in the shape of ``subprocess.run``'s result."""

    returncode: int
    stdout: str
    stderr: str


def run_main(main: Callable, argv: Sequence, env: dict | None = None) -> Ran:
    """Call an entry point's ``main(argv)`` in this process as a subprocess would run it: its exit
    status (what ``main`` returns, or the code of the ``SystemExit`` it raises), what it printed to
    stdout and stderr, and ``env`` set for the call only. No interpreter to start and nothing to
    import again: a usage error is read in milliseconds instead of the ~4 s a `python train/run.py`
    takes on the 2-core machine."""
    import pytest

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (env or {}).items():
            patch.setenv(name, str(value))
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as stop:
                code = stop.code
    return Ran(0 if code is None else code if isinstance(code, int) else 1, out.getvalue(), err.getvalue())
