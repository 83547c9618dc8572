"""What a training run keeps in --out, and how --resume reads it back.

    config.json, model.safetensors, tokenizer.json   the EMA model, loadable by SEDD.from_pretrained
    training_state.pt    raw and EMA weights, optimizer, step, RNG states, data position, metrics
    metrics.jsonl        one JSON object per logged step (and TensorBoard, when asked for)
    loss.png             train / validation loss curves

Every file is written with :func:`sedd.io.atomic_write`, training_state.pt last (the commit point),
so a crash or a kill never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sedd.io import TMP_GLOB, atomic_write

STATE_FORMAT = "sedd-train-v1"
STATE_FILE = "training_state.pt"


# -----------------------------------------------------------------------------------------------
# Tensors across processes (DDP replicas, FSDP shards)


def full_state(tensors: dict) -> dict:
    """name -> tensor with FSDP's DTensor shards gathered into full CPU tensors (a collective)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}


def like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as ``param`` (its shard, under FSDP), as a fresh copy. A tensor in the
    public checkpoint layout of a parameter padded in memory (the aligned head: fewer rows, the
    weights having been checked against the model's state dict) gets zero rows appended."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = padded_to(full, param.shape)
    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    return full.to(param.device, param.dtype, copy=True)


def padded_to(full: torch.Tensor, shape) -> torch.Tensor:
    """``full`` with zero rows appended up to ``shape``'s rows when only the rows differ (the public
    layout of the aligned head's padded parameters), else ``full`` itself."""
    if full.dim() and full.shape[0] < shape[0] and tuple(full.shape[1:]) == tuple(shape[1:]):
        return torch.cat([full, full.new_zeros((shape[0] - full.shape[0], *full.shape[1:]))])
    return full


class ReplicaMismatch(RuntimeError):
    """The DDP ranks hold different weights."""


def replica_checksum(state: dict, world: int, device: torch.device) -> float:
    """The sum of every weight, checked equal on all ``world`` DDP ranks (a collective; one scalar).
    DDP keeps the replicas equal by construction, and resume and the saved weights rest on it.
    Raises :class:`ReplicaMismatch` when they differ."""
    checksum = torch.tensor([sum(float(v.double().sum()) for v in state.values())], dtype=torch.float64,
                            device=device)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if any(s.item() != sums[0].item() for s in sums):
        raise ReplicaMismatch(f"the {world} ranks hold different weights: {[s.item() for s in sums]}")
    return sums[0].item()


# -----------------------------------------------------------------------------------------------
# Random number generators


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------------------------
# The checkpoint


def read_training_state(out: Path) -> dict:
    """OUT/training_state.pt. Raises FileNotFoundError when there is none, ValueError when it is
    corrupt or not a state of this script."""
    path = out / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        # weights_only: a checkpoint holds tensors and plain values, and loading one must not run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a training state of this script (format {STATE_FORMAT})")
    except Exception as e:  # torch raises many types for a truncated or garbled file
        raise ValueError(f"{path} is corrupt or unreadable ({type(e).__name__}: {e})") from e
    return state


def save_checkpoint(out: Path, *, net: torch.nn.Module, ema: dict, optimizer, step: int, cfg: dict,
                    config: dict, tokenizer, batches, metrics: list[dict], log_window: dict, master: bool,
                    ddp_world: int = 1, loss_label: str = "score entropy (nats per token)") -> float | None:
    """Save the run at ``step``. Every rank calls it: the weights are gathered first (a collective
    under FSDP) and, with ``ddp_world > 1`` DDP ranks, checked equal across them; then rank 0
    writes every file, training_state.pt last (the commit point). Returns the replica checksum
    under DDP, else None. Raises :class:`ReplicaMismatch` when the DDP ranks differ."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    raw, ema_full = full_state(net.state_dict()), full_state(ema)
    # the public layout: a parameter padded in memory (the aligned head) is saved at its state-dict rows
    ema_full = {k: v[: raw[k].shape[0]] if k in raw and v.dim() and v.shape != raw[k].shape else v
                for k, v in ema_full.items()}
    optim = get_optimizer_state_dict(net, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    checksum = None
    if ddp_world > 1:
        checksum = replica_checksum(raw, ddp_world, next(net.parameters()).device)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(out / "tokenizer.json")
        ema_model = {**raw, **ema_full}  # the buffers (rotary inv_freq) come from raw
        atomic_write(out / "model.safetensors",
                     lambda tmp: save_file({k: v.contiguous() for k, v in ema_model.items()}, str(tmp),
                                           metadata={"format": "pt"}))
        atomic_write(out / "config.json",
                     lambda tmp: tmp.write_text(json.dumps({**config, "step": step}, indent=2) + "\n"))
        training_state = {"format": STATE_FORMAT, "step": step, "cfg": cfg, "config": config, "model": raw,
                          "ema": ema_full, "optimizer": optim, "data": batches.state_dict(), "rng": rng_state(),
                          "metrics": metrics, "log_window": dict(log_window),
                          "threads": torch.get_num_threads()}
        atomic_write(out / STATE_FILE, lambda tmp: torch.save(training_state, tmp))  # the commit point
        plot_losses(metrics, out / "loss.png", loss_label)
    if dist.is_initialized():
        dist.barrier()
    return checksum


def plot_losses(metrics: list[dict], path: Path, label: str = "score entropy (nats per token)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, curve in (("loss", "train"), ("val_loss", "validation (EMA)")):
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "val_loss" else None, markersize=3, label=curve)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def resume_optimizer_and_ema(net: torch.nn.Module, optimizer, ema: dict, state: dict) -> None:
    """Load a training state's optimizer state and EMA into ``optimizer`` and ``ema`` (name ->
    tensor, filled in place). Moment buffers saved in the public layout of a parameter padded in
    memory (a run saved before the aligned head) are padded with zero rows, as the weights are."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    params = dict(net.named_parameters())
    optim = state["optimizer"]
    for name, moments in optim.get("state", {}).items():
        if name in params:
            for key, value in moments.items():
                if isinstance(value, torch.Tensor):
                    moments[key] = padded_to(value, params[name].shape)
    set_optimizer_state_dict(net, optimizer, optim_state_dict=optim, options=StateDictOptions(full_state_dict=True))
    for name, p in params.items():
        ema[name] = like(p, state["ema"][name])


