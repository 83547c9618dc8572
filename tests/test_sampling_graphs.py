"""sample(..., cuda_graph=True): refused with a clear message where a captured forward cannot work
(on the CPU, with first hitting, with the cache); on CUDA the same tokens as the sync-free sampler
with the same generator, and the bf16 weights held once give the forward's numbers bit for bit
(those skipped on CPU, run by the device check's tests stage)."""

from __future__ import annotations

import pytest
import torch

from sedd import ops
from sedd.graph import Absorbing
from sedd.model import SEDD
from sedd.noise import LogLinear
from sedd.sampling import sample


def _model(device="cpu", time_conditioning=True):
    torch.manual_seed(0)
    config = SEDD.config_for("cpu", tokens=50, hidden_size=64, cond_dim=32, n_heads=2, n_blocks=2, length=16,
                             time_conditioning=time_conditioning)
    model = SEDD(config).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "output_layer.linear" in name:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("options, message", [
    ({"steps": 4}, "cuda_graph=True needs a CUDA device; this sampler runs on cpu"),
    ({"predictor": "first_hitting"}, "cuda_graph does not apply to first_hitting: it runs the network on sub-batches"),
    ({"steps": 4, "cache": "approximate"}, "cuda_graph cannot be combined with cache"),
])
def test_refused_where_a_captured_forward_cannot_work(options, message):
    with pytest.raises(ValueError, match=message):
        sample(_model(), Absorbing(50), LogLinear(), batch_size=2, length=16, cuda_graph=True, **options)


def needs_cuda(test):  # the device check's tests stage runs these (-m gpu)
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


@needs_cuda
@pytest.mark.parametrize("predictor", ["analytic", "euler"])
def test_graphed_sampler_draws_the_sync_free_samplers_tokens(predictor):
    model = _model("cuda")
    graph, noise = Absorbing(50), LogLinear()
    runs = []
    for graphed in (False, True):
        with ops.sync_free():
            runs.append(sample(model, graph, noise, batch_size=4, length=16, steps=8, predictor=predictor,
                               generator=torch.Generator("cuda").manual_seed(0), cuda_graph=graphed))
    assert torch.equal(runs[0], runs[1]) and int(runs[1].max()) < 50


@needs_cuda
def test_inference_weights_give_the_autocast_forward_bit_for_bit():
    model = _model("cuda")
    x = torch.randint(0, 51, (3, 16), device="cuda")
    sigma = torch.tensor([0.1, 1.0, 5.0], device="cuda")
    with torch.no_grad():
        want = model(x, sigma, raw=True)
        with model.inference_weights():
            assert model.blocks[0].attn_qkv.weight.dtype == torch.bfloat16
            got = model(x, sigma, raw=True)
    assert model.blocks[0].attn_qkv.weight.dtype == torch.float32  # put back
    assert torch.equal(got, want)
