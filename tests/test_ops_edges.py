"""sedd.ops at its edges: narrow token dtypes, double backward, in-place
gradients on leaves. Each case runs on both backends (Triton through its interpreter) where the
contract is shared."""

import pytest
import torch

from sedd import ops
from tests.helpers import reverse_step

BACKENDS = ["torch", "triton"]


# ---------------------------------------------------------------------------------------------
# Token dtypes: one contract for both backends
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_every_token_dtype_that_holds_the_ids_works_on_both_backends(backend, dtype):
    B, L, V = 2, 3, 200  # fits uint8 (ids ≤ 199)
    log_score = torch.randn(B, L, V)
    x0 = torch.randint(0, V - 1, (B, L)).to(dtype)
    x_t = x0.clone()
    x_t[:, 0] = V - 1
    sigma = torch.full((B,), 0.5)
    with ops.use_backend(backend):
        loss = ops.score_entropy(log_score, sigma, x_t, x0, "absorb")
        want = ops.score_entropy(log_score, sigma, x_t.long(), x0.long(), "absorb")
        torch.testing.assert_close(loss, want)
        for kind in ("euler", "analytic", "denoise"):
            out = reverse_step(kind, log_score, x_t, "absorb", torch.Generator().manual_seed(2))
            assert out.dtype == dtype
            ref = reverse_step(kind, log_score, x_t.long(), "absorb", torch.Generator().manual_seed(2))
            assert torch.equal(out.long(), ref)
        noisy = ops.sample_transition(x0, sigma, "absorb", dim=V)
        assert noisy.dtype == dtype


def test_id_checks_do_not_wrap_in_narrow_dtypes():
    """`x >= 300` on uint8 compares against 300 mod 256 = 44: id 50 was reported outside [0, 300)."""
    B, L, V = 1, 2, 256  # the largest width uint8 can hold
    log_score = torch.randn(B, L, V)
    x_t = torch.tensor([[50, 255]], dtype=torch.uint8)
    ops.analytic_step(log_score, x_t, torch.ones(1), "absorb")  # every id is valid: no error
    x0 = torch.tensor([[50, 254]], dtype=torch.uint8)
    ops.score_entropy(log_score, torch.ones(1), x_t, x0, "absorb")
    with pytest.raises(ValueError, match="x0 holds id 255 outside"):
        ops.score_entropy(log_score, torch.ones(1), x_t, torch.tensor([[50, 255]], dtype=torch.uint8), "absorb")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dtype_too_narrow_for_the_vocabulary_is_rejected_up_front(backend):
    B, L, V = 1, 2, 300
    log_score = torch.randn(B, L, V)
    x_t = torch.tensor([[50, 60]], dtype=torch.uint8)
    with ops.use_backend(backend), ops.value_checks(False):  # a dtype check: no sync, always on
        with pytest.raises(TypeError, match=r"x_t has dtype torch.uint8, which cannot hold every id in \[0, 300\)"):
            ops.analytic_step(log_score, x_t, torch.ones(1), "absorb")
        with pytest.raises(TypeError, match="x0 has dtype torch.uint8"):
            ops.score_entropy(log_score, torch.ones(1), x_t.long(), x_t, "absorb")
    with pytest.raises(TypeError, match="integer token ids"):
        ops.analytic_step(log_score, x_t.float(), torch.ones(1), "absorb")


# ---------------------------------------------------------------------------------------------
# Autograd edges
# ---------------------------------------------------------------------------------------------


def _loss_args(B=2, L=3, V=6):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(B, L, V, generator=g)
    x0 = torch.randint(0, V - 1, (B, L), generator=g)
    x_t = x0.clone()
    x_t[:, :2] = V - 1
    return z, torch.full((B,), 0.7), x_t, x0


@pytest.mark.parametrize("reduction", ["sum", "batchmean", "none"])
def test_create_graph_through_the_triton_loss_is_a_clear_error(reduction):
    z, sigma, x_t, x0 = _loss_args()
    leaf = z.clone().requires_grad_()
    with ops.use_backend("triton"):
        loss = ops.score_entropy(leaf * 1, sigma, x_t, x0, "absorb", reduction=reduction)
        loss = loss.sum() if reduction == "none" else loss
        with pytest.raises(RuntimeError, match="create_graph=True"):
            torch.autograd.grad(loss, leaf, create_graph=True)


def test_create_graph_works_on_the_eager_backend():
    z, sigma, x_t, x0 = _loss_args()
    leaf = z.clone().requires_grad_()
    with ops.use_backend("torch"):
        loss = ops.score_entropy(leaf, sigma, x_t, x0, "absorb", reduction="batchmean")
        (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
        (grad.square().sum()).backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_inplace_backward_refuses_a_leaf_that_requires_grad(backend, reduction):
    z, sigma, x_t, x0 = _loss_args()
    leaf = z.clone().requires_grad_()
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match="leaf tensor that requires grad"):
            ops.score_entropy(leaf, sigma, x_t, x0, "absorb", reduction=reduction, inplace_backward=True)
        assert torch.equal(leaf.detach(), z)  # untouched
        # a non-leaf (a model output) is fine, and so is a leaf that needs no gradient
        loss = ops.score_entropy(leaf * 1, sigma, x_t, x0, "absorb", reduction=reduction, inplace_backward=True)
        loss.sum().backward()
        ops.score_entropy(z.clone(), sigma, x_t, x0, "absorb", reduction=reduction, inplace_backward=True)
    assert torch.equal(leaf.detach(), z)
