"""The kernels build for real GPUs, checked without one, under two Tritons.

The interpreter runs the kernels' Python semantics on CPU; it does not lower them. Here each
launcher is called as it is on a GPU (interpreter off), the launch it makes is recorded instead of
run, and exactly that kernel specialisation (argument types, tile sizes, warps) is compiled ahead of
time with Triton's bundled LLVM and ptxas for sm_90 (H100/H200) and sm_80 (A100). That catches
what the interpreter cannot: lowering errors and unsupported ops; on sm_90 it also holds every
launch to its register budget (a spill or a stack frame in a streaming loop costs bandwidth every
tile; more than 128 registers leaves one 256-thread program per SM).

Users get the Triton their torch pins, and the two differ a lot here: Triton 3.6 (torch 2.11, what
the GPU machines carry) assembles sm_90 with ptxas 12.8, Triton 3.9 with ptxas 13.4, and the same
kernel needed up to 2.2x the registers under 3.6. So each launch is compiled under the installed
Triton and under a second one installed beside it (``pip install --no-deps --target DIR
triton==3.6.0``, named by ``SEDD_SIDE_TRITON=DIR``; ``.ci/run`` does this). Without it the second
half skips locally and fails in CI (``CI`` set).

    python -m tests.test_kernels_gpu_build sm90 [--loops] [--table]   # (interpreter off) records
    PYTHONPATH=$SEDD_SIDE_TRITON:. python -m tests.test_kernels_gpu_build sm90 --table  # under 3.6
    # --loops adds SASS instructions per loop body; --table prints a table instead of JSON
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import sedd.kernels.sampling as sampling_kernels  # noqa: E402
import sedd.kernels.scale as scale_kernels  # noqa: E402
import sedd.kernels.score_entropy as score_entropy_kernels  # noqa: E402
import sedd.kernels.transitions as transition_kernels  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# slow: ~20 s of LLVM and ptxas per target and Triton on a fresh machine (the compiled kernels are
# cached in ~/.triton after a first run)
pytestmark = [pytest.mark.skipif(not (BIN / "ptxas").is_file(), reason="this Triton has no bundled ptxas"),
              pytest.mark.slow]

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32)}
_TYPES = {
    torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
    torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.uint8: "*u8",
}
V_ABSORB = 50258  # GPT-2 + MASK: the widths the kernels run at in training and sampling


class _Recorder:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **kw)`` records the call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((args, kw))


def _recorded(module, name, launch) -> list[tuple[tuple, dict]]:
    kernel = getattr(module, name)
    recorder = _Recorder(kernel)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, name, recorder)
        launch()
    assert recorder.calls, f"{module.__name__}: the launcher made no launch"
    return [(recorder.fn, args, kw) for args, kw in recorder.calls]


def _compile(fn, args, kw, target):
    options = {k: kw.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kw}
    # The specialisation Triton's launcher makes at run time: pointers (torch allocations) and
    # integers that are multiples of 16 are marked 16-divisible, integers equal to 1 become constants.
    signature, constexprs, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        if isinstance(value, torch.Tensor):
            signature[name], attrs[(i,)] = _TYPES[value.dtype], divisible
        elif isinstance(value, bool):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, int) and value == 1:
            signature[name], constexprs[(i,)] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = divisible
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: unexpected launch argument {value!r}")
    for name, value in kw.items():
        signature[name], constexprs[name] = "constexpr", value
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)


def _cuobjdump(compiled, flag: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        return subprocess.run([str(BIN / "cuobjdump"), flag, cubin], capture_output=True, text=True, check=True).stdout


def _resource_usage(compiled) -> str:
    (line,) = [line for line in _cuobjdump(compiled, "--dump-resource-usage").splitlines() if "REG:" in line]
    return line


def _loop_sizes(compiled) -> list[int]:
    """SASS instructions in each loop body (a backward branch to its head), per warp and iteration."""
    sizes = []
    for line in _cuobjdump(compiled, "-sass").splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/.*\bBRA\s+0x([0-9a-f]+)", line)
        if m and int(m.group(2), 16) < int(m.group(1), 16):
            sizes.append((int(m.group(1), 16) - int(m.group(2), 16)) // 16 + 1)
    return sizes


def _launches():
    """Every kernel specialisation the library launches on a GPU in training and sampling."""
    B, L = 1, 2
    z = torch.zeros(B, L, V_ABSORB, dtype=torch.bfloat16)
    zu = torch.zeros(B, L, V_ABSORB - 1, dtype=torch.bfloat16)
    x = torch.zeros(B, L, dtype=torch.int64)
    per_row = torch.ones(B)
    seed = torch.zeros(1, dtype=torch.int64)
    x0 = torch.zeros(4, 1024, dtype=torch.int64)  # enough positions for the full noising block
    launches = []
    for absorbing, scores in ((True, z), (False, zu)):
        common = dict(absorbing=absorbing, shift=per_row, weight=per_row)
        for kw in (
            dict(grad=torch.empty_like(scores), grad_scale=0.5),  # fused loss + gradient (sum/batchmean)
            dict(),  # loss only (no grad, or reduction "none" forward)
            dict(grad=torch.empty_like(scores), grad_output=torch.ones(B, L), compute_loss=False),  # backward
        ):
            launches += _recorded(score_entropy_kernels, "_score_entropy_kernel",
                                  lambda: score_entropy_kernels.score_entropy(scores, per_row, x, x, **common, **kw))
        # scores misaligned against a fresh gradient buffer: the unaligned-window fallback
        shifted = torch.zeros(scores.numel() + 1, dtype=scores.dtype)[1:].view(scores.shape)
        launches += _recorded(score_entropy_kernels, "_score_entropy_kernel",
                              lambda: score_entropy_kernels.score_entropy(shifted, per_row, x, x, **common,
                                                                          grad=torch.empty_like(scores)))
        launches += _recorded(transition_kernels, "_sample_transition_kernel",
                              lambda: transition_kernels.sample_transition(x0, per_row.expand(4), seed, absorbing=absorbing,
                                                                           N=V_ABSORB - 1))
        # the steps on GPT-2-wide rows (misaligned: 16-byte windows with each tile's last columns
        # after the loop) and on a view of rows padded to 64 (aligned, the model's padded head)
        padded = torch.zeros(B, L, 50304, dtype=torch.bfloat16)[..., :scores.shape[-1]]
        for rows in (scores, padded):
            for kind in ("euler", "analytic", "denoise"):
                launches += _recorded(sampling_kernels, "reverse_step_kernel",
                                      lambda: sampling_kernels.reverse_step(kind, rows, x, per_row, absorbing,
                                                                            V_ABSORB - 1, shift=per_row, seed=seed))
            # a top-p / top-k step (the truncated path of the same kernel)
            launches += _recorded(sampling_kernels, "reverse_step_kernel",
                                  lambda: sampling_kernels.reverse_step("analytic", rows, x, per_row, absorbing,
                                                                        V_ABSORB - 1, shift=per_row, seed=seed,
                                                                        truncation=torch.zeros(B, L, 2)))
            if absorbing:  # the denoise step with its statistics (first hitting's adaptive rules), plain and truncated
                for trunc in (None, torch.zeros(B, L, 2)):
                    launches += _recorded(sampling_kernels, "reverse_step_kernel",
                                          lambda: sampling_kernels.reverse_step("denoise", rows, x, per_row, True,
                                                                                V_ABSORB - 1, shift=per_row, seed=seed,
                                                                                truncation=trunc,
                                                                                stats=torch.zeros(B, L, 2)))
    # the backward of a scaled sum/batchmean loss (loss * c).backward(): grad *= c in place, for
    # each gradient dtype; B·L·V is not a multiple of 16, as at the GPT-2 widths
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        grad = torch.zeros(B, L, V_ABSORB, dtype=dtype)
        launches += _recorded(scale_kernels, "_scale_unless_one_kernel",
                              lambda: scale_kernels.scale_unless_one_(grad, torch.ones(1)))
    return launches


def build(target: str, loops: bool = False) -> list[dict]:
    """Compile every launch for ``target``; one record per kernel specialisation (with ``loops``,
    also the SASS instruction count of each loop body: the per-tile cost of the streaming loops)."""
    records = []
    for fn, args, kw in _launches():
        compiled = _compile(fn, args, dict(kw), TARGETS[target])
        record = {"kernel": fn.__name__, "constexprs": {k: v for k, v in kw.items() if k.isupper()},
                  "num_warps": kw.get("num_warps"), "usage": _resource_usage(compiled),
                  "dtype": _TYPES[args[0].dtype][1:]}
        if loops:
            record["loop_instructions"] = _loop_sizes(compiled)
        records.append(record)
    return records


# Register budgets on sm_90 (aligned windows; the unaligned fallback only must not spill). The
# score entropy runs 4 warps x 4096 columns, the fastest pair of the launch sweep on an H200
# (Triton 3.6: 154 registers absorbing, 168 uniform for loss + gradient); 192 keeps 2.6 programs
# of 4 warps per SM, and no spill.
SCORE_ENTROPY_BUDGET = {True: 192, False: 192}  # by ABSORB
OTHER_BUDGET = 128


def _budget(record) -> int | None:
    c = record["constexprs"]
    if record["kernel"] == "_score_entropy_kernel":
        return SCORE_ENTROPY_BUDGET[c["ABSORB"]] if c["ALIGN"] > 1 else None
    return OTHER_BUDGET


def _usage(record) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", record["usage"])}


def _side_triton() -> Path | None:
    side = os.environ.get("SEDD_SIDE_TRITON")
    return Path(side) if side and (Path(side) / "triton" / "__init__.py").is_file() else None


TRITONS = ["installed", "side"]


@pytest.mark.parametrize("which", TRITONS)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_gpu_launch_compiles_within_budget(target, which):
    # A fresh process: the kernels must be real JIT functions, and this session runs the interpreter.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    if which == "side":
        side = _side_triton()
        if side is None:
            reason = (f"no second Triton at SEDD_SIDE_TRITON={os.environ.get('SEDD_SIDE_TRITON')!r} "
                      "(pip install --no-deps --target DIR triton==3.6.0)")
            if os.environ.get("CI", "").lower() not in ("", "0", "false"):
                pytest.fail(reason)
            pytest.skip(reason)
        env["PYTHONPATH"] = os.pathsep.join([str(side), str(root)])
    proc = subprocess.run([sys.executable, "-m", "tests.test_kernels_gpu_build", target], env=env,
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    version, records = json.loads(proc.stdout.splitlines()[-1])
    if which == "side":
        assert version != triton.__version__, f"the side Triton is the installed one ({version})"
    # per graph: 4 losses, the noising, 2 layouts x 3 steps + truncated; absorbing denoise with its
    # statistics, 2 layouts x plain and truncated; 3 scales
    assert len(records) == 2 * (4 + 1 + 2 * (3 + 1)) + 2 * 2 + 3
    assert {r["kernel"] for r in records} == {"_score_entropy_kernel", "_sample_transition_kernel",
                                              "reverse_step_kernel", "_scale_unless_one_kernel"}
    if target == "sm90":  # the GPUs the benchmarks target; sm_80 spills 8 bytes in one per-row epilogue
        over = []
        for r in records:
            use, budget = _usage(r), _budget(r)
            if use["LOCAL"] or use["STACK"] or (budget is not None and use["REG"] > budget):
                over.append(f"{r['kernel']} {r['constexprs']}: {r['usage'].strip()} (budget {budget} registers)")
        assert not over, f"Triton {version}, over budget:\n" + "\n".join(over)


def _table(version: str, records: list[dict]) -> str:
    lines = [f"Triton {version}", f"{'kernel':<26} {'specialisation':<42} {'REG':>4} {'STACK':>5} {'LOCAL':>5}  loops"]
    for r in records:
        c = r["constexprs"]
        if r["kernel"] == "_score_entropy_kernel":
            spec = ("absorbing" if c["ABSORB"] else "uniform") + (" loss" if c["WRITE_LOSS"] else "") + \
                (" +grad" if c["WRITE_GRAD"] else "") + ("" if c["ALIGN"] > 1 else " unaligned")
        elif r["kernel"] == "reverse_step_kernel":
            spec = ("absorbing " if c["ABSORB"] else "uniform ") + ("euler", "analytic", "denoise")[c["KIND"]] + \
                (" top-p/top-k" if c["TRUNCATE"] else "") + \
                (" misaligned" if c["MISALIGNED"] else " unaligned" if c["ALIGN"] == 1 else "")
        elif r["kernel"] == "_scale_unless_one_kernel":
            spec = r["dtype"]
        else:
            spec = "absorbing" if c["ABSORB"] else "uniform"
        u = _usage(r)
        lines.append(f"{r['kernel']:<26} {spec:<42} {u['REG']:>4} {u['STACK']:>5} {u['LOCAL']:>5}  "
                     f"{r.get('loop_instructions', '')}")
    return "\n".join(lines)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") != "1", "run without the interpreter"
    out = build(sys.argv[1], loops="--loops" in sys.argv[2:])
    print(_table(triton.__version__, out) if "--table" in sys.argv[2:] else json.dumps([triton.__version__, out]))
