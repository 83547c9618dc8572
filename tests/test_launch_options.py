"""``sedd.ops.launch_options`` and ``sedd.ops.kernel_launch``: the public way to run a kernel with a
given launch configuration and to launch it apart from its op (the launch sweep and the device
check's kernel-vs-op stage use them; nothing outside ``sedd.ops`` imports ``sedd.kernels``)."""

import ast
from pathlib import Path

import pytest
import torch

import sedd.kernels.sampling as ks
import sedd.kernels.score_entropy as kse
from sedd import ops
from sedd.graph import Absorbing, Uniform

ROOT = Path(__file__).resolve().parent.parent


def _inputs(graph, B=2, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, L, graph.dim, generator=g)
    x0 = torch.randint(0, graph.N, (B, L), generator=g)
    x_t = x0.clone()
    x_t[:, ::2] = graph.mask_id if graph.absorbing else (x0[:, ::2] + 1) % graph.N
    return z, x_t, x0, torch.tensor([0.4, 1.3]), torch.tensor([0.2, -0.5])


@pytest.mark.parametrize("graph", [Absorbing(36), Uniform(37)], ids=repr)
def test_kernel_launch_gives_what_the_op_gives(graph):
    z, x_t, x0, sigma, shift = _inputs(graph)
    weight = torch.tensor([0.7, 1.1])
    with ops.use_backend("triton"):
        launch = ops.kernel_launch("score_entropy", z, sigma, x_t, x0, graph, shift=shift, weight=weight)
        torch.testing.assert_close(launch(), ops.score_entropy(z, sigma, x_t, x0, graph, shift=shift, weight=weight))
        # loss + gradient in one pass, into one buffer: twice the same
        fused = ops.kernel_launch("score_entropy", z, sigma, x_t, x0, graph, shift=shift, weight=weight, grad=True)
        torch.testing.assert_close(fused(), launch())
        for kind, args in (("euler", (sigma, 0.1)), ("analytic", (sigma,)), ("denoise", (sigma,))):
            step = ops.kernel_launch(f"{kind}_step", z, x_t, *args, graph, torch.Generator().manual_seed(3),
                                     shift=shift)
            want = getattr(ops, f"{kind}_step")(z, x_t, *args, graph, torch.Generator().manual_seed(3), shift=shift)
            assert torch.equal(step(), want) and torch.equal(step(), want)  # one seed: the same draw each launch


def test_launch_options_reach_the_launchers_and_a_calls_own_tile_wins(monkeypatch):
    graph = Absorbing(36)
    z, x_t, x0, sigma, shift = _inputs(graph)
    seen = []
    real_step, real_loss = ks.reverse_step, kse.score_entropy
    monkeypatch.setattr(ks, "reverse_step", lambda *a, **k: seen.append(("step", k)) or real_step(*a, **k))
    monkeypatch.setattr(kse, "score_entropy", lambda *a, **k: seen.append(("loss", k)) or real_loss(*a, **k))
    with ops.use_backend("triton"):
        with ops.launch_options(block_v=8, num_warps=2, num_stages=1):
            ops.analytic_step(z, x_t, sigma, graph, torch.Generator().manual_seed(0))
            ops.score_entropy(z, sigma, x_t, x0, graph)
            ops.analytic_step(z, x_t, sigma, graph, torch.Generator().manual_seed(0), block_v=16)
            launch = ops.kernel_launch("denoise_step", z, x_t, sigma, graph)
        launch()  # the options of the block it was made in
        ops.analytic_step(z, x_t, sigma, graph, torch.Generator().manual_seed(0))
    options = [(name, {k: k_v for k, k_v in kw.items() if k in ("block_v", "num_warps", "num_stages")}) for name, kw in seen]
    want = {"block_v": 8, "num_warps": 2, "num_stages": 1}
    assert options[:2] == [("step", want), ("loss", want)]
    assert options[2] == ("step", {**want, "block_v": 16})
    assert options[3] == ("step", want)
    assert options[4] == ("step", {"block_v": None})  # outside the block: the launcher's own choice


def test_bad_launch_options_and_kernel_launch_arguments_raise():
    graph = Absorbing(36)
    z, x_t, x0, sigma, _ = _inputs(graph)
    for bad in (dict(block_v=12), dict(block_v=1), dict(num_warps=0), dict(num_stages=True), dict(num_warps=2.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            with ops.launch_options(**bad):
                pass
    with ops.use_backend("triton"):
        with pytest.raises(ValueError, match="op must be one of"):
            ops.kernel_launch("sample_transition", x0, sigma, graph)
        with pytest.raises(ValueError, match="x_t"):  # checked as the op checks it
            ops.kernel_launch("analytic_step", z, x_t[:, :2], sigma, graph)
        with pytest.raises(ValueError, match="sigma"):
            ops.kernel_launch("score_entropy", z, -sigma, x_t, x0, graph)
    with ops.use_backend("torch"), pytest.raises(RuntimeError, match="Triton kernel"):
        ops.kernel_launch("analytic_step", z, x_t, sigma, graph)


def _imports_of_sedd_kernels(path: Path) -> list[int]:
    tree = ast.parse(path.read_text())
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("sedd.kernels"):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "sedd" and any(
                a.name == "kernels" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.Import) and any(a.name.startswith("sedd.kernels") for a in node.names):
            lines.append(node.lineno)
    return lines


def test_only_the_custom_ops_import_the_kernels():
    """ARCHITECTURE.md: sedd/ops/custom_ops.py is the one importer of sedd.kernels (tests aside);
    the benchmarks and the entry points reach the kernels through sedd.ops."""
    bad = []
    for room in ("sedd", "train", "benchmarks"):
        for path in sorted((ROOT / room).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("sedd/kernels/") or rel == "sedd/ops/custom_ops.py":
                continue
            bad += [f"{rel}:{line}" for line in _imports_of_sedd_kernels(path)]
    assert not bad, bad
    assert _imports_of_sedd_kernels(ROOT / "sedd" / "ops" / "custom_ops.py")
