"""Device check, stage "profile": where the time of a training step and of a sampling step goes.

    PYTHONPATH=. python3 -m benchmarks.profile_step

The end-to-end benchmarks give one number each (MFU, tokens/s); this prints, for one SEDD-small
training step (batch 8 × 1024, bf16 autocast, fused kernels) and one sampling step of the masked-
rows sampler (batch 16 × 1024, half the positions MASK), the operators that take the most device
time (``torch.profiler``, sorted by self device time), so the next speed-up starts from a
measurement. On CPU (the dry run) a tiny model, CPU time.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import common
from sedd import ops
from sedd.graph import Absorbing
from sedd.losses import score_entropy_loss
from sedd.model import SEDD
from sedd.noise import LogLinear
from sedd.sampling.predictors import AnalyticPredictor

CUDA, DEVICE = common.CUDA, common.DEVICE
if CUDA:
    CONFIG, TRAIN, SAMPLE, ROWS = SEDD.config_for("small"), (8, 1024), (16, 1024), 15
else:
    CONFIG = SEDD.config_for("cpu", tokens=255, hidden_size=64, cond_dim=32, n_blocks=1)
    TRAIN, SAMPLE, ROWS = (2, 32), (2, 32), 8


def _table(prof, title: str) -> None:
    key = "self_cuda_time_total" if CUDA else "self_cpu_time_total"
    print(f"== {title}")
    print(prof.key_averages().table(sort_by=key, row_limit=ROWS, max_name_column_width=60))


def main() -> None:
    torch.manual_seed(0)
    model = SEDD(CONFIG).to(DEVICE)
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.02)
    graph, noise = Absorbing(CONFIG["tokens"]), LogLinear()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randint(0, graph.N, TRAIN, device=DEVICE)

    def train_step():
        score_entropy_loss(model, x0, graph, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    for _ in range(2):  # compile the kernels, settle the allocator
        train_step()
    common.sync()
    with profile(activities=activities) as prof:
        train_step()
        common.sync()
    _table(prof, f"training step {list(TRAIN)}, backend {ops.last_backend()}")

    model.eval()
    x = torch.randint(0, graph.N, SAMPLE, device=DEVICE)
    x[torch.rand(SAMPLE, device=DEVICE) < 0.5] = graph.mask_id
    t = torch.full((SAMPLE[0],), 0.5, dtype=torch.float64, device=DEVICE)
    step = AnalyticPredictor()
    with torch.no_grad():
        for _ in range(2):
            step.update(model, x, t, 1 / 128, graph, noise)
        common.sync()
        with profile(activities=activities) as prof:
            step.update(model, x, t, 1 / 128, graph, noise)
            common.sync()
    _table(prof, f"analytic sampling step {list(SAMPLE)}, half MASK, backend {ops.last_backend()}")


if __name__ == "__main__":
    main()
