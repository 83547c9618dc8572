"""The DDiT transformer (sedd.model): checkpoint layout, the output contract, attention with padding
and packed documents, checkpoint files and input checks. CPU, tiny shapes."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import sedd.model.attention as attention
from sedd import ops
from sedd.model import SEDD, apply_rotary, sigma_embedding

N_TOKENS, D, C, H, BLOCKS = 11, 32, 16, 4, 2
HEAD = D // H


def tiny_config(graph: str = "absorb", **model_overrides) -> dict:
    model = dict(hidden_size=D, cond_dim=C, length=16, n_blocks=BLOCKS, n_heads=H, scale_by_sigma=True, dropout=0.1)
    model.update(model_overrides)
    return {"tokens": N_TOKENS, "graph": {"type": graph}, "noise": {"type": "loglinear"}, "model": model}


def randomise(model: SEDD, seed: int = 1) -> SEDD:
    """Give the zero-initialised layers (and the unit norm scales) random values, so that every
    block, gate and the output layer actually shape the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or name.startswith("output_layer.linear"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_model(graph: str = "absorb", **model_overrides) -> SEDD:
    return randomise(SEDD(tiny_config(graph, **model_overrides)))


def inputs(model: SEDD, B: int = 3, L: int = 9):
    x = torch.randint(0, model.vocab_size, (B, L))
    sigma = torch.tensor([1e-3, 0.4, 3.0, 12.0][:B])
    return x, sigma


# ---------------------------------------------------------------------------------------------
# Independent float64 reference of the whole network, written from docs/math.md, "Network and checkpoint"
# ---------------------------------------------------------------------------------------------


def naive_attention(q, k, v, allowed=None):
    """q, k, v [B, L, H, d]; allowed [B, L, L] bool or None -> [B, L, H, d]."""
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)


