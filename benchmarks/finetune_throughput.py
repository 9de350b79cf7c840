"""Fine-tuning throughput (training tokens/s) and peak memory of the QLoRA path, against plain LoRA.

Ours: ``pipelines.finetune.train_adapter`` with ``--quantization`` (default 4bit: NF4, double
quantisation). Reference, in the same process: the same trainer with ``quantization: none``
(LoRA on the full-precision base). The two alternate in short blocks (reference, ours, ...)
after a warm-up, and the median of the per-block ratios is reported with its spread: timings
on this machine swing by about 25% within seconds. Peak memory: CUDA's max allocated per block
on a GPU; on the CPU the process's peak RSS, measured in one fresh process per contender.

The model is random weights of a chosen Llama shape: ``--shape tiny`` (the test model) or
``--shape r1-8b`` (DeepSeek-R1-Distill-Llama-8B's: 32 layers of 4096, 14336 MLP, 32/8 heads,
128256 vocab; needs a GPU, about 16 GB of disk for the random bf16 weights). ``--layers``
shortens any shape (a check of the code path on a small machine).

    python benchmarks/finetune_throughput.py [--shape tiny] [--seq 256] [--batch 4] [--steps 4] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

SHAPES = {
    "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": None},
    "r1-8b": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8, "vocab": 128256},
}


def build_base(shape: dict, folder: Path) -> Path:
    """Random weights of ``shape`` (bf16 on a GPU) with the tiny R1 tokenizer, saved to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mlproject.reasoner.tiny import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=shape["vocab"] or len(tok), hidden_size=shape["hidden"],
                         intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return folder


def dataset(seq: int, n: int) -> object:
    """``n`` prompt/completion pairs of about ``seq`` tokens (half prompt, half completion)."""
    import pandas as pd

    from mlproject.reasoner.data import Prepared
    from mlproject.reasoner.tiny import CORPUS

    words = CORPUS.split()
    text = lambda k, m: " ".join(words[(k + i) % len(words)] for i in range(m))  # noqa: E731
    frame = pd.DataFrame({"prompt": [text(k, seq // 4) + "\n" for k in range(n)],
                          "completion": [text(k + 7, seq // 4) for k in range(n)]})
    return Prepared(Path("train.jsonl"), Path("validation.jsonl"), frame, frame.head(2), {})


def config(args: argparse.Namespace, quantization: str) -> object:
    from mlproject.config import load_config

    return load_config(None, [f"finetune.quantization={quantization}", f"finetune.max_steps={args.steps}",
                              f"finetune.batch_size={args.batch}", "finetune.gradient_accumulation=1",
                              f"finetune.max_length={args.seq}", f"finetune.eval_steps={args.steps * 10}",
                              f"finetune.lora_r={args.lora_r}"])


def block(args: argparse.Namespace, base: Path, quantization: str) -> dict[str, float]:
    """One training run of ``args.steps`` steps: tokens/s and peak memory."""
    import torch

    from pipelines.finetune import train_adapter

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    history: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as work:
        model, _ = train_adapter(config(args, quantization), str(base), dataset(args.seq, args.batch * args.steps),
                                 Path(work), history)
    del model
    out = {"tokens_per_s": [h for h in history if "finetune/tokens_per_s" in h][-1]["finetune/tokens_per_s"]}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--layers", type=int, default=0, help="override the shape's layer count")
    parser.add_argument("--quantization", choices=["4bit", "8bit"], default="4bit")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--base", default="", help="an existing base folder (skips building random weights)")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # child: one block, print JSON
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if args.one:
        import resource

        result = block(args, Path(args.base), args.one)
        print(json.dumps({**result, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))
        return
    shape = dict(SHAPES[args.shape], **({"layers": args.layers} if args.layers else {}))
    with tempfile.TemporaryDirectory(prefix="ft-bench-") as tmp:
        base = Path(args.base) if args.base else build_base(shape, Path(tmp) / "base")
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(f"shape {args.shape} {shape}, seq {args.seq}, batch {args.batch}, {args.steps} steps per block, "
              f"LoRA r={args.lora_r}, device {device}")
        block(args, base, "none")  # warm-up: imports, kernels
        ratios, ours, ref, mem = [], [], [], {}
        for k in range(args.rounds):
            r = block(args, base, "none")
            o = block(args, base, args.quantization)
            ref.append(r["tokens_per_s"])
            ours.append(o["tokens_per_s"])
            ratios.append(o["tokens_per_s"] / r["tokens_per_s"])
            mem = {"none": r.get("peak_gpu_mb"), args.quantization: o.get("peak_gpu_mb")}
            print(f"round {k + 1}: LoRA {r['tokens_per_s']:.0f} tok/s, QLoRA ({args.quantization}) "
                  f"{o['tokens_per_s']:.0f} tok/s, ratio {ratios[-1]:.3f}")
        if not torch.cuda.is_available():  # peak RSS cannot be reset: one fresh process per contender
            for q in ("none", args.quantization):
                child = subprocess.run([sys.executable, __file__, "--one", q, "--base", str(base),
                                        *sys.argv[1:]], capture_output=True, text=True, check=True)
                mem[q] = json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        print(f"tokens/s: LoRA median {statistics.median(ref):.0f}, QLoRA median {statistics.median(ours):.0f}; "
              f"QLoRA / LoRA median ratio {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
              f"max {max(ratios):.3f}, {len(ratios)} blocks)")
        print("peak memory (MB): " + ", ".join(f"{q} {v:.0f}" for q, v in mem.items() if v is not None)
              + (" (GPU, max allocated)" if torch.cuda.is_available() else " (process peak RSS)"))


if __name__ == "__main__":
    main()
