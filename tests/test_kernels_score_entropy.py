"""The fused score-entropy kernel (``sedd/kernels/score_entropy.py`` through ``sedd.ops`` on the
"triton" backend, run by Triton's interpreter on CPU) against the eager reference in fp64.

Tolerances: the kernel computes in fp32 (per-row constants in fp64); the oracle is
``reference.score_entropy`` on the same inputs in fp64, differentiated by autograd.
    loss (fp32 output for every input dtype): rtol 2e-5, atol 2e-5 · max|loss|
    gradient (in the input dtype):  fp32 rtol 2e-5 · bf16 rtol 1.6e-2 · fp16 rtol 2e-3,
                                    atol the same fraction of max|grad| (one ulp of the largest)
The gradient is compared with the fp64 oracle rounded to the input dtype (fp16 overflows to ±inf
identically on both sides at σ = 1e-5, where r = 1/E(σ) ≈ 1e5).
"""

import pytest
import torch

from sedd import ops
from sedd.graph import Absorbing, Uniform
from sedd.ops import reference
from tests.helpers import SIGMAS, compiled_score_entropy_matches_eager, score_entropy_case, small_model_config

GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _triton():
    with ops.use_backend("triton"):
        yield


def _oracle(z, sigma, x_t, x0, graph, shift, weight, reduction, grad_output=None):
    """fp64 loss and gradient w.r.t. z (the gradient rounded to z's dtype)."""
    zz = z.double().requires_grad_()
    loss = reference.score_entropy(
        zz, sigma.double(), x_t, x0, graph, None if shift is None else shift.double()
    )
    if weight is not None:
        loss = loss * weight.double().unsqueeze(-1)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "batchmean":
        loss = loss.sum() / z.shape[0]
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, zz, go)
    return loss.detach(), grad.to(z.dtype)


def _run(z, sigma, x_t, x0, graph, shift, weight, reduction, inplace=False, grad_output=None, block_v=None):
    leaf = z.clone().requires_grad_()
    zin = leaf * 1  # a non-leaf, as a model output is
    loss = ops.score_entropy(
        zin, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction=reduction, inplace_backward=inplace,
        block_v=block_v,
    )
    assert ops.last_backend() == "triton"
    go = torch.ones_like(loss) if grad_output is None else grad_output
    (grad,) = torch.autograd.grad(loss, zin, go)
    return loss.detach(), grad, zin


def _assert_loss(got, want):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5 * float(want.abs().max()) + 1e-6)


