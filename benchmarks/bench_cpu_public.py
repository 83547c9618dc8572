"""CPU side by side: the library's eager path against the op sequences of the public SEDD code.

The "public" sequences below are written from docs/math.md in the way the
public code computes them (post-process the model output into ŝ, exponentiate the whole
[B, L, V] tensor, build the staggered score and the transition rows as [B, L, V] tensors, draw
with fp32 Gumbel noise over every column; the loss on the boolean-selected MASK rows in the
input's own dtype). Both sides use the same model, the same weights and the same inputs, in the
same process, on 2 threads.

Time: the median of ``--repeats`` runs of each case, the two implementations interleaved.
Peak memory: for each (case, implementation) a fresh subprocess builds the inputs, records its
resident set size (RSS, /proc/self/statm), runs the case once and reads its high-water mark
(VmHWM in /proc/self/status: per address space, so unlike ``ru_maxrss`` it does not inherit the
parent's peak across fork/exec); the reported number is that peak minus the RSS just before the run (MB), i.e. the
memory the case itself needed on top of its inputs and the model, as the OS saw it (torch's CPU
allocator returns large blocks to the OS, so transient [B, L, V] buffers show up).

    python benchmarks/bench_cpu_public.py                 # every case, prints a table
    python benchmarks/bench_cpu_public.py --case step --repeats 5
    python benchmarks/bench_cpu_public.py --json out.json
    python benchmarks/bench_cpu_public.py --keep-freed-memory   # glibc keeps freed memory (see below)

Ratios are library / public: below 1 is faster (time) or leaner (memory).

Where the time of a fresh [B, L, V] buffer goes depends on the machine: glibc hands a large
allocation to the kernel (mmap) and takes it back on free, so every temporary pays page faults
when it is first written, and on some virtual machines a fault costs several times the write
itself. That penalises the public sequence, which allocates many such temporaries. With
``--keep-freed-memory`` the benchmark re-runs itself with glibc told to keep freed memory in the
heap (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``), so a temporary costs only its
arithmetic and memory traffic: the library's least favourable setting. Report both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sedd import ops  # noqa: E402
from sedd.graph import Absorbing, Uniform  # noqa: E402
from sedd.losses import score_entropy_loss  # noqa: E402
from sedd.model import SEDD  # noqa: E402
from sedd.noise import Geometric, LogLinear  # noqa: E402
from sedd.sampling import sample  # noqa: E402

TOKENS = 50257  # GPT-2: V = 50258 absorbing, 50257 uniform
B, L = 4, 128
STEPS = 32
CASES = ("step", "sampling", "loss_absorb_bf16", "loss_uniform_fp32", "loss_uniform_bf16", "train_step", "model_fwd_bwd")


# ---------------------------------------------------------------------------------------------
# The public op sequences (from docs/math.md)
# ---------------------------------------------------------------------------------------------


def _esigm1(sigma):
    return torch.where(sigma < 0.5, torch.expm1(sigma), torch.exp(sigma) - 1)


def public_scores(model, x, sigma):
    """The model output post-processed into ŝ as a [B, L, V] tensor of the output's dtype."""
    z = model(x, sigma, raw=True)
    if model.absorb and model.scale_by_sigma:
        z = z - (_esigm1(sigma).log()[:, None, None] + math.log(z.shape[-1] - 1)).to(z.dtype)
    return torch.scatter(z, -1, x[..., None].long(), torch.zeros_like(z[..., :1]))


def public_loss_absorb(score, sigma, x, x0):
    mask_id = score.shape[-1] - 1
    rel = x == mask_id
    esigm1 = _esigm1(sigma[:, None])
    ratio = 1 / esigm1.expand_as(x)[rel]
    other = x0[rel]
    rows = score[rel]
    neg = ratio * torch.gather(rows, -1, other[..., None]).squeeze(-1)
    pos = rows[:, :-1].exp().sum(-1)
    const = ratio * (ratio.log() - 1)
    entropy = torch.zeros(*x.shape, dtype=score.dtype)
    entropy[rel] += (pos - neg + const).to(score.dtype)
    return entropy


def public_loss_uniform(score, sigma, x, x0):
    N = score.shape[-1]
    esigm1 = _esigm1(sigma[:, None])
    ratio = 1 - N / (esigm1 + N)
    s_x = torch.gather(score, -1, x[..., None]).squeeze(-1)
    pos = score.exp().mean(-1) - s_x.exp() / N
    neg0 = score.mean(-1) - s_x / N
    neg = torch.where(x == x0, ratio * neg0, torch.gather(score, -1, x0[..., None]).squeeze(-1) / esigm1 + neg0)
    const = torch.where(
        x == x0, (N - 1) / N * ratio * (ratio.log() - 1), ((-ratio.log() - 1) / ratio - (N - 2)) / N
    )
    return pos - neg + const


