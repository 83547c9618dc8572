"""Device check, stages "train" and "sample": what users run, timed whole.

    PYTHONPATH=. python3 -m benchmarks.whole_model train      # train/run.py's own step (train/step.py)
    PYTHONPATH=. python3 -m benchmarks.whole_model sample     # the sampler, 16 × 1024 × 128 analytic steps

train: the step object ``train/run.py`` runs (:class:`train.step.TrainStep`: the micro-batch's
forward and backward through the fused head, clip, fused AdamW, EMA; sync-free on CUDA) at the
``small`` preset (SEDD-small, bf16 autocast, dropout 0.1) at its own micro-batch 64 × 1024 and at
8 × 1024, in three modes: ``eager`` (``--compile off``), ``compiled`` (the default on CUDA: the
blocks compiled regionally) and ``graphs`` (``--cuda-graphs``, on top of compiled). Per mode and
shape, after a warm-up (compilation, capture): ``ms`` per step, the median over rounds of a few
steps back to back (CUDA events: what the run's throughput is), with its min-max; tokens/s; MFU =
tokens/s × FLOPs per token / the bf16 matmul rate measured by stage 1 in the same run
(``device.json``; FLOPs per token = 6·N + 12·n_blocks·D·L, N the matmul parameters with the
head's V real rows, not its padding); ``host_ms``, the time the host takes to issue one step from
an idle queue; ``gpu_ms``, the GPU time of one step queued behind a sleep kernel, so that the
launches are ahead of the GPU (a step with more launches than the launch queue holds still shows
some of the host's pace).

sample: ``sample(...)`` of SEDD-small, 16 × 1024, 128 analytic steps plus the denoiser, in four
modes: ``today`` (the path before this work: eager blocks, an unpadded head, autocast casting the
weights at every forward; the masked-rows head and fused steps), ``eager`` (the aligned head, the
weights held in bf16 once), ``compiled`` (compiled
blocks) and ``graphs`` (compiled, ``cuda_graph=True``); tokens/s and ``x_today``, the speed-up
over ``today`` measured in the same run.

Each case is one JSON line in ``$SEDD_BENCH_RECORDS`` (the device check's ``bench.jsonl``), read by
``benchmarks/summarize.py`` into the summary JSON. ``--dry-run`` (the device check on CPU): a tiny
model and shapes, compile with ``--compile-backend`` (aot_eager: no C++ build), graphs recorded as
skipped: it checks the plumbing and measures nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks import common
from sedd.graph import Absorbing
from sedd.model import SEDD
from sedd.noise import LogLinear
from sedd.objectives import get_objective
from sedd.sampling import sample
from train.config import model_config, resolve_config
from train.step import LogWindow, TrainStep, loop_context, make_optimizer

CUDA, DEVICE = common.CUDA, common.DEVICE
GPT2_TOKENS = 50257
TINY = dict(hidden_size=64, cond_dim=32, n_blocks=2, n_heads=2)  # the dry run's model


def flops_per_token(net, length: int) -> int:
    """6·N + 12·n_blocks·hidden·length, N the parameters in matrix products (not the embedding
    lookup) in the public layout (the head's V rows: its padding computes nothing of the model)."""
    state = net.state_dict()
    matmul = sum(state[name].numel() for name, _ in net.named_parameters() if name != "vocab_embed.embedding")
    return 6 * matmul + 12 * len(net.blocks) * net.hidden_size * length


def bf16_peak(results: Path | None) -> tuple[float, str]:
    """The MFU denominator: stage 1's bf16 matmul rate of this run (``device.json``), else measured now."""
    device = results / "device.json" if results else None
    if device and device.is_file():
        return json.loads(device.read_text())["bf16_matmul_tflop_per_s"] * 1e12, "device.json"
    return common.matmul_peak(torch.bfloat16), "measured in this stage"


def record(records: Path | None, name: str, seconds: list[float] | None, info: dict) -> None:
    line = {"name": f"benchmarks/whole_model.py::{name}", "median_s": statistics.median(seconds) if seconds else None,
            "rounds": len(seconds or []), "extra_info": {"device": common.device_name(), **info}}
    if info.get("skipped"):
        print(f"{name}: skipped ({info['skipped']})", flush=True)
    if records is not None:
        with open(records, "a") as f:
            f.write(json.dumps(line) + "\n")


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _gpu_ms_behind_sleep(fn, host_ms: float) -> float | None:
    """GPU ms of ``fn`` queued behind a sleep kernel longer than its host time (CUDA only)."""
    if not CUDA:
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe = 10_000_000  # cycles: calibrate the sleep kernel against the events
    common.sync()
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    cycles_per_ms = probe / start.elapsed_time(end)
    common.sync()
    torch.cuda._sleep(int(2 * host_ms * cycles_per_ms) + probe)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


# -- train ------------------------------------------------------------------------------------


def train_case(B: int, L: int, mode: str, args, peak: float) -> tuple[dict, list[float]]:
    overrides = {"batch_size": B, "global_batch": B, "length": L, **({} if CUDA else TINY)}
    cfg = resolve_config(overrides, "small" if CUDA else "cpu", None, 1)
    config = model_config(cfg, GPT2_TOKENS if CUDA else 255, 1)
    objective = get_objective(cfg["objective"])(config, training=cfg)
    torch.manual_seed(0)
    net = objective.build(config, torch.bfloat16 if cfg["bf16"] else None).to(DEVICE)
    if mode in ("compiled", "graphs"):
        net.compile_blocks(**({"backend": args.compile_backend} if args.compile_backend else {}))
    optimizer = make_optimizer(net, cfg, fused=True, capturable=mode == "graphs")
    ema = {name: p.detach().clone() for name, p in net.named_parameters()}
    step_fn = TrainStep(net, net, objective, optimizer, ema, cfg, LogWindow(DEVICE), device=DEVICE, eos_id=0,
                        cuda_graphs=mode == "graphs")
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config["tokens"], (B, L), generator=gen) for _ in range(4)]
    if CUDA:
        batches = [x.pin_memory() for x in batches]
    n = 0

    def run(k: int) -> None:
        nonlocal n
        for _ in range(k):
            step_fn(n, [batches[n % len(batches)]])
            n += 1

    net.train()
    with loop_context(CUDA):
        started = time.perf_counter()
        run(args.warmup)
        common.sync()
        warmup_s = time.perf_counter() - started
        per_round = args.steps_per_round
        rounds = []
        for _ in range(args.rounds):
            common.sync()
            t0 = common.device_clock()
            run(per_round)
            rounds.append((common.device_clock() - t0) / per_round)
        common.sync()
        t0 = time.perf_counter()
        run(1)
        host_ms = (time.perf_counter() - t0) * 1e3
        common.sync()
        gpu_ms = _gpu_ms_behind_sleep(lambda: run(1), host_ms)
        window = step_fn.window.read()
    per_token = flops_per_token(net, L)
    median = statistics.median(rounds)
    info = dict(bench="train_step_run", path="run.py", shape=[B, L], mode=mode, ms=median * 1e3,
                min_ms=min(rounds) * 1e3, max_ms=max(rounds) * 1e3, tokens_per_s=B * L / median,
                mfu=B * L / median * per_token / peak if CUDA else None, host_ms=host_ms,
                gpu_ms=gpu_ms, flops_per_token=per_token, bf16_peak_tflop_per_s=peak / 1e12,
                warmup_steps=args.warmup, warmup_s=warmup_s, steps_per_round=per_round,
                finite=window["bad"] is None, sync_free=CUDA)
    return info, rounds