def per_token_history(metrics: list[dict], length: int) -> list[dict]:
    """A saved metrics history in the log's units: entries written before the log gave nats per
    token (their ``loss`` and ``val_loss`` per block) are converted, the per-block values kept
    under ``*_per_sequence``."""
    out = []
    for m in metrics:
        m = dict(m)
        for key in ("loss", "val_loss"):
            if key in m and f"{key}_per_sequence" not in m:
                m[f"{key}_per_sequence"], m[key] = m[key], m[key] / length
        out.append(m)
    return out


# -----------------------------------------------------------------------------------------------
# The metrics log


class MetricsLog:
    """metrics.jsonl, one JSON object per logged step, and optionally TensorBoard (rank 0 writes).

    ``history`` is the list of entries the checkpoint saves. On start the file is rewritten from
    it, dropping lines a killed run wrote after its last checkpoint, and the temporary files such
    a run left behind are removed.
    """

    def __init__(self, out: Path, history: list[dict], *, master: bool, tensorboard: bool = False, step: int = 0):
        self.history, self.master = history, master
        self.file = self.writer = None
        if not master:
            return
        out.mkdir(parents=True, exist_ok=True)
        for leftover in out.glob(TMP_GLOB):
            leftover.unlink(missing_ok=True)
        atomic_write(out / "metrics.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(m) + "\n" for m in history)))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)
        self.file = open(out / "metrics.jsonl", "a")

    def record(self, entry: dict) -> None:
        self.history.append(entry)
        if not self.master:
            return
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in entry.items():
                if key != "step":
                    self.writer.add_scalar(key, value, entry["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