def public_staggered(score, dsigma, absorbing):
    d = dsigma[:, None, None]
    if absorbing:
        extra = (1 - d.exp()).squeeze(-1) * score[..., :-1].sum(-1)
        out = score * d.exp()
        out[..., -1] = score[..., -1] + extra
        return out
    return d.exp() * score + (1 - d.exp()) / score.shape[-1] * score.sum(-1, keepdim=True)


def public_transp(x, sigma, V, absorbing):
    s = sigma[:, None, None]
    if absorbing:
        edge = torch.exp(-s) * torch.nn.functional.one_hot(x, V)
        return edge + torch.where(x == V - 1, 1 - torch.exp(-sigma)[:, None], 0)[..., None]
    trans = torch.ones(*x.shape, V) * (1 - torch.exp(-s)) / V
    trans = trans.scatter(-1, x[..., None], torch.zeros_like(trans[..., :1]))
    return trans.scatter(-1, x[..., None], (torch.exp(-s) + (1 - torch.exp(-s)) / V).expand(*x.shape, 1))


def public_categorical(probs):
    gumbel_norm = 1e-10 - (torch.rand_like(probs) + 1e-10).log()
    return (probs / gumbel_norm).argmax(-1)


def public_analytic_step(score_fn, x, sigma, dsigma, absorbing):
    score = score_fn(x, sigma).float().exp()
    probs = public_staggered(score, dsigma, absorbing) * public_transp(x, dsigma, score.shape[-1], absorbing)
    return public_categorical(probs)


def public_sample(model, graph, noise, steps, eps=1e-5):
    absorbing = graph.absorbing
    x = graph.sample_limit((B, L))
    times = torch.linspace(1, eps, steps + 1)
    dt = (1 - eps) / steps
    with torch.no_grad():
        for i in range(steps):
            t = times[i].expand(B)
            sigma = noise.total(t).float()
            dsigma = (sigma - noise.total(t - dt)).float()
            x = public_analytic_step(lambda a, b: public_scores(model, a, b), x, sigma, dsigma, absorbing)
        sigma = noise.total(times[-1].expand(B)).float()
        score = public_scores(model, x, sigma).float().exp()
        probs = public_staggered(score, sigma, absorbing) * public_transp(x, sigma, score.shape[-1], absorbing)
        if absorbing:
            probs = probs[..., :-1]
        return public_categorical(probs)


# ---------------------------------------------------------------------------------------------
# The cases: each builds its inputs and returns {"library": fn, "public": fn}
# ---------------------------------------------------------------------------------------------


def _model(graph_name="absorb"):
    torch.manual_seed(0)
    cfg = SEDD.config_for("cpu", graph=graph_name, tokens=TOKENS, hidden_size=128, cond_dim=64, n_blocks=2,
                          n_heads=4, length=L, dropout=0.0)
    model = SEDD(cfg)
    with torch.no_grad():  # the output layer is zero-initialised: give it values
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("output_layer.linear"):
                p.normal_(0, 0.02)
    return model