def train_stage(args) -> None:
    peak, source = bf16_peak(args.results)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for B, L in shapes:
        for mode in args.modes.split(","):
            name = f"train_step[{B}x{L}-{mode}]"
            if mode == "graphs" and not CUDA:
                record(args.records, name, None, dict(bench="train_step_run", path="run.py", shape=[B, L], mode=mode,
                                                      skipped="CUDA graphs need a CUDA device"))
                continue
            info, rounds = train_case(B, L, mode, args, peak)
            _free()  # the case's model, optimizer and graph pool
            info["bf16_peak_source"] = source
            record(args.records, name, rounds, info)
            mfu = f", MFU {info['mfu']:.1%}" if info["mfu"] is not None else ""
            print(f"train {B}x{L} {mode}: {info['ms']:.1f} ms/step [{info['min_ms']:.1f}-{info['max_ms']:.1f}], "
                  f"{info['tokens_per_s']:,.0f} tokens/s{mfu}, host {info['host_ms']:.1f} ms, "
                  f"gpu {info['gpu_ms'] if info['gpu_ms'] is None else round(info['gpu_ms'], 1)} ms", flush=True)


# -- sample -----------------------------------------------------------------------------------


def sample_stage(args) -> None:
    B, L = (int(v) for v in args.shape.split("x"))
    config = SEDD.config_for("small" if CUDA else "cpu", tokens=GPT2_TOKENS if CUDA else 255, length=L,
                             **({} if CUDA else TINY))
    torch.manual_seed(0)
    net = SEDD(config).to(DEVICE).eval()
    with torch.no_grad():  # a non-zero output layer, so the scores are not all equal
        net.output_layer.linear.weight.normal_(0, 0.02)
    # today's path: eager blocks, an unpadded head, autocast casting the weights at every forward
    today = SEDD(config, pad_head_to=1).to(DEVICE).eval()
    today.load_state_dict(net.state_dict())
    today.inference_weights = contextlib.nullcontext
    graph, noise = Absorbing(config["tokens"]), LogLinear()
    times = {}
    for mode in args.modes.split(","):
        name = f"sampling[{B}x{L}-{args.steps}-{mode}]"
        if mode == "graphs" and not CUDA:
            record(args.records, name, None, dict(bench="sampling_run", shape=[B, L], steps=args.steps, mode=mode,
                                                  skipped="CUDA graphs need a CUDA device"))
            continue
        if mode == "compiled" or (mode == "graphs" and not net.blocks_compiled):
            net.compile_blocks(**({"backend": args.compile_backend} if args.compile_backend else {}))
        model, out = today if mode == "today" else net, {}

        def run():
            out["x"] = sample(model, graph, noise, batch_size=B, length=L, steps=args.steps, device=DEVICE,
                              generator=torch.Generator(DEVICE).manual_seed(0), cuda_graph=mode == "graphs")
            common.sync()

        started = time.perf_counter()
        run()  # warm-up: compilation, capture
        warmup_s = time.perf_counter() - started
        rounds = []
        for _ in range(args.rounds):
            t0 = common.device_clock()
            run()
            rounds.append(common.device_clock() - t0)
        times[mode] = statistics.median(rounds)
        info = dict(bench="sampling_run", shape=[B, L], steps=args.steps, mode=mode, tokens_per_s=B * L / times[mode],
                    min_s=min(rounds), max_s=max(rounds), warmup_s=warmup_s,
                    x_today=times["today"] / times[mode] if "today" in times else None,
                    no_mask_left=bool((out["x"] < graph.mask_id).all()))
        record(args.records, name, rounds, info)
        x = f", {info['x_today']:.2f}x today" if info["x_today"] else ""
        print(f"sample {B}x{L} x {args.steps} steps {mode}: {info['tokens_per_s']:,.0f} tokens/s{x}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    train = sub.add_parser("train", help="train/run.py's step")
    train.add_argument("--shapes", default="64x1024,8x1024" if CUDA else "4x32,2x32")
    train.add_argument("--modes", default="eager,compiled,graphs")
    train.add_argument("--warmup", type=int, default=6 if CUDA else 2, help="steps before timing (graphs capture at 4)")
    train.add_argument("--rounds", type=int, default=5 if CUDA else 2)
    train.add_argument("--steps-per-round", type=int, default=3 if CUDA else 1)
    samp = sub.add_parser("sample", help="the sampler")
    samp.add_argument("--shape", default="16x1024" if CUDA else "2x32")
    samp.add_argument("--steps", type=int, default=128 if CUDA else 4)
    samp.add_argument("--modes", default="today,eager,compiled,graphs")
    samp.add_argument("--rounds", type=int, default=2 if CUDA else 1)
    for p in (train, samp):
        p.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor)")
        p.add_argument("--results", type=Path, default=Path(os.environ["RESULTS"]) if "RESULTS" in os.environ else None,
                       help="the device check's results (device.json: the bf16 peak of this run)")
        p.add_argument("--records", type=Path, default=os.environ.get("SEDD_BENCH_RECORDS"),
                       help="append one JSON line per case (default: $SEDD_BENCH_RECORDS)")
    args = parser.parse_args(argv)
    if CUDA:
        torch.backends.cuda.matmul.allow_tf32 = True  # as train/run.py sets them
        torch.backends.cudnn.allow_tf32 = True
    (train_stage if args.stage == "train" else sample_stage)(args)


if __name__ == "__main__":
    main()
