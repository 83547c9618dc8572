"""End-to-end throughput: one training step and a full sampling run, fused kernels against the
eager path of this library (which mirrors the public SEDD code: the loss and the reverse steps
materialise several [B, L, V] tensors).

On CUDA the shapes are SEDD-small's (768 hidden, 12 blocks, GPT-2 vocabulary, 1024 tokens):
training at batch 8 with bf16 autocast, sampling at batch 16 with 128 analytic steps. On CPU the
same code runs a tiny model so the suite stays runnable anywhere (eager only: the Triton
interpreter is a correctness tool, not a fast path).

    python -m pytest benchmarks/bench_end_to_end.py --benchmark-only

Each case records tokens/s and the peak memory allocated in ``benchmark.extra_info``.
"""

from __future__ import annotations

import pytest
import torch

from sedd import ops
from sedd.graph import Absorbing
from sedd.losses import score_entropy_loss
from sedd.model import SEDD
from sedd.noise import LogLinear
from sedd.sampling import sample

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = ["triton", "torch"] if CUDA else ["torch"]

if CUDA:
    CONFIG = SEDD.config_for("small")
    TRAIN_BATCH, SAMPLE_BATCH, LENGTH, STEPS = 8, 16, 1024, 128
else:
    CONFIG = SEDD.config_for("cpu", tokens=255, hidden_size=64, cond_dim=32, n_blocks=1)
    TRAIN_BATCH, SAMPLE_BATCH, LENGTH, STEPS = 2, 2, 32, 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = SEDD(CONFIG).to(DEVICE)
    with torch.no_grad():  # non-zero output layer, so the scores are not all equal
        net.output_layer.linear.weight.normal_(0, 0.02)
    return net


def _per_second(benchmark, amount: int) -> float | None:
    """amount / mean time of the benchmarked call; None under --benchmark-disable (no timings)."""
    stats = getattr(benchmark, "stats", None)
    return amount / stats.stats.mean if stats is not None else None


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step(benchmark, model, measure_peak, backend):
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
        _sync()

    step()  # warm-up: kernels compile, allocator settles
    peak = measure_peak(step)
    benchmark.pedantic(step, rounds=5 if CUDA else 1, warmup_rounds=1 if CUDA else 0)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        graph="absorb",
        mode="train step",
        impl="eager" if backend == "torch" else backend,
        tokens_per_step=TRAIN_BATCH * LENGTH,
        tokens_per_s=_per_second(benchmark, TRAIN_BATCH * LENGTH),
        peak_memory_bytes=peak,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling(benchmark, model, measure_peak, backend):
    graph, noise = Absorbing(CONFIG["tokens"]), LogLinear()
    model.eval()

    def run():
        with ops.use_backend(backend):
            sample(model, graph, noise, batch_size=SAMPLE_BATCH, length=LENGTH, steps=STEPS, device=DEVICE,
                   generator=torch.Generator(DEVICE).manual_seed(0))
        _sync()

    run()
    peak = measure_peak(run)
    benchmark.pedantic(run, rounds=3 if CUDA else 1, warmup_rounds=0)
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        graph="absorb",
        mode=f"sample {STEPS} steps",
        impl="eager" if backend == "torch" else backend,
        steps=STEPS,
        tokens_per_s=_per_second(benchmark, SAMPLE_BATCH * LENGTH),
        peak_memory_bytes=peak,
    )
