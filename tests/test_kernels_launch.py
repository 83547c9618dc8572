"""Every kernel launch runs on its tensors' CUDA device (``sedd/kernels/_launch.py``).

Triton launches on the current device and stream; tensors on another GPU then fault or run
unordered with their own stream. The guard itself is checked here with a stand-in for
``torch.cuda.device``; that every launch in ``sedd/kernels`` sits inside it is checked on the
source; the multi-GPU run is in ``tests/test_kernels_cuda.py``.
"""

import ast
from pathlib import Path

import torch

from sedd.kernels import _launch
from sedd.kernels._launch import on_device

KERNELS = Path(_launch.__file__).parent


class _FakeCudaDevice:
    log = []

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.log.append(("enter", self.device))

    def __exit__(self, *exc):
        self.log.append(("exit", self.device))


class _OnCuda1:
    device = torch.device("cuda", 1)


def test_guard_makes_the_tensors_cuda_device_current_and_leaves_cpu_alone(monkeypatch):
    monkeypatch.setattr(_FakeCudaDevice, "log", [])
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    with on_device(_OnCuda1()):
        assert _FakeCudaDevice.log == [("enter", torch.device("cuda", 1))]
    assert _FakeCudaDevice.log[-1] == ("exit", torch.device("cuda", 1))
    with on_device(torch.zeros(2)):
        pass
    assert len(_FakeCudaDevice.log) == 2  # a CPU tensor (the interpreter) switches nothing


def _launches_outside_the_guard(path: Path) -> tuple[list[str], int]:
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def guarded(node) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call) and isinstance(item.context_expr.func, ast.Name)
                and item.context_expr.func.id == "on_device" for item in node.items
            ):
                return True
        return False

    # a launch is a call of a subscript, kernel[grid](...)
    launches = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)]
    return [f"{path.name}:{n.lineno}" for n in launches if not guarded(n)], len(launches)


def test_every_kernel_launch_sits_inside_the_device_guard():
    total, outside = 0, []
    for path in sorted(KERNELS.glob("*.py")):
        bad, n = _launches_outside_the_guard(path)
        outside += bad
        total += n
    assert total >= 4, total  # score entropy, reverse step, noising, scale
    assert not outside, f"launches without `with on_device(...)`: {outside}"
