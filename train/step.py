"""One optimizer step of ``train/run.py``, as an object a benchmark can call: the micro-batches'
forward and backward, the gradient clip, AdamW and the EMA, with the loss and the gradient norm
accumulated on the device (:class:`LogWindow`) and read only at a log line.

Host syncs. A step reads nothing from the device: no ``.item()``, no value checks (the batches are
the tokenizer's own ids, checked once on the first batch), no data-dependent shapes when
:func:`sedd.ops.sync_free` is on (on CUDA the loop turns it on: the absorbing fused head then runs
every row instead of gathering the MASK rows, whose count is a host read). So the host runs ahead
of the GPU by as many steps as the launch queue holds, and the loop waits only at a log line, an
evaluation or a checkpoint. A non-finite loss or gradient norm is recorded on the device with its
step and reported at the next read; the loop reads before every evaluation and checkpoint, so a
diverged state is never saved.

CUDA graphs (``cuda_graphs=True``, CUDA only, one process): after ``GRAPH_WARMUP`` ordinary steps
(which compile, autotune and create the optimizer state) the whole step is captured once and
replayed: the inputs are copied into static buffers, the step's seeds, learning rate and EMA
weight are written into device tensors before each replay (the generators are registered with
the graph, so a re-seeded generator draws as in an eager step).

Randomness: every draw of step ``s`` comes from generators seeded by (seed, s, micro-batch, rank)
(:func:`step_seed`), so a resumed run continues bit-identically.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist

from sedd import data as sdata
from sedd import ops

GRAPH_WARMUP = 3  # eager steps before the capture: lazy initialisation, compilation, optimizer state


def step_seed(seed: int, stream: int, rank: int, step: int, micro: int = 0) -> int:
    """A seed for one (step, micro-batch, rank): randomness that depends on nothing but these
    numbers is what makes a resumed run identical to an uninterrupted one."""
    return int(np.random.SeedSequence([seed, stream, rank, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def lr_at(step: int, cfg: dict) -> float:
    """Linear warmup, then constant: a pure function of the step, so the schedule has no state."""
    return cfg["lr"] * min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else cfg["lr"]


def ema_decay(step: int, decay: float) -> float:
    """The EMA decay of update ``step + 1``: ``decay``, ramped up as (1 + n)/(10 + n) over the
    first n updates (as the public SEDD code does), so a short run's EMA is not dominated by the
    initial weights (at a constant 0.9999 they would still weigh 37% after 10k steps)."""
    n = step + 1
    return min(decay, (1 + n) / (10 + n))


def doc_mask_kwargs(x0: torch.Tensor, cfg: dict, eos_id: int) -> dict:
    return {"segment_ids": sdata.segment_ids(x0, eos_id)} if cfg["doc_mask"] else {}


def make_optimizer(net: torch.nn.Module, cfg: dict, *, fused: bool, capturable: bool = False):
    """AdamW with the run's hyper-parameters: ``fused`` (one kernel over all parameters, CPU or
    CUDA; its step counters stay on the parameters' device, so a step reads none on the host);
    ``capturable``, its learning rate a device tensor, for a captured step."""
    lr = torch.tensor(cfg["lr"], device=next(net.parameters()).device) if capturable else cfg["lr"]
    return torch.optim.AdamW(net.parameters(), lr=lr, betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8,
                             weight_decay=cfg["weight_decay"], fused=fused, capturable=capturable)


class LogWindow:
    """The steps since the last log line, on the device: the loss summed (fp64), the last
    gradient norm, and the first non-finite step with its loss and norm. One host read per log
    line (:meth:`read`); ``saved`` is a checkpoint's window ({"loss", "steps"})."""

    def __init__(self, device: torch.device, saved: dict | None = None):
        saved = saved or {"loss": 0.0, "steps": 0}
        self.loss = torch.tensor(float(saved["loss"]), dtype=torch.float64, device=device)
        self.steps = int(saved["steps"])
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.step = torch.zeros((), dtype=torch.float64, device=device)  # the step being run, 1-based
        self.bad = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64, device=device)  # step, loss, norm

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Device work only (it is captured into a CUDA graph as is)."""
        loss, norm = loss.detach().double(), grad_norm.detach().double()
        self.loss += loss
        self.grad_norm.copy_(norm)
        first = (self.bad[0] < 0) & ~(torch.isfinite(loss) & torch.isfinite(norm))
        self.bad.copy_(torch.where(first, torch.stack([self.step, loss, norm]), self.bad))

    def read(self) -> dict:
        """The window's figures on the host (the one read): mean loss per step, last gradient
        norm, and ``bad`` = (step, loss, norm) of the first non-finite step or None."""
        loss, norm, bad_step, bad_loss, bad_norm = torch.cat(
            [self.loss.view(1), self.grad_norm.view(1), self.bad]).tolist()
        return {"loss": loss / max(self.steps, 1), "grad_norm": norm,
                "bad": (int(bad_step), bad_loss, bad_norm) if bad_step >= 0 else None}

    def state(self) -> dict:
        return {"loss": self.loss.item(), "steps": self.steps}

    def reset(self) -> None:
        self.loss.zero_()
        self.steps = 0


class TrainStep:
    """``step_fn(step, micro_batches)``: one optimizer step of the run on the given micro-batches
    ([batch_size, L] token ids each, on the host or the device), adding its loss and gradient norm
    to ``window``. ``model`` is what the forward goes through (compiled blocks, DDP); ``net`` the
    plain model whose parameters the optimizer, the clip and the EMA (``ema``: name -> tensor, in
    ``net.named_parameters()`` order) hold."""

    def __init__(self, model, net, objective, optimizer, ema: dict, cfg: dict, window: LogWindow, *,
                 device: torch.device, eos_id: int, rank: int = 0, world: int = 1, fsdp: bool = False,
                 cuda_graphs: bool = False):
        self.model, self.net, self.objective, self.optimizer, self.cfg = model, net, objective, optimizer, cfg
        self.window, self.device, self.eos_id, self.rank, self.world, self.fsdp = window, device, eos_id, rank, world, fsdp
        self.params = [p for _, p in net.named_parameters()]
        self.ema = list(ema.values())
        self.generators = [torch.Generator(device) for _ in range(cfg["grad_accum"])]
        self.cuda_graphs = cuda_graphs
        self.graph, self.eager_steps = None, 0
        if cuda_graphs:
            self.lr = optimizer.param_groups[0]["lr"]  # a device tensor (make_optimizer(capturable=True))
            self.ema_weight = torch.zeros((), device=device)
            self.inputs: list[torch.Tensor] | None = None

    def __call__(self, step: int, micro_batches: list[torch.Tensor]) -> None:
        self._seed(step)
        self.window.step.fill_(step + 1)  # a kernel with a scalar argument: no copy, no sync
        self.window.steps += 1
        if not self.cuda_graphs:
            batches = [x.to(self.device, non_blocking=True) for x in micro_batches]
            self._compute(batches, lr_at(step, self.cfg), 1 - ema_decay(step, self.cfg["ema"]))
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.lr.fill_(lr_at(step, self.cfg))
        self.ema_weight.fill_(1 - ema_decay(step, self.cfg["ema"]))
        if self.graph is None and self.eager_steps < GRAPH_WARMUP:
            self.eager_steps += 1
            self._compute([x.to(self.device, non_blocking=True) for x in micro_batches], self.lr,
                          [self.ema_weight] * len(self.ema))
            self.optimizer.zero_grad(set_to_none=True)  # the capture's backward then allocates .grad
            return
        if self.inputs is None:
            self.inputs = [torch.empty_like(x, device=self.device) for x in micro_batches]
        for buffer, x in zip(self.inputs, micro_batches):
            buffer.copy_(x, non_blocking=True)
        if self.graph is None:
            self._capture()
        self.graph.replay()

    def _seed(self, step: int) -> None:
        seed, rank = self.cfg["seed"], self.rank
        torch.manual_seed(step_seed(seed, 2, rank, step))  # dropout
        for micro, g in enumerate(self.generators):  # t and the forward noise
            g.manual_seed(step_seed(seed, 0, rank, step, micro))

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        for g in self.generators:  # re-seeded before each replay, as an eager step re-seeds them
            graph.register_generator_state(g)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            self._compute(self.inputs, self.lr, [self.ema_weight] * len(self.ema))
        self.graph = graph

    def _compute(self, batches: list[torch.Tensor], lr, ema_weight) -> None:
        """The step's device work: no host read (a captured graph holds exactly this)."""
        cfg, accum = self.cfg, len(batches)
        loss_sum = torch.zeros((), device=self.device)
        with ops.value_checks(False):  # the batches are the tokenizer's ids; no host read per step
            for micro, x0 in enumerate(batches):
                sync = micro == accum - 1  # gradients are averaged across ranks on the last micro-batch only
                if self.fsdp:
                    self.net.set_requires_gradient_sync(sync)
                elif self.world > 1:
                    self.model.require_backward_grad_sync = sync
                loss = self.objective.loss(self.model, x0, self.generators[micro], 1.0 / accum,
                                           **doc_mask_kwargs(x0, cfg, self.eos_id))
                loss.backward()
                loss_sum += loss.detach()
        if self.world > 1:  # a collective, not a host read: every rank logs (and stops on) the mean
            dist.all_reduce(loss_sum)
            loss_sum /= self.world
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg["grad_clip"] or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP
            grad_norm = grad_norm.full_tensor()
        for group in self.optimizer.param_groups:
            group["lr"] = lr  # a float, or the device tensor a captured step reads
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], ema_weight)
        self.window.add(loss_sum, grad_norm.to(self.device))


def loop_context(use_cuda: bool):
    """What the training loop runs under: the sync-free paths on CUDA (on the CPU a row count costs
    nothing to read, and the gathered MASK rows halve the head's work); ``SEDD_SYNC_FREE=1``
    turns them on anywhere."""
    return ops.sync_free(True) if use_cuda else contextlib.nullcontext()