def reference_raw(model: SEDD, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, L = x_t.shape

    def linear(h, name, bias=True):
        out = h @ sd[f"{name}.weight"].T
        return out + sd[f"{name}.bias"] if bias else out

    def layer_norm(h, w):
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-5) * w

    def gelu_tanh(h):
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))

    freqs = torch.exp(-math.log(1e4) * torch.arange(128, dtype=torch.float64) / 128)
    args = sigma.double()[:, None] * freqs
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    c = F.silu(linear(F.silu(linear(emb, "sigma_map.mlp.0")), "sigma_map.mlp.2"))

    theta = 10000.0 ** (-torch.arange(0, HEAD, 2, dtype=torch.float64) / HEAD)
    angle = torch.arange(L, dtype=torch.float64)[:, None] * theta  # [L, d/2]
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]

    def rotate(t):  # channel i pairs with i + d/2
        a, b = t[..., : HEAD // 2], t[..., HEAD // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    x = sd["vocab_embed.embedding"][x_t]
    for i in range(BLOCKS):
        p = f"blocks.{i}."
        mods = linear(c, p + "adaLN_modulation")[:, None]
        shift1, scale1, gate1, shift2, scale2, gate2 = mods.chunk(6, dim=-1)
        h = layer_norm(x, sd[p + "norm1.weight"]) * (1 + scale1) + shift1
        qkv = linear(h, p + "attn_qkv", bias=False).view(B, L, 3, H, HEAD)
        att = naive_attention(rotate(qkv[:, :, 0]), rotate(qkv[:, :, 1]), qkv[:, :, 2]).reshape(B, L, D)
        x = x + gate1 * linear(att, p + "attn_out", bias=False)
        h = layer_norm(x, sd[p + "norm2.weight"]) * (1 + scale2) + shift2
        x = x + gate2 * linear(gelu_tanh(linear(h, p + "mlp.0")), p + "mlp.2")
    shift, scale = linear(c, "output_layer.adaLN_modulation")[:, None].chunk(2, dim=-1)
    h = layer_norm(x, sd["output_layer.norm_final.weight"]) * (1 + scale) + shift
    return linear(h, "output_layer.linear")


def expected_shift(sigma: float, V: int) -> float:
    esigm1 = math.expm1(sigma) if sigma < 0.5 else math.exp(sigma) - 1
    return -math.log(esigm1) - math.log(V - 1)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_state_dict_keys_and_shapes(graph):
    V = N_TOKENS + 1 if graph == "absorb" else N_TOKENS
    expected = {
        "vocab_embed.embedding": [V, D],
        "sigma_map.mlp.0.weight": [C, 256],
        "sigma_map.mlp.0.bias": [C],
        "sigma_map.mlp.2.weight": [C, C],
        "sigma_map.mlp.2.bias": [C],
        "rotary_emb.inv_freq": [HEAD // 2],
        "output_layer.norm_final.weight": [D],
        "output_layer.adaLN_modulation.weight": [2 * D, C],
        "output_layer.adaLN_modulation.bias": [2 * D],
        "output_layer.linear.weight": [V, D],
        "output_layer.linear.bias": [V],
    }
    for i in range(BLOCKS):
        expected |= {
            f"blocks.{i}.norm1.weight": [D],
            f"blocks.{i}.norm2.weight": [D],
            f"blocks.{i}.attn_qkv.weight": [3 * D, D],
            f"blocks.{i}.attn_out.weight": [D, D],
            f"blocks.{i}.mlp.0.weight": [4 * D, D],
            f"blocks.{i}.mlp.0.bias": [4 * D],
            f"blocks.{i}.mlp.2.weight": [D, 4 * D],
            f"blocks.{i}.mlp.2.bias": [D],
            f"blocks.{i}.adaLN_modulation.weight": [6 * D, C],
            f"blocks.{i}.adaLN_modulation.bias": [6 * D],
        }
    model = SEDD(tiny_config(graph))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert model.vocab_size == V and model.mask_id == (V - 1 if graph == "absorb" else None)
    # adaLN-Zero and the zero output layer: a fresh network outputs z = 0
    x, sigma = inputs(model)
    assert torch.equal(model(x, sigma, raw=True), torch.zeros(3, 9, V))


def test_presets_build_the_published_sizes():
    with torch.device("meta"):
        small = SEDD(SEDD.config_for("small"))
        medium = SEDD(SEDD.config_for("medium"))
    assert (small.hidden_size, small.n_heads, len(small.blocks), small.length) == (768, 12, 12, 1024)
    assert (medium.hidden_size, medium.n_heads, len(medium.blocks)) == (1024, 16, 24)
    assert small.vocab_size == 50258 and small.blocks[0].dropout == 0.1
    non_embedding = sum(p.numel() for n, p in small.named_parameters() if "vocab_embed" not in n and "output_layer.linear" not in n)
    assert 85e6 < non_embedding < 95e6  # "SEDD small": ~90M non-embedding parameters
    uniform = SEDD.config_for("cpu", graph="uniform", tokens=7, n_blocks=1)
    assert uniform["graph"]["type"] == "uniform" and uniform["model"]["n_blocks"] == 1
    assert uniform["noise"] == {"type": "geometric"} and uniform["model"]["scale_by_sigma"] is False
    noise = {"type": "loglinear", "eps": 1e-3}
    assert SEDD.config_for("cpu", noise=noise)["noise"] == noise
    with pytest.raises(ValueError, match="preset"):
        SEDD.config_for("huge")


# ---------------------------------------------------------------------------------------------
# Output contract
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("graph", ["absorb", "uniform"])
def test_log_score_is_raw_plus_shift_with_zero_at_x_t(graph):
    model = make_model(graph)
    x, sigma = inputs(model, B=4)
    log_score = model(x, sigma)
    raw = model(x, sigma, raw=True)
    V = model.vocab_size
    assert log_score.shape == (4, 9, V) and log_score.dtype == torch.float32
    assert raw.shape == (4, 9, V) and raw.dtype == torch.float32  # the CPU compute dtype

    shift = model.score_shift(sigma)
    assert shift.shape == (4,) and shift.dtype == torch.float32
    want = [expected_shift(s, V) if graph == "absorb" else 0.0 for s in sigma.tolist()]
    torch.testing.assert_close(shift, torch.tensor(want), rtol=1e-6, atol=1e-6)
    assert torch.equal(model.score_shift(sigma[:, None]), shift)  # [B, 1] accepted

    expected = raw + shift[:, None, None]
    expected.scatter_(-1, x[..., None], 0.0)
    torch.testing.assert_close(log_score, expected, rtol=0, atol=0)
    assert torch.all(log_score.gather(-1, x[..., None]) == 0)
    assert torch.equal(model.postprocess(raw, x, sigma), log_score)


def test_shift_is_zero_for_absorbing_without_scale_by_sigma():
    model = make_model("absorb", scale_by_sigma=False)
    x, sigma = inputs(model)
    assert torch.equal(model.score_shift(sigma), torch.zeros(3))
    expected = model(x, sigma, raw=True).scatter(-1, x[..., None], 0.0)
    assert torch.equal(model(x, sigma), expected)


def test_network_matches_float64_reference():
    model = make_model()
    x, sigma = inputs(model, B=3, L=10)
    torch.testing.assert_close(model(x, sigma, raw=True).double(), reference_raw(model, x, sigma), rtol=1e-4, atol=1e-4)


def test_dropout_only_in_training_and_gradients_flow():
    model = make_model()
    x, sigma = inputs(model)
    assert torch.equal(model(x, sigma), model(x, sigma))  # eval: deterministic
    model.train()
    out = model(x, sigma)
    assert not torch.equal(out, model(x, sigma))
    out.exp().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bf16_parameters_still_give_fp32_scores():
    model = make_model()
    x, sigma = inputs(model)
    ref = model(x, sigma)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    out = model16(x, sigma)
    assert out.dtype == torch.float32 and model16.compute_dtype("cpu") == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.15)


# ---------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------


def test_sigma_embedding_formula():
    sigma = torch.tensor([1e-4, 0.37, 20.0])
    emb = sigma_embedding(sigma)
    assert emb.shape == (3, 256) and emb.dtype == torch.float32
    for b, s in enumerate(sigma.tolist()):
        for k in (0, 1, 17, 127):
            f = math.exp(-math.log(1e4) * k / 128)
            assert emb[b, k].item() == pytest.approx(math.cos(s * f), abs=2e-6)
            assert emb[b, 128 + k].item() == pytest.approx(math.sin(s * f), abs=2e-6)
    model = make_model()
    torch.testing.assert_close(model.sigma_map(sigma), model.sigma_map.mlp(emb))


def test_rotary_formula():
    model = make_model()
    inv_freq = model.rotary_emb.inv_freq
    torch.testing.assert_close(inv_freq, 10000.0 ** (-torch.arange(0, HEAD, 2).float() / HEAD))
    L = 40
    cos, sin = model.rotary_emb(L, torch.device("cpu"))
    assert cos.shape == sin.shape == (L, HEAD)
    x = torch.randn(2, L, 3, HEAD, dtype=torch.float32)
    out = apply_rotary(x, cos, sin)
    half = HEAD // 2
    for pos in (0, 1, 7, 39):
        for i in range(half):
            a = pos * 10000.0 ** (-2 * i / HEAD)
            x1, x2 = x[:, pos, :, i], x[:, pos, :, i + half]
            torch.testing.assert_close(out[:, pos, :, i], x1 * math.cos(a) - x2 * math.sin(a), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[:, pos, :, i + half], x2 * math.cos(a) + x1 * math.sin(a), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Attention: SDPA, padding, packed documents, the flash plumbing
# ---------------------------------------------------------------------------------------------


def test_sdpa_attention_matches_naive_with_masks():
    B, L = 2, 7
    qkv = torch.randn(B, L, 3, H, HEAD)
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [5, 5, 2, 2, 2, 5, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    model = make_model()
    cases = [(None, None), (mask, None), (None, segment_ids), (mask, segment_ids)]
    for attention_mask, seg in cases:
        plan = attention.plan_attention(model.resolved_attn_backend(qkv.device), B, L, qkv.device, attention_mask, seg)
        assert plan.backend == "sdpa"
        out = attention.attention(qkv, plan)
        allowed = torch.ones(B, L, L, dtype=torch.bool)
        if seg is not None:
            docs = attention.document_ids(seg)
            allowed &= docs[:, :, None] == docs[:, None, :]
        if attention_mask is not None:
            allowed &= attention_mask[:, None, :]
        ref = naive_attention(*qkv.unbind(2), allowed=allowed | torch.eye(L, dtype=torch.bool))
        real = attention_mask if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
        torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def _padded_batch(model):
    lengths, L = [5, 8, 3], 8
    seqs = [torch.randint(0, model.vocab_size, (n,)) for n in lengths]
    sigma = torch.tensor([0.05, 1.0, 7.0])
    x = torch.randint(0, model.vocab_size, (3, L))  # padding holds arbitrary valid ids
    mask = torch.zeros(3, L, dtype=torch.bool)
    x[0, :5], mask[0, :5] = seqs[0], True  # right padding
    x[1], mask[1] = seqs[1], True
    x[2, 5:], mask[2, 5:] = seqs[2], True  # left padding
    return seqs, sigma, x, mask


def test_padded_batch_matches_each_sequence_alone():
    model = make_model()
    seqs, sigma, x, mask = _padded_batch(model)
    out = model(x, sigma, attention_mask=mask)
    for b, seq in enumerate(seqs):
        alone = model(seq[None], sigma[b : b + 1])[0]
        torch.testing.assert_close(out[b][mask[b]], alone, atol=1e-5, rtol=1e-5)
    # integer 0/1 masks mean the same
    torch.testing.assert_close(model(x, sigma, attention_mask=mask.long())[mask], out[mask])


def test_packed_documents_match_each_document_alone():
    model = make_model("uniform")
    L = 12
    segment_ids = torch.tensor([[0] * 3 + [1] * 5 + [2] * 4, [4] * 4 + [9] * 4 + [4] * 4])  # 4 recurs: new document
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, 10:] = False  # the last document of row 1 is half padding
    x = torch.randint(0, model.vocab_size, (2, L))
    sigma = torch.tensor([0.3, 4.0])
    out = model(x, sigma, segment_ids=segment_ids, attention_mask=mask)
    docs = {0: [(0, 3), (3, 8), (8, 12)], 1: [(0, 4), (4, 8), (8, 10)]}
    for b, spans in docs.items():
        for lo, hi in spans:
            alone = model(x[b : b + 1, lo:hi], sigma[b : b + 1])[0]
            torch.testing.assert_close(out[b, lo:hi], alone, atol=1e-5, rtol=1e-5)


def _fake_flash_varlen(qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale=None, causal=False):
    """flash_attn_varlen_qkvpacked_func's contract, naively, on any device."""
    assert qkv.dim() == 4 and cu_seqlens.dtype == torch.int32 and dropout_p == 0.0 and not causal
    out = torch.empty_like(qkv[:, 0])
    bounds = cu_seqlens.tolist()
    assert max_seqlen == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[None] for t in qkv[lo:hi].unbind(1))
        out[lo:hi] = naive_attention(q, k, v)[0]
    return out


def test_flash_plumbing_with_a_fake_kernel(monkeypatch):
    """The unpadding, cu_seqlens and scatter-back of the flash path, run on CPU through a naive
    stand-in for flash-attn's kernel (the real kernel needs a GPU)."""
    monkeypatch.setattr(attention, "flash_attn_varlen_qkvpacked_func", _fake_flash_varlen)
    model = make_model()
    seqs, sigma, x, mask = _padded_batch(model)
    segment_ids = torch.tensor([[0] * 8, [0] * 3 + [1] * 5, [0] * 6 + [1] * 2])
    sdpa = [model(x, sigma), model(x, sigma, attention_mask=mask), model(x, sigma, attention_mask=mask, segment_ids=segment_ids)]
    monkeypatch.setattr(model, "resolved_attn_backend", lambda device: "flash")
    plan = attention.plan_attention("flash", 3, 8, x.device, mask, segment_ids)
    assert plan.cu_seqlens.tolist() == [0, 5, 8, 13, 14, 16] and plan.max_seqlen == 5
    flash = [model(x, sigma), model(x, sigma, attention_mask=mask), model(x, sigma, attention_mask=mask, segment_ids=segment_ids)]
    torch.testing.assert_close(flash[0], sdpa[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(flash[1:], sdpa[1:]):
        torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)


def test_auto_backend_takes_sdpa_for_masks_where_no_host_sync_is_allowed(monkeypatch):
    """flash-attn's varlen call needs the document lengths on the host: under ops.sync_free (and
    CUDA graph capture, torch.compile) "auto" runs a masked forward on SDPA; unmasked ones stay on flash."""
    calls = []

    def counting_flash(*args, **kwargs):
        calls.append(1)
        return _fake_flash_varlen(*args, **kwargs)

    monkeypatch.setattr(attention, "flash_attn_varlen_qkvpacked_func", counting_flash)
    model = make_model()
    seqs, sigma, x, mask = _padded_batch(model)
    want = model(x, sigma, attention_mask=mask)
    monkeypatch.setattr(model, "resolved_attn_backend", lambda device: "flash")
    model(x, sigma, attention_mask=mask)
    assert calls, "outside sync_free the masked forward runs on flash"
    calls.clear()
    with ops.sync_free():
        got = model(x, sigma, attention_mask=mask)
        assert not calls
        model(x, sigma)  # no mask: flash needs no host read
        assert calls
    torch.testing.assert_close(got, want)


def test_attention_backend_selection(monkeypatch):
    model = make_model()
    assert model.resolved_attn_backend("cpu") == "sdpa"
    with pytest.raises(ValueError, match="attn_backend"):
        model.attn_backend = "xformers"
    if not attention.FLASH_ATTN_AVAILABLE:
        with pytest.raises(RuntimeError, match="flash-attn"):
            SEDD(tiny_config(), attn_backend="flash")
    monkeypatch.setattr(attention, "FLASH_ATTN_AVAILABLE", True)
    model.attn_backend = "flash"
    x, sigma = inputs(model)
    with pytest.raises(ValueError, match="CUDA"):
        model(x, sigma)
    model.attn_backend = "auto"
    assert model.resolved_attn_backend("cpu") == "sdpa"


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_invalid_config_json_is_a_value_error_naming_the_file(tmp_path):
    from sedd.pretrained import load_pretrained

    make_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    for load in (SEDD.from_pretrained, load_pretrained):
        with pytest.raises(ValueError, match="config.json.*is not valid JSON"):
            load(str(tmp_path))


def test_save_pretrained_round_trip(tmp_path):
    model = make_model()
    x, sigma = inputs(model)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = SEDD.from_pretrained(tmp_path / "ckpt")
    assert not loaded.training and loaded.config == model.config
    assert torch.equal(loaded(x, sigma), model(x, sigma))


def public_style_config() -> dict:
    return {
        "ngpus": 8,
        "tokens": N_TOKENS,
        "training": {"batch_size": 512, "accum": 1, "n_iters": 1300001, "ema": 0.9999},
        "data": {"train": "openwebtext", "valid": "wikitext103", "cache_dir": "data"},
        "graph": {"type": "absorb", "file": "data", "report_all": False},
        "noise": {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "sampling": {"predictor": "euler", "steps": 128, "noise_removal": True},
        "optim": {"lr": 3e-4, "beta1": 0.9, "warmup": 2500, "grad_clip": 1.0},
        "model": {"name": "small", "type": "ddit", "hidden_size": D, "cond_dim": C, "length": 16,
                  "n_blocks": BLOCKS, "n_heads": H, "scale_by_sigma": True, "dropout": 0.1},
    }


def test_load_pytorch_model_bin_with_public_config(tmp_path):
    cfg = public_style_config()
    source = randomise(SEDD(cfg))
    torch.save(source.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = SEDD.from_pretrained(str(tmp_path))
    assert loaded.config == cfg  # extra keys kept, so save_pretrained writes them back
    x, sigma = inputs(loaded)
    assert torch.equal(loaded(x, sigma), source(x, sigma))
    # the {"config": {...}} wrapping of newer hub mixins, and a DDP "module." prefix
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg}))
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, tmp_path / "pytorch_model.bin")
    assert torch.equal(SEDD.from_pretrained(tmp_path)(x, sigma), source(x, sigma))


