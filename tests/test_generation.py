"""sedd.generate: text in, text out, per-row fixed positions, and semi-autoregressive windows."""

from __future__ import annotations

import string
import warnings

import pytest
import torch

import sedd
from sedd.data import byte_tokenizer, get_tokenizer
from sedd.generation import generate, generate_samples, sample_blockwise
from sedd.graph import Absorbing
from sedd.model import SEDD
from sedd.noise import LogLinear
from sedd.pretrained import load_pretrained
from sedd.sampling import sample
from sedd.sampling.spans import fixed_spans


class CharTokenizer:
    """One id per character of a small alphabet, plus EOS: the interface sedd.generate uses."""

    ALPHABET = string.ascii_letters + string.digits + " .,:;!?'-\n"

    def __init__(self):
        self.vocab_size = len(self.ALPHABET) + 1
        self.eos_id = len(self.ALPHABET)
        self.name = "chars"

    def encode(self, text: str) -> list[int]:
        return [self.ALPHABET.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join("|" if i == self.eos_id else self.ALPHABET[i] for i in ids)


TOK = CharTokenizer()


def _model(length: int = 16) -> SEDD:
    torch.manual_seed(0)
    model = SEDD(SEDD.config_for("cpu", tokens=TOK.vocab_size, length=length, n_blocks=1, hidden_size=32,
                                 cond_dim=16, n_heads=2))
    torch.nn.init.normal_(model.output_layer.linear.weight, std=0.3)  # zero-initialised otherwise
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def test_generate_is_exported_lazily():
    assert sedd.generate is generate and sedd.load_pretrained is load_pretrained


def test_prompts_of_different_lengths_in_one_batch():
    model = _model()
    prompts = ["a", "Hello, wor", None, "xyz"]
    out = generate(model, prompts, tokenizer=TOK, length=16, steps=4, seed=0, num_samples=2)
    assert len(out) == 8
    for i, text in enumerate(out):
        assert len(text) == 16
        prompt = prompts[i // 2]
        if prompt:
            assert text.startswith(prompt), (prompt, text)
    assert out != generate(model, prompts, tokenizer=TOK, length=16, steps=4, seed=1, num_samples=2)
    assert out == generate(model, prompts, tokenizer=TOK, length=16, steps=4, seed=0, num_samples=2)


def test_suffixes_templates_and_infills_per_row():
    model = _model()
    samples = generate_samples(
        model, ["Hi", None, None], suffixes=[" end.", None, None],
        templates=[None, "The [MASK:3] sat [MASK:2].", None], infills=[None, None, [(4, "mid"), (-3, "zz")]],
        tokenizer=TOK, length=16, steps=3, seed=2,
    )
    a, b, c = (s.text for s in samples)
    assert a.startswith("Hi") and a.endswith(" end.")
    # one id per character: spaces are tokens of their own, so the pieces are placed verbatim
    assert b.startswith("The ") and b[7:12] == " sat " and b[14] == "."  # "The " + 3 holes, " sat " + 2 holes, "."
    assert c[4:7] == "mid" and c[13:15] == "zz"
    assert [s.source for s in samples[0].fixed] == ["prefix", "suffix"]
    assert all(s.tokens == TOK.encode(s.text) for s in samples)


def test_generate_input_errors():
    model = _model()
    with pytest.raises(ValueError, match="same number of rows"):
        generate(model, ["a", "b"], suffixes=["c"], tokenizer=TOK)
    with pytest.raises(ValueError, match="row 1: prefix is 20 tokens, which does not fit"):
        generate(model, ["a", "x" * 20], tokenizer=TOK, length=16)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, "a")
    with pytest.raises(TypeError, match="prompts must be a string"):
        generate(model, [1, 2], tokenizer=TOK)
    with pytest.raises(ValueError, match="num_samples"):
        generate(model, tokenizer=TOK, num_samples=0)
    with pytest.raises(ValueError, match="nothing is left"):
        fixed_spans(TOK, 4, prefix="abcd")


def test_generate_from_a_checkpoint_directory(tmp_path):
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = SEDD(SEDD.config_for("cpu", tokens=tok.vocab_size, length=16, n_blocks=1))
    model.save_pretrained(tmp_path)
    tok.save(tmp_path / "tokenizer.json")
    out = generate(str(tmp_path), ["Once", "a"], length=16, steps=2, seed=0, device="cpu")
    assert len(out) == 2 and out[0].startswith("Once") and out[1].startswith("a")
    assert out == generate(load_pretrained(tmp_path, device="cpu"), ["Once", "a"], length=16, steps=2, seed=0)


class Recorder(torch.nn.Module):
    """Wraps a model and keeps every input it was called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.length, self.calls = model, model.length, []

    def forward(self, x_t, sigma, **kwargs):
        self.calls.append(x_t.clone())
        return self.model(x_t, sigma)


def test_blockwise_windows_are_conditioned_on_the_tokens_before_them():
    model = Recorder(_model(length=8))
    graph, noise = Absorbing(TOK.vocab_size), LogLinear()
    steps, window, stride = 3, 8, 3
    prompt = torch.tensor(TOK.encode("ab"))
    tokens, mask = torch.zeros(20, dtype=torch.long), torch.zeros(20, dtype=torch.bool)
    tokens[:2], mask[:2] = prompt, True
    tokens[15:17], mask[15:17] = torch.tensor(TOK.encode("zz")), True  # an infill span in a later window
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no window is longer than the model's length
        x = sample_blockwise(model, graph, noise, batch_size=2, length=20, window=window, stride=stride,
                             steps=steps, fixed_tokens=tokens, fixed_mask=mask, generator=g)
    assert x.shape == (2, 20) and bool((x < graph.N).all())
    assert torch.equal(x[:, :2], prompt.expand(2, 2)) and torch.equal(x[:, 15:17], tokens[15:17].expand(2, 2))
    # windows end at 8, 11, 14, 17, 20: steps + 1 (denoise) model calls each, never longer than 8
    ends = [8, 11, 14, 17, 20]
    assert len(model.calls) == len(ends) * (steps + 1)
    assert all(c.shape == (2, window) for c in model.calls)
    for w, end in enumerate(ends[1:], start=1):
        start, done = end - window, end - stride
        for call in model.calls[w * (steps + 1) : (w + 1) * (steps + 1)]:
            # every call of a later window sees the final tokens before its new positions
            assert torch.equal(call[:, : done - start], x[:, start:done])


def test_generate_longer_than_the_model_is_blockwise():
    model = _model(length=8)
    calls = []
    model.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = generate_samples(model, "Hi", tokenizer=TOK, length=20, steps=2, seed=0)
    assert len(out[0].tokens) == 20 and out[0].text.startswith("Hi")
    # stride 4: windows end at 8, 12, 16, 20; each runs the model at most 2 steps + denoise (the
    # absorbing sampler skips the model once no position is MASK) and at least once
    assert max(calls) == 8 and 4 <= len(calls) <= 4 * 3


def test_sample_warns_past_the_training_length():
    model = _model(length=8)
    graph, noise = Absorbing(TOK.vocab_size), LogLinear()
    with pytest.warns(UserWarning, match="training length 8"):
        sample(model, graph, noise, batch_size=1, length=12, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(model, graph, noise, batch_size=1, length=8, steps=1)


def test_byte_tokenizer_round_trips_any_text():
    tok = get_tokenizer("bytes")
    text = "naïve café — 日本 <|endoftext|>\x00"
    ids = tok.encode(text)
    assert tok.vocab_size == 257 and tok.eos_id == 0 and ids[-2:-1] == [0]
    assert tok.decode(ids) == text and max(ids) < 257
    assert tok.encode("abc") == [ord("a") + 1, ord("b") + 1, ord("c") + 1]  # the same in every process
    assert tok.encode("é\n") == [b + 1 for b in "é\n".encode()]
    from tokenizers import pre_tokenizers

    from sedd.data.tokenizers import byte_symbols

    assert set(byte_symbols()) == set(pre_tokenizers.ByteLevel.alphabet())


# ----------------------------------------------------------------------------------------------
# Clear answers for every input
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def bpe(argparse_bpe):
    """A byte-level BPE, which glues a space to the word after it (the session's, of argparse.py)."""
    return argparse_bpe


def test_trailing_spaces_are_dropped_only_where_the_tokenizer_glues_them_to_the_next_word(bpe):
    from sedd.sampling.spans import spaces_join_next_word

    tok = get_tokenizer("bytes")
    assert spaces_join_next_word(bpe) and not spaces_join_next_word(tok) and not spaces_join_next_word(TOK)
    # one id per byte: a space is a token of its own, and the prompt is kept as given
    assert fixed_spans(tok, 16, prefix="The  ")[0].ids == tok.encode("The  ")
    assert fixed_spans(TOK, 16, infill=[(3, "ab ")])[0].ids == TOK.encode("ab ")
    assert fixed_spans(bpe, 16, prefix="The  ")[0].ids == bpe.encode("The")
    # spaces only: verbatim where spaces are tokens; where they would vanish, an error, not nothing
    assert fixed_spans(tok, 16, prefix="   ")[0].ids == tok.encode("   ")
    with pytest.raises(ValueError, match="prefix '   ' is only spaces"):
        fixed_spans(bpe, 16, prefix="   ")
    with pytest.raises(ValueError, match="only spaces"):
        fixed_spans(bpe, 16, infill=[(2, "  ")])


@pytest.mark.parametrize("kwargs, message", [
    ({"length": 0}, "length must be a positive integer, got 0"),
    ({"window": 0}, "window must be a positive integer, got 0"),
    ({"steps": 2.5}, "steps must be a positive integer, got 2.5"),
    ({"infills": [[(5.7, "ab")]]}, "infill position must be an integer token position, got 5.7"),
    ({"infills": [[(True, "ab")]]}, "infill position must be an integer token position, got True"),
    ({"infills": [[(3, None)]]}, "the text must be a string, got None"),
    ({"templates": "ab [MASK: 3]"}, r"'\[MASK: 3\]' is not a hole"),
    ({"templates": "ab [mask:3]"}, r"'\[mask:3\]' is not a hole"),
    ({"templates": "ab [MASK:3 ]"}, r"'\[MASK:3 \]' is not a hole"),
    ({"templates": "ab [MASK:3"}, r"'\[MASK:3' is not a hole"),
    ({"templates": "abc [MASK:100]"}, "lays out 104 tokens, holes included, which does not fit in a 16-token"),
    ({"templates": "ab[MASK:5]cd", "infills": [[(4, "z")]]},
     r"infill 4:'z' \(tokens 4..4\) falls in the template's hole"),
])
def test_bad_sizes_positions_and_templates_are_value_errors(kwargs, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        generate_samples(model, tokenizer=TOK, **{"length": 16, "steps": 2, **kwargs})


def test_integer_positions_of_any_integer_type_and_templates_that_fit():
    import numpy as np

    out = generate_samples(_model(), tokenizer=TOK, infills=[[(np.int64(3), "ab")]], length=16, steps=2, seed=0)
    assert out[0].text[3:5] == "ab"
    out = generate_samples(_model(), tokenizer=TOK, templates="abc [MASK:12]", length=16, steps=2, seed=0)
    assert out[0].text.startswith("abc ") and len(out[0].tokens) == 16


def test_generate_samples_in_eval_mode_and_gives_the_mode_back():
    model = _model()
    for block in model.blocks:
        block.dropout = 0.9  # that dropout is on would show in every sample
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    expected = generate(model, "ab", tokenizer=TOK, length=16, steps=2, seed=0)
    model.train()
    assert generate(model, "ab", tokenizer=TOK, length=16, steps=2, seed=0) == expected
    assert seen and not any(seen)
    assert model.training and all(m.training for m in model.modules())


def test_generate_refuses_an_eps_whose_noise_rounds_to_zero():
    model = _model()
    graph, noise = Absorbing(TOK.vocab_size), LogLinear()
    with pytest.raises(ValueError, match="eps 1e-300 is too small"):
        generate(model, "ab", tokenizer=TOK, length=8, steps=2, eps=1e-300)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sample(model, graph, noise, batch_size=1, length=8, steps=2.5)