def _assert_grad(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol = GRAD_RTOL[got.dtype]
    finite = want.float().abs()[torch.isfinite(want.float())]
    atol = rtol * float(finite.max()) if finite.numel() else 0.0
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # fp16 grad at σ = 1e-5
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("graph", [Absorbing(36), Uniform(37)], ids=repr)
@pytest.mark.parametrize("raw", [True, False], ids=["raw+shift+weight", "post-processed"])
def test_matches_reference_odd_width_multiple_tiles(graph, dtype, reduction, raw):
    args = score_entropy_case(graph, dtype=dtype, raw=raw)
    go = torch.rand(len(SIGMAS), 4) if reduction == "none" else torch.tensor(0.75)
    # V = 37 in tiles of 16: three tiles, the last partial
    loss, grad, _ = _run(*args[:4], graph, *args[4:], reduction, grad_output=go, block_v=16)
    want_loss, want_grad = _oracle(*args[:4], graph, *args[4:], reduction, grad_output=go)
    _assert_loss(loss, want_loss)
    _assert_grad(grad, want_grad)
    # the x_t column (NaN in the buffer) and, for absorbing, the MASK column get zero gradient
    x_t = args[2]
    assert torch.all(grad.gather(-1, x_t.unsqueeze(-1)) == 0)
    if graph.absorbing:
        assert torch.all(grad[..., graph.mask_id] == 0)


@pytest.mark.parametrize("graph", [Absorbing(1), Uniform(2)], ids=repr)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_width_two(graph, reduction):
    args = score_entropy_case(graph, L=6, garbage=False)
    loss, grad, _ = _run(*args[:4], graph, *args[4:], reduction)
    want_loss, want_grad = _oracle(*args[:4], graph, *args[4:], reduction)
    _assert_loss(loss, want_loss)
    _assert_grad(grad, want_grad)


@pytest.mark.parametrize("graph", [Absorbing(50257), Uniform(50258)], ids=repr)
def test_gpt2_width_few_rows(graph):
    args = score_entropy_case(graph, L=2, sigmas=[1e-5, 0.7], masked=0.75, seed=1)
    loss, grad, _ = _run(*args[:4], graph, *args[4:], "sum")
    want_loss, want_grad = _oracle(*args[:4], graph, *args[4:], "sum")
    _assert_loss(loss, want_loss)
    _assert_grad(grad, want_grad)


def test_block_size_does_not_change_the_result():
    graph = Uniform(37)
    args = score_entropy_case(graph)
    loss_default, grad_default, _ = _run(*args[:4], graph, *args[4:], "none")
    loss_small, grad_small, _ = _run(*args[:4], graph, *args[4:], "none", block_v=8)
    torch.testing.assert_close(loss_small, loss_default, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad_small, grad_default, rtol=0, atol=0)


@pytest.mark.parametrize("offset", [1, 3, 6])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("graph", [Absorbing(36), Uniform(37)], ids=str)
def test_misaligned_scores(graph, dtype, reduction, inplace, offset):
    """Scores that start ``offset`` elements past a 16-byte boundary (a view into a larger buffer):
    the 16-byte windows shift with them, or (a fresh gradient buffer aligned differently) the
    kernel falls back to unaligned windows. Rows of V = 37 are misaligned by a different amount
    each; tiles of 16 give a head window, a whole window and a tail."""
    z, sigma, x_t, x0, shift, weight = score_entropy_case(graph, dtype=dtype)
    leaf = z.clone().requires_grad_()
    zin = torch.cat([torch.zeros(offset, dtype=dtype), leaf.reshape(-1)])[offset:].view(z.shape)
    assert zin.data_ptr() % 16 != 0
    _backward_matches_reference(zin, leaf, (z, sigma, x_t, x0, shift, weight), graph, reduction, inplace)


def _backward_matches_reference(zin, leaf, case, graph, reduction, inplace, grad_of=lambda g: g):
    """ops.score_entropy on ``zin`` (a view into ``leaf``'s graph) with block_v = 16, backward, and
    the loss and ``grad_of(leaf.grad)`` against the fp64 oracle of the contiguous ``case``."""
    z, sigma, x_t, x0, shift, weight = case
    loss = ops.score_entropy(zin, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction=reduction,
                             inplace_backward=inplace, block_v=16)
    go = torch.rand(loss.shape) if reduction == "none" else torch.tensor(1.0)
    loss.backward(go)
    want_loss, want_grad = _oracle(z, sigma, x_t, x0, graph, shift, weight, reduction, grad_output=go)
    _assert_loss(loss.detach(), want_loss)
    _assert_grad(grad_of(leaf.grad), want_grad)


@pytest.mark.parametrize("pad", [64, 3], ids=["padded-to-64", "padded-by-3"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("graph", [Absorbing(36), Uniform(37)], ids=str)
def test_padded_rows_are_read_in_place(monkeypatch, graph, dtype, reduction, inplace, pad):
    """A view [B, L, V] of rows padded to V_pad (row stride V_pad > V, as the model's padded head
    gives): the kernel reads it without a copy, never touches the padding (NaN there would show),
    gives the contiguous result, and lays a fresh gradient out as the scores (aligned alike)."""
    import sedd.kernels.score_entropy as kse

    z, sigma, x_t, x0, shift, weight = score_entropy_case(graph, dtype=dtype)
    B, L, V = z.shape
    width = -(-V // pad) * pad if pad == 64 else V + pad
    scratch = torch.full((B, L, width), float("nan"), dtype=dtype, requires_grad=True)
    zin = scratch * 1  # a non-leaf, as the model output is
    with torch.no_grad():
        zin[..., :V] = z
    view = zin[..., :V]
    seen = []
    real = kse.score_entropy
    monkeypatch.setattr(kse, "score_entropy", lambda s, *a, **k: seen.append((s.data_ptr(), s.stride(),
                        None if k.get("grad") is None else k["grad"].stride())) or real(s, *a, **k))
    _backward_matches_reference(view, scratch, (z, sigma, x_t, x0, shift, weight), graph, reduction, inplace,
                                grad_of=lambda g: g[..., :V].contiguous())
    assert (scratch.grad[..., V:] == 0).all()
    assert seen and all(ptr == view.data_ptr() and stride == view.stride() for ptr, stride, _ in seen)
    assert all(g is None or g == view.stride() for _, _, g in seen)  # the gradient padded alike
    if inplace:
        assert torch.isnan(zin[..., V:]).all()  # the padding of the buffer the gradient went into


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_token_dtypes(dtype):
    graph = Uniform(37)
    z, sigma, x_t, x0, shift, weight = score_entropy_case(graph)
    want_loss, want_grad = _oracle(z, sigma, x_t, x0, graph, shift, weight, "sum")
    loss, grad, _ = _run(z, sigma, x_t.to(dtype), x0.to(dtype), graph, shift, weight, "sum")
    _assert_loss(loss, want_loss)
    _assert_grad(grad, want_grad)


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_absorbing_all_masked_and_none_masked(reduction):
    graph = Absorbing(20)
    for masked in (1.0, 0.0):
        args = score_entropy_case(graph, masked=masked)
        loss, grad, _ = _run(*args[:4], graph, *args[4:], reduction)
        want_loss, want_grad = _oracle(*args[:4], graph, *args[4:], reduction)
        _assert_loss(loss, want_loss)
        _assert_grad(grad, want_grad)
        if masked == 0.0:
            assert torch.all(loss == 0) and torch.all(grad == 0)
        else:
            assert torch.all(loss > 0)


@pytest.mark.parametrize("graph", [Absorbing(20), Uniform(21)], ids=repr)
def test_uniform_stay_and_move_rows(graph):
    for masked in (0.0, 1.0):  # uniform: every token kept / every token redrawn
        args = score_entropy_case(graph, masked=masked, seed=3)
        loss, grad, _ = _run(*args[:4], graph, *args[4:], "none")
        want_loss, want_grad = _oracle(*args[:4], graph, *args[4:], "none")
        _assert_loss(loss, want_loss)
        _assert_grad(grad, want_grad)


def test_no_grad_and_non_differentiable_inputs_give_the_loss_only():
    graph = Absorbing(36)
    z, sigma, x_t, x0, shift, weight = score_entropy_case(graph)
    want, _ = _oracle(z, sigma, x_t, x0, graph, shift, weight, "batchmean")
    before = z.clone()
    with torch.no_grad():
        got = ops.score_entropy(z, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction="batchmean")
    _assert_loss(got, want)
    got = ops.score_entropy(z, sigma, x_t, x0, graph, shift=shift, weight=weight, reduction="batchmean",
                            inplace_backward=True)
    _assert_loss(got, want)
    assert torch.equal(z.nan_to_num(), before.nan_to_num())  # no gradient wanted: nothing overwritten


# ---------------------------------------------------------------------------------------------
# In-place backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("graph", [Absorbing(36), Uniform(37)], ids=repr)
def test_inplace_backward_reuses_the_buffer_and_gives_the_same_gradient(graph, dtype, reduction):
    args = score_entropy_case(graph, dtype=dtype)
    go = torch.rand(len(SIGMAS), 4) if reduction == "none" else torch.tensor(2.0)
    loss, grad, _ = _run(*args[:4], graph, *args[4:], reduction, grad_output=go)
    loss_ip, grad_ip, zin = _run(*args[:4], graph, *args[4:], reduction, inplace=True, grad_output=go)
    assert grad_ip.data_ptr() == zin.data_ptr()
    torch.testing.assert_close(loss_ip, loss, rtol=0, atol=0)
    torch.testing.assert_close(grad_ip, grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scale_kernel_multiplies_whole_and_partial_blocks_and_skips_one(dtype):
    # (loss * c).backward() of a fused sum/batchmean loss: grad *= c on the device, nothing when c == 1
    from sedd.kernels.scale import scale_unless_one_

    n = (1 << 16) + 123  # a whole block of the interpreter's launch and a partial one
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = x.clone()
    scale_unless_one_(y, torch.tensor([0.37]))
    if dtype == torch.float32:
        assert torch.equal(y, x * 0.37)
    else:  # the interpreter's cast to bf16 truncates where a GPU rounds to nearest: one bf16 ulp
        torch.testing.assert_close(y.float(), x.float() * 0.37, rtol=2**-7, atol=0)
    y = x.clone()
    scale_unless_one_(y, torch.tensor([1.0]))
    assert torch.equal(y, x)


def test_fused_backward_runs_once():
    graph = Absorbing(10)
    z, sigma, x_t, x0, shift, weight = score_entropy_case(graph, garbage=False)
    zin = z.clone().requires_grad_()
    loss = ops.score_entropy(zin, sigma, x_t, x0, graph, reduction="sum")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


# ---------------------------------------------------------------------------------------------
# Argument checks before launch
# ---------------------------------------------------------------------------------------------


def test_bad_input_raises_before_launch(monkeypatch):
    import sedd.kernels.score_entropy

    def boom(*a, **k):
        raise AssertionError("kernel launched")

    monkeypatch.setattr(sedd.kernels.score_entropy, "score_entropy", boom)
    graph = Absorbing(10)
    z, sigma, x_t, x0, _, _ = score_entropy_case(graph, garbage=False)
    with pytest.raises(TypeError, match="log_score"):
        ops.score_entropy(z.double(), sigma, x_t, x0, graph)
    bad = x_t.clone()
    bad[0, 0] = 11
    with pytest.raises(ValueError, match="x_t holds id 11"):
        ops.score_entropy(z, sigma, bad, x0, graph)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        ops.score_entropy(z, -sigma, x_t, x0, graph)
    with pytest.raises(ValueError, match="weight"):
        ops.score_entropy(z, sigma, x_t, x0, graph, weight=torch.ones(2))
    with pytest.raises(AssertionError, match="kernel launched"):  # the launcher is the one patched
        ops.score_entropy(z, sigma, x_t, x0, graph)


# ---------------------------------------------------------------------------------------------
# torch.library registration and torch.compile
# ---------------------------------------------------------------------------------------------


def test_custom_ops_are_registered_with_fake_impls():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in ("score_entropy_fwd", "score_entropy_fwd_grad", "score_entropy_fwd_grad_",
                 "score_entropy_bwd", "score_entropy_bwd_", "scale_grad_", "sample_transition", "reverse_step"):
        assert hasattr(torch.ops.sedd, name), name
    with FakeTensorMode():
        z = torch.empty(3, 5, 11, dtype=torch.bfloat16)
        sigma, x = torch.empty(3), torch.zeros(3, 5, dtype=torch.long)
        loss = torch.ops.sedd.score_entropy_fwd(z, sigma, x, x, None, sigma, True, 0)
        assert loss.shape == (3, 5) and loss.dtype == torch.float32
        loss, grad = torch.ops.sedd.score_entropy_fwd_grad(z, sigma, x, x, sigma, None, False, 0, 1.0)
        assert grad.shape == z.shape and grad.dtype == z.dtype and loss.shape == (3, 5)
        grad = torch.ops.sedd.score_entropy_bwd(torch.empty(3, 5), z, sigma, x, x, None, None, True, 0)
        assert grad.shape == z.shape and grad.dtype == z.dtype
        xt = torch.ops.sedd.sample_transition(x.int(), sigma, torch.zeros(1, dtype=torch.long), True, 10, 0)
        assert xt.shape == (3, 5) and xt.dtype == torch.int32
        nxt = torch.ops.sedd.reverse_step("analytic", z, x.int(), sigma, None, torch.zeros(1, dtype=torch.long), True, 10, 0)
        assert nxt.shape == (3, 5) and nxt.dtype == torch.int32


def test_opcheck_score_entropy_ops():
    graph = Uniform(13)
    z, sigma, x_t, x0, shift, weight = score_entropy_case(graph, L=2, sigmas=[0.3, 2.0], garbage=False)
    base = (sigma, x_t, x0, shift, weight, False)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.sedd.score_entropy_fwd, (z, *base, 0), test_utils=tests)
    torch.library.opcheck(torch.ops.sedd.score_entropy_fwd_grad, (z, *base, 0, 0.5), test_utils=tests)
    torch.library.opcheck(torch.ops.sedd.score_entropy_fwd_grad_, (z.clone(), *base, 0, 0.5), test_utils=tests)
    torch.library.opcheck(torch.ops.sedd.score_entropy_bwd, (torch.rand(2, 2), z, *base, 0), test_utils=tests)
    torch.library.opcheck(torch.ops.sedd.score_entropy_bwd_, (torch.rand(2, 2), z.clone(), *base, 0), test_utils=tests)


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_compile_fullgraph_cpu(monkeypatch, inplace):
    """The ops trace as opaque nodes through their fake impls (the interpreter never sees a fake
    tensor); backend aot_eager keeps this CPU test free of a C++ toolchain."""
    monkeypatch.setenv("SEDD_CHECK_VALUES", "0")  # the value checks need data (a graph break)
    torch._dynamo.reset()
    compiled_score_entropy_matches_eager("cpu", "aot_eager", inplace)


# ---------------------------------------------------------------------------------------------
# The training loss on the fused path (sedd.losses passes inplace_backward for a raw output)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph_name", ["absorb", "uniform"])
def test_training_loss_with_sedd_model_matches_eager(monkeypatch, graph_name):
    from sedd.graph import get_graph
    from sedd.losses import score_entropy_loss
    from sedd.model import SEDD
    from sedd.noise import Geometric, LogLinear

    graph = get_graph(graph_name, 31)
    noise = LogLinear() if graph.absorbing else Geometric()
    torch.manual_seed(0)
    model = SEDD(small_model_config(31, graph_name))
    with torch.no_grad():
        model.output_layer.linear.weight.normal_(0, 0.5)
    x0 = torch.randint(0, 31, (3, 8))
    # the same x_t on both backends (the Philox draw differs from torch's by design)
    monkeypatch.setattr(ops, "sample_transition", lambda x, s, g, gen=None: reference.sample_transition(x, s, g, gen))
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad()
        with ops.use_backend(backend):
            loss = score_entropy_loss(model, x0, graph, noise, generator=torch.Generator().manual_seed(5))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_t, grads_t), (loss_k, grads_k) = results
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-5)
    assert grads_t.keys() == grads_k.keys()
    for name in grads_t:
        scale = float(grads_t[name].abs().max())
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
@pytest.mark.parametrize("graph", [Absorbing(36), Uniform(37)], ids=repr)
def test_fused_gradient_overflows_only_where_the_score_does(graph, reduction):
    # One score of a row above log(fp32 max) ≈ 88.7, in the first of three tiles: e^{ŝ} is inf at
    # that entry and nowhere else, in eager and in the fused loss+gradient pass alike (the running
    # max of the row must not spread the overflow to the rest of the row).
    z, sigma, x_t, x0, shift, weight = score_entropy_case(graph, sigmas=[0.3, 0.7], garbage=False, raw=False, seed=3)
    x_t[0, 0] = graph.mask_id if graph.absorbing else 9
    x0[0, 0] = 7
    z[0, 0, 2] = 95.0
    _, grad, _ = _run(z, sigma, x_t, x0, graph, shift, weight, reduction, block_v=16)
    _, want = _oracle(z, sigma, x_t, x0, graph, shift, weight, reduction)
    assert torch.isinf(want[0, 0, 2]) and torch.isinf(grad[0, 0, 2])
    finite = torch.ones_like(grad, dtype=torch.bool)
    finite[0, 0, 2] = False
    assert torch.isfinite(grad[finite]).all()
    _assert_grad(torch.where(finite, grad, 0.0), torch.where(finite, want, 0.0))