def test_checkpoint_mismatches_name_the_keys(tmp_path):
    model = make_model()
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"unexpected keys: extra\.weight"):
        model.load_checkpoint_state({**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.mlp\.2\.bias"):
        model.load_checkpoint_state({k: v for k, v in state.items() if k != "blocks.1.mlp.2.bias"})
    # inv_freq is deterministic, so a checkpoint without it still loads
    model.load_checkpoint_state({k: v for k, v in state.items() if k != "rotary_emb.inv_freq"})

    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["graph"]["type"] = "uniform"  # V = tokens, one row short of the absorbing weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shape mismatches: vocab_embed\.embedding \(checkpoint \[12, 32\], model \[11, 32\]\)"):
        SEDD.from_pretrained(tmp_path)


def test_bad_checkpoint_locations(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        SEDD.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        SEDD.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        SEDD.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        SEDD.from_pretrained(tmp_path / "config.json")
    with pytest.raises(OSError, match="local directory"):
        SEDD.from_pretrained("nobody/no-such-sedd-model", local_files_only=True, cache_dir=tmp_path / "hf")


def test_bad_configs():
    with pytest.raises(ValueError, match="graph.type"):
        SEDD({**tiny_config(), "graph": {"type": "masked"}})
    with pytest.raises(ValueError, match="n_heads"):
        SEDD(tiny_config(n_heads=5))
    with pytest.raises(ValueError, match="tokens"):
        SEDD({k: v for k, v in tiny_config().items() if k != "tokens"})
    with pytest.raises(TypeError, match="config"):
        SEDD(["tokens", 11])


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_naming_the_argument():
    model = make_model()
    x, sigma = inputs(model)
    V = model.vocab_size
    bad = [
        (TypeError, "x_t", (x.float(), sigma)),
        (TypeError, "x_t", (x > 0, sigma)),
        (ValueError, "x_t", (x[0], sigma)),
        (ValueError, r"x_t holds token ids outside \[0, 12\)", (x.masked_fill(x == x[0, 0], V), sigma)),
        (ValueError, "x_t holds", (x - V, sigma)),
        (TypeError, "sigma", (x, 0.5)),
        (TypeError, "sigma", (x, torch.ones(3, dtype=torch.long))),
        (ValueError, "sigma must have shape", (x, torch.ones(4))),
        (ValueError, "sigma must have shape", (x, torch.ones(3, 2))),
        (ValueError, "sigma must be finite and > 0", (x, torch.tensor([0.5, 0.0, 1.0]))),
        (ValueError, "sigma must be finite and > 0", (x, torch.tensor([0.5, -1.0, 1.0]))),
        (ValueError, "sigma must be finite and > 0", (x, torch.tensor([0.5, float("nan"), 1.0]))),
        (ValueError, "sigma must be finite and > 0", (x, torch.tensor([0.5, float("inf"), 1.0]))),
    ]
    for exc, message, args in bad:
        with pytest.raises(exc, match=message):
            model(*args)
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, sigma, attention_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask"):
        model(x, sigma, attention_mask=torch.ones(3, 9))
    with pytest.raises(TypeError, match="segment_ids"):
        model(x, sigma, segment_ids=torch.ones(3, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="sigma must be finite"):
        model.score_shift(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="raw must have shape"):
        model.postprocess(torch.zeros(3, 9, V - 1), x, sigma)