def build(case: str):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, TOKENS, (B, L), generator=g)
    if case in ("train_step", "model_fwd_bwd"):
        model = _model()
        graph, noise = Absorbing(TOKENS), LogLinear()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
        t = torch.rand(B, generator=g) * 0.9 + 0.05
        sigma, dsigma = noise(t)
        x_t = graph.sample_transition(x0, sigma, generator=g)

        def lib_train():
            opt.zero_grad(set_to_none=True)
            score_entropy_loss(model, x0, graph, noise, t=t, generator=torch.Generator().manual_seed(2)).backward()
            opt.step()

        def pub_train():
            opt.zero_grad(set_to_none=True)
            xt = graph.sample_transition(x0, sigma, generator=torch.Generator().manual_seed(2))
            score = public_scores(model, xt, sigma)
            loss = (dsigma[:, None] * public_loss_absorb(score, sigma, xt, x0)).sum(-1).mean()
            loss.backward()
            opt.step()

        def lib_fwd_bwd():
            model.zero_grad(set_to_none=True)
            model(x_t, sigma).sum().backward()

        def pub_fwd_bwd():
            model.zero_grad(set_to_none=True)
            public_scores(model, x_t, sigma).sum().backward()

        if case == "train_step":
            return {"library": lib_train, "public": pub_train}
        return {"library": lib_fwd_bwd, "public": pub_fwd_bwd}

    if case == "sampling":
        model = _model().eval()
        graph, noise = Absorbing(TOKENS), LogLinear()
        return {
            "library": lambda: sample(model, graph, noise, batch_size=B, length=L, steps=STEPS,
                                      generator=torch.Generator().manual_seed(3)),
            "public": lambda: public_sample(model, graph, noise, STEPS),
        }

    if case == "step":
        graph = Absorbing(TOKENS)
        V = graph.dim
        z = torch.randn(B, L, V, generator=g)  # a raw model output
        x = torch.where(torch.rand(B, L, generator=g) < 0.5, torch.full_like(x0, graph.mask_id), x0)
        sigma = torch.full((B,), 2.0)
        dsigma = torch.full((B,), 0.05)
        shift = graph.score_shift(sigma)

        def pub_score(a, b):
            return torch.scatter(z + shift[:, None, None], -1, a[..., None], torch.zeros_like(z[..., :1]))

        return {
            "library": lambda: ops.analytic_step(z, x, dsigma, graph, torch.Generator().manual_seed(4), shift=shift),
            "public": lambda: public_analytic_step(pub_score, x, sigma, dsigma, True),
        }

    # the loss alone, forward + backward, on a score tensor as the model would hand it over
    graph_name, dtype = {"loss_absorb_bf16": ("absorb", torch.bfloat16), "loss_uniform_fp32": ("uniform", torch.float32),
                         "loss_uniform_bf16": ("uniform", torch.bfloat16)}[case]
    graph = Absorbing(TOKENS) if graph_name == "absorb" else Uniform(TOKENS)
    noise = LogLinear() if graph_name == "absorb" else Geometric()
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    sigma, dsigma = noise(t)
    x_t = graph.sample_transition(x0, sigma, generator=g)
    z = torch.randn(B, L, graph.dim, generator=g).to(dtype)
    shift = graph.score_shift(sigma)
    public_fn = public_loss_absorb if graph_name == "absorb" else public_loss_uniform

    def lib():
        leaf = z.detach().requires_grad_()
        with ops.value_checks(False):
            loss = ops.score_entropy(leaf * 1, sigma, x_t, x0, graph, shift=shift, weight=dsigma, reduction="batchmean")
        loss.backward()
        return leaf.grad

    def pub():
        leaf = z.detach().requires_grad_()
        score = torch.scatter(leaf + shift[:, None, None].to(dtype), -1, x_t[..., None], torch.zeros_like(leaf[..., :1]))
        (dsigma[:, None] * public_fn(score, sigma, x_t, x0)).sum(-1).mean().backward()
        return leaf.grad

    return {"library": lib, "public": pub}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


# glibc: serve every allocation from the heap and never give freed memory back to the kernel
_KEEP_FREED = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34), "MALLOC_TOP_PAD_": str(2**30)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_child(case: str, impl: str) -> None:
    """Runs in a fresh subprocess: prints the peak RSS growth (MB) of one run of (case, impl)."""
    fn = build(case)[impl]
    before = _rss_mb()
    fn()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # KiB -> MiB
    print(json.dumps({"peak_mb": peak - before}))


def measure_peak(case: str, impl: str, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--peak-child", case, impl, "--threads", str(threads)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def measure_time(case: str, repeats: int) -> dict[str, float]:
    fns = build(case)
    for fn in fns.values():  # warm-up: lazy imports, allocator
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=CASES, action="append", help="run only these cases (repeatable)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the per-case memory subprocesses")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="re-run with glibc keeping freed memory (no page faults for reused buffers)")
    p.add_argument("--peak-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.keep_freed_memory and os.environ.get("MALLOC_MMAP_THRESHOLD_") != _KEEP_FREED["MALLOC_MMAP_THRESHOLD_"]:
        argv = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, __file__, *argv], {**os.environ, **_KEEP_FREED})
    torch.set_num_threads(args.threads)
    if args.peak_child:
        peak_child(*args.peak_child)
        return
    rows = []
    regime = "glibc keeps freed memory" if args.keep_freed_memory else "default allocator"
    print(f"CPU, {args.threads} threads, torch {torch.__version__}, median of {args.repeats}, {regime}")
    print(f"{'case':<20} {'library s':>10} {'public s':>10} {'time ratio':>10} {'lib MB':>8} {'pub MB':>8} {'mem ratio':>9}")
    for case in args.case or CASES:
        t = measure_time(case, args.repeats)
        row = {"case": case, "library_s": t["library"], "public_s": t["public"], "time_ratio": t["library"] / t["public"]}
        if not args.no_memory:
            row["library_peak_mb"] = measure_peak(case, "library", args.threads)
            row["public_peak_mb"] = measure_peak(case, "public", args.threads)
            row["memory_ratio"] = row["library_peak_mb"] / max(row["public_peak_mb"], 1e-9)
        rows.append(row)
        mem = (f"{row['library_peak_mb']:>8.0f} {row['public_peak_mb']:>8.0f} {row['memory_ratio']:>9.2f}"
               if not args.no_memory else "")
        print(f"{case:<20} {row['library_s']:>10.4f} {row['public_s']:>10.4f} {row['time_ratio']:>10.2f} {mem}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "allocator": regime,
                                         "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
