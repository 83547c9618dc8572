"""End-to-end throughput: one training step and a full sampling run, fused kernels against the
eager path of this library (which mirrors the public SEDD code: the loss and the reverse steps
materialise several [B, L, V] tensors).

MFU of the training step: tokens/s × FLOPs per token / the dense bf16 matmul rate measured in the
same run (``bf16_peak``). FLOPs per token = 6·N + 12·n_blocks·hidden·L: N counts the parameters
that take part in matrix products (all but the embedding table, which is a lookup; the output
layer counts), and 12·n_blocks·hidden·L is full (non-causal) attention's QKᵀ and AV, forward
and backward. Time is the median of the rounds (``benchmarks/common.py``).

On CUDA the shapes are SEDD-small's (768 hidden, 12 blocks, GPT-2 vocabulary, 1024 tokens):
training at batch 8 with bf16 autocast, sampling at batch 16 with 128 analytic steps on the fused
path and 32 steps on both paths (the eager sampler against the fused one at equal steps; at 128
steps the eager run alone takes longer than the device check can give it). On CPU the
same code runs a tiny model so the suite stays runnable anywhere (eager only: the Triton
interpreter is a correctness tool, not a fast path).

Fewer network evaluations (``benchmarks/results/nfe-*`` for quality): on a model of the same shapes
without time conditioning, the analytic sampler at T = L steps uncached and with ``cache=True`` (the
same tokens; ``same_tokens`` records whether they were, which on a GPU depends on the BLAS computing
a row alike in any batch), and first hitting with 1 and 8 tokens per evaluation (L and L/8
evaluations) and with the entropy bound (``benchmarks/results/adaptive-*`` for quality). These run
at batch 4: T = L uncached steps at batch 16 would outlast the stage. Each records its NFE and
tokens/s. The untrained model's every MASK position is close to uniform, H ≈ log V, so the bound
γ = 8·log V admits about 8 positions besides the event per evaluation: the adaptive sampler at
about fixed k = 8's NFE, which prices what the rule adds to an evaluation (the head at every MASK
row and the fused step with its statistics there, against the head at one row per sequence).

    python -m pytest benchmarks/bench_end_to_end.py --benchmark-only

Each case records tokens/s and the peak memory allocated in ``benchmark.extra_info``.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import common
from sedd import ops
from sedd.graph import Absorbing
from sedd.losses import score_entropy_loss
from sedd.model import SEDD
from sedd.noise import LogLinear
from sedd.sampling import sample

CUDA, DEVICE = common.CUDA, common.DEVICE
BACKENDS = ["triton", "torch"] if CUDA else ["torch"]

# Sampling cases (backend, steps, sampler, batch). Sampler: "analytic" on the σ-conditioned model;
# on the model without time conditioning "analytic-free" (uncached), "cached" (cache=True),
# "first_hitting-k" (k tokens per evaluation; steps unused) and "entropy_bound-g" (first hitting with
# entropy_bound = g nats).
if CUDA:
    CONFIG = SEDD.config_for("small")
    TRAIN_BATCH, SAMPLE_BATCH, LENGTH = 8, 16, 1024
    SAMPLING = [("triton", 128, "analytic", 16), ("triton", 32, "analytic", 16), ("torch", 32, "analytic", 16),
                ("triton", 1024, "analytic-free", 4), ("triton", 1024, "cached", 4),
                ("triton", 0, "first_hitting-1", 4), ("triton", 0, "first_hitting-8", 4),
                ("triton", 0, f"entropy_bound-{8 * math.log(CONFIG['tokens']):.1f}", 4)]
else:
    CONFIG = SEDD.config_for("cpu", tokens=255, hidden_size=64, cond_dim=32, n_blocks=1)
    TRAIN_BATCH, SAMPLE_BATCH, LENGTH = 2, 2, 32
    SAMPLING = [("torch", 4, "analytic", 2), ("torch", 32, "analytic-free", 2), ("torch", 32, "cached", 2),
                ("torch", 0, "first_hitting-8", 2), ("torch", 0, f"entropy_bound-{8 * math.log(CONFIG['tokens']):.1f}", 2)]


def _model(config):
    torch.manual_seed(0)
    net = SEDD(config).to(DEVICE)
    with torch.no_grad():  # non-zero output layer, so the scores are not all equal
        net.output_layer.linear.weight.normal_(0, 0.02)
    return net


@pytest.fixture(scope="module")
def model():
    return _model(CONFIG)


@pytest.fixture(scope="module")
def free_model():
    """The same shapes without time conditioning."""
    return _model({**CONFIG, "model": {**CONFIG["model"], "time_conditioning": False}})


_UNCACHED_TOKENS: dict[int, torch.Tensor] = {}  # steps -> tokens of the uncached run, to compare the cached one


def _per_second(benchmark, amount: int) -> float | None:
    """amount / median time of the benchmarked call; None under --benchmark-disable (no timings)."""
    stats = getattr(benchmark, "stats", None)
    return amount / stats.stats.median if stats is not None else None


def training_flops_per_token(net: SEDD, length: int) -> int:
    """6·N (matmul parameters) + 12·n_blocks·hidden·length (attention), forward + backward."""
    matmul_params = sum(p.numel() for name, p in net.named_parameters() if name != "vocab_embed.embedding")
    m = net.config["model"]
    return 6 * matmul_params + 12 * m["n_blocks"] * m["hidden_size"] * length


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step(benchmark, model, measure_peak, bf16_peak, backend):
    graph, noise = Absorbing(CONFIG["tokens"]), LogLinear()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randint(0, graph.N, (TRAIN_BATCH, LENGTH), device=DEVICE)

    def step():
        with ops.use_backend(backend):
            loss = score_entropy_loss(model, x0, graph, noise)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.sync()

    step()  # warm-up: kernels compile, allocator settles
    peak = measure_peak(step)
    benchmark.pedantic(step, rounds=5 if CUDA else 1, warmup_rounds=1 if CUDA else 0)
    tokens_per_s = _per_second(benchmark, TRAIN_BATCH * LENGTH)
    flops_per_token = training_flops_per_token(model, LENGTH)
    benchmark.extra_info.update(
        bench="training_step",
        device=common.device_name(),
        graph="absorb",
        mode="train step",
        shape=[TRAIN_BATCH, LENGTH, graph.dim],
        impl="eager" if backend == "torch" else backend,
        tokens_per_step=TRAIN_BATCH * LENGTH,
        tokens_per_s=tokens_per_s,
        flops_per_token=flops_per_token,
        bf16_peak_tflop_per_s=bf16_peak / 1e12,
        mfu=tokens_per_s * flops_per_token / bf16_peak if tokens_per_s else None,
        peak_memory_bytes=peak,
    )


@pytest.mark.parametrize("backend, steps, sampler, batch", SAMPLING,
                         ids=[f"{b}-{n}-{s}" if s != "analytic" else f"{b}-{n}" for b, n, s, _ in SAMPLING])
def test_sampling(benchmark, request, measure_peak, backend, steps, sampler, batch):
    graph, noise = Absorbing(CONFIG["tokens"]), LogLinear()
    net = request.getfixturevalue("model" if sampler == "analytic" else "free_model")
    net.eval()
    kwargs = dict(steps=max(steps, 1))
    if sampler == "cached":
        kwargs["cache"] = True
    elif sampler.startswith("first_hitting"):  # its own grid: no steps (the spec refuses them)
        kwargs = dict(predictor="first_hitting", tokens_per_step=int(sampler.split("-")[1]))
    elif sampler.startswith("entropy_bound"):
        kwargs = dict(predictor="first_hitting", entropy_bound=float(sampler.split("-")[1]))
    result = {}

    def run():
        with ops.use_backend(backend):
            result["x"], result["stats"] = sample(net, graph, noise, batch_size=batch, length=LENGTH, device=DEVICE,
                                                  generator=torch.Generator(DEVICE).manual_seed(0), return_stats=True,
                                                  **kwargs)
        common.sync()

    # the warm-up; on CUDA it is also the run whose peak memory is measured (a run takes seconds)
    peak = measure_peak(run)
    if not CUDA:
        run()
    rounds = 2 if CUDA and backend == "triton" and sampler == "analytic" else 1
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=0)
    if sampler == "analytic-free":
        _UNCACHED_TOKENS[steps] = result["x"].cpu()
    same = None
    if sampler == "cached" and steps in _UNCACHED_TOKENS:
        same = bool(torch.equal(result["x"].cpu(), _UNCACHED_TOKENS[steps]))
    stats = result["stats"]
    mode = f"sample {steps} steps" if sampler == "analytic" else (
        f"sample {sampler}" if steps == 0 else f"sample {steps} steps {sampler}")
    benchmark.extra_info.update(
        bench="sampling",
        device=common.device_name(),
        shape=[batch, LENGTH, graph.dim],
        graph="absorb",
        mode=mode,
        impl="eager" if backend == "torch" else backend,
        steps=steps,
        sampler=sampler,
        nfe_mean=stats.mean_nfe,
        forward_rows=stats.forward_rows,
        reused_rows=stats.reused_rows,
        same_tokens=same,
        tokens_per_s=_per_second(benchmark, batch * LENGTH),
        peak_memory_bytes=peak,
    )


@pytest.mark.parametrize("mc_samples", [8, 32])
def test_conditional_bound(benchmark, model, mc_samples):
    """What an lm-evaluation-harness ``loglikelihood`` request costs (``sedd.harness``; lm_eval
    itself is not needed here): the conditional bound of a short continuation after a context
    that fills the model's window, K draws of t, one request per call as the harness makes them
    (``batch_size`` 32 rows per model call)."""
    from sedd.likelihood import sequence_bounds

    graph, noise = Absorbing(CONFIG["tokens"]), LogLinear()
    model.eval()
    requests, continuation = (100, 16) if CUDA else (2, 4)
    x0 = torch.randint(0, graph.N, (requests, LENGTH), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    maskable = torch.zeros(1, LENGTH, dtype=torch.bool, device=DEVICE)
    maskable[:, -continuation:] = True

    def run():
        with torch.no_grad():
            for i in range(requests):
                sequence_bounds(model, x0[i : i + 1], graph, noise, num_samples=mc_samples, batch_size=32,
                                maskable=maskable, generator=torch.Generator(DEVICE).manual_seed(i))
        common.sync()

    run()  # warm-up
    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    benchmark.extra_info.update(
        bench="conditional_bound",
        device=common.device_name(),
        shape=[requests, LENGTH, graph.dim],
        graph="absorb",
        mode=f"harness loglikelihood K={mc_samples}",
        impl="default",
        continuation_tokens=continuation,
        requests=requests,
        seconds_per_100_requests=stats.stats.median * 100 / requests if stats is not None else None,
    )
