"""Train a small autoregressive judge (a GPT-2 from ``transformers``) for ``train/quality.py``.

    python train/train_judge.py --out runs/judge [--data default] [--tokenizer bpe:4096]
                                [--context 256] [--n-embd 128] [--n-layer 4] [--n-head 4]
                                [--batch-size 8] [--max-steps 400] [--max-minutes M] [--lr 1e-3]
                                [--seed 0] [--threads N]

Generative perplexity needs a judge trained on the same kind of text as the diffusion model.
The usual judge, GPT-2 large, has never seen the Python standard library (the default corpus),
needs the Hub, and is far too slow for 2 CPU cores; this script trains a small one offline on the
train split of the same corpus. Its causal-LM loss over packed blocks (EOS between documents)
is the standard next-token cross entropy; the learning rate warms up linearly, then stays
constant. The output directory loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)``: config.json, model.safetensors, the tokenizer (BOS = EOS
= ``<|endoftext|>``, as GPT-2's) and ``judge_training.json`` (settings, steps done, the
validation loss of the last step).

A judge trained for minutes is a weak language model: numbers it gives are for comparing
samplers and step counts with each other, never with published figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python train/train_judge.py`: the package of this checkout, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm.auto import tqdm

from sedd import data as sdata
from train import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_judge.py",
        description="Train a small GPT-2 (transformers) on a corpus, as the judge of train/quality.py.",
    )
    p.add_argument("--out", required=True, help="output directory (a transformers model directory)")
    p.add_argument("--data", default="default", help="training text, as train/run.py --data (default: default)")
    p.add_argument("--tokenizer", default="bpe:4096",
                   help="tokenizer spec, as train/run.py --tokenizer (default: bpe:4096, the cpu preset's)")
    p.add_argument("--context", type=int, default=256, help="tokens per block = the judge's context (default: 256)")
    p.add_argument("--n-embd", type=int, default=128, help="width (default: 128)")
    p.add_argument("--n-layer", type=int, default=4, help="blocks (default: 4)")
    p.add_argument("--n-head", type=int, default=4, help="attention heads (default: 4)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per step (default: 8)")
    p.add_argument("--max-steps", type=int, default=400, help="optimizer steps (default: 400)")
    p.add_argument("--max-minutes", type=float, help="also stop after this much wall time")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warmup steps (default: 50)")
    p.add_argument("--val-blocks", type=int, default=64, help="validation blocks scored at the end (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order (default: 0)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    return p


def hf_tokenizer(tok: sdata.Tokenizer, folder: Path):
    """The project's tokenizer as a ``transformers`` fast tokenizer, written to ``folder``."""
    from transformers import PreTrainedTokenizerFast

    tok.save(folder / "tokenizer.json")
    eos = sdata.EOS_TOKEN
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token=eos, eos_token=eos)
    hf.save_pretrained(folder)
    return hf


@torch.no_grad()
def mean_loss(model, blocks: sdata.PackedBlocks, index: np.ndarray, batch_size: int) -> float:
    model.eval()
    total = count = 0.0
    for start in range(0, len(index), batch_size):
        x = blocks.get_batch(index[start : start + batch_size])
        total += float(model(input_ids=x, labels=x).loss) * x.numel()
        count += x.numel()
    model.train()
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cli.one_process("train_judge.py", "python train/train_judge.py")
    except cli.InputError as err:
        if cli.processes().main:
            print(f"train_judge.py: error: {err}", file=sys.stderr)
        return 2
    for name in ("context", "n_embd", "n_layer", "n_head", "batch_size", "max_steps"):
        if getattr(args, name) < 1:
            print(f"train_judge.py: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from transformers import GPT2Config, GPT2LMHeadModel

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = sdata.get_tokenizer(args.tokenizer, corpus=args.data, progress=progress)
    train_tokens = sdata.load_tokens(args.data, "train", tok, progress=progress)
    val_tokens = sdata.load_tokens(args.data, sdata.validation_split(args.data), tok, progress=progress)
    train_blocks = sdata.PackedBlocks(train_tokens, args.context)
    val_blocks = sdata.PackedBlocks(val_tokens, args.context)
    val_index = np.unique(np.linspace(0, len(val_blocks) - 1, min(args.val_blocks, len(val_blocks))).round()
                          .astype(np.int64))
    hf_tok = hf_tokenizer(tok, out)

    config = GPT2Config(
        vocab_size=tok.vocab_size, n_positions=args.context, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id,
    )
    model = GPT2LMHeadModel(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"train_judge.py: GPT-2 {params / 1e6:.2f}M parameters, context {args.context}, vocab {tok.vocab_size}; "
          f"{len(train_tokens):,} train tokens", file=sys.stderr)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    batches = sdata.BatchIterator(train_blocks, args.batch_size, seed=args.seed)

    started = time.perf_counter()
    steps_done, loss = 0, float("nan")
    bar = tqdm(range(args.max_steps), desc="judge", unit="step", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        x = next(batches)
        out_loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        out_loss.backward()
        loss = float(out_loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        bar.set_postfix(loss=f"{loss:.3f}")
        if args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes:
            break
    bar.close()
    train_s = time.perf_counter() - started
    val_loss = mean_loss(model, val_blocks, val_index, args.batch_size)

    model.save_pretrained(out)
    record = {
        "data": args.data, "tokenizer": args.tokenizer, "tokenizer_name": tok.name, "parameters": params,
        "context": args.context, "n_embd": args.n_embd, "n_layer": args.n_layer, "n_head": args.n_head,
        "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps, "seed": args.seed,
        "steps": steps_done, "train_s": round(train_s, 1), "last_train_loss": loss,
        "val_blocks": len(val_index), "val_loss": val_loss, "val_ppl": math.exp(val_loss),
        "command": " ".join(["python", "train/train_judge.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    (out / "judge_training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"train_judge.py: {steps_done} steps in {train_s:.0f}s; validation loss {val_loss:.3f} nats/token "
          f"(perplexity {math.exp(val_loss):.1f}) over {len(val_index)} blocks of {args.context}; wrote {out} "
          f"({type(hf_tok).__name__})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
