"""A tiny R1-Distill-shaped model built locally: Llama architecture with random weights and a
small byte-level BPE tokenizer carrying the R1-Distill special tokens and chat template.

Nothing can be downloaded at test time, so tests, the CPU demo (``finetune.base_model: tiny``)
and the benchmark fine-tune this one through the same code path as the 8B base (4-bit included).
Seeded: the same folder contents for the same arguments.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mlproject.reasoner.chat import ASSISTANT, BOS, EOS, R1_DISTILL_TEMPLATE, THINK_CLOSE, THINK_OPEN, USER

log = logging.getLogger(__name__)

TINY = "tiny"
"""``finetune.base_model`` value that means: build (or reuse) the tiny model locally."""
CORPUS = (
    "long short flat MES ES NQ at in high normal low volatility window trend up down held bars and won lost "
    "broke even best open worst You review one closed futures trade of a trading agent Think it through then "
    "answer with exactly two lines LESSON QUALITY a number from 0 bad decision to 1 an excellent one keep "
    "taking such entries against the trend paid counter-trend win size it carefully gave back an open profit "
    "larger than the loss take profits or trail the stop sooner wait for the trend or stand aside never worked "
    "cut such trades sooner 0123456789 +-.,:;()<>/ The entry was"
)
"""Text the tiny tokenizer's merges are learnt from (the words of the reflections)."""


def build_tokenizer(vocab_size: int = 512) -> object:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the R1-Distill special tokens, a BOS
    added in front of every sequence (as the Llama-3 tokenizer does) and the R1-Distill template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, USER, ASSISTANT]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([CORPUS] * 4, trainer)
    core.add_tokens([THINK_OPEN, THINK_CLOSE])  # added, not special: decoded with the text, as in R1-Distill
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                        special_tokens=[(BOS, core.token_to_id(BOS))])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    tok.chat_template = R1_DISTILL_TEMPLATE
    return tok


def build_tiny_model(path: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 128, seed: int = 0) -> Path:
    """Write a tiny Llama (random weights, ``seed``) and its tokenizer to ``path``; returns it.
    An existing complete folder is reused."""
    path = Path(path)
    marker = path / "tiny.json"
    spec = {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads, "intermediate": intermediate,
            "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return path
    tok = build_tokenizer()
    model = _random_llama(tok, spec)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    marker.write_text(json.dumps(spec))  # last: a folder without it is rebuilt
    log.info("built the tiny R1-shaped model (%d parameters) in %s", sum(p.numel() for p in model.parameters()), path)
    return path


def _random_llama(tok: Any, spec: dict[str, int]) -> Any:
    """A LlamaForCausalLM of the ``spec`` sizes for tokenizer ``tok``, its weights drawn from ``spec["seed"]``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec["seed"])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                         num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                         num_key_value_heads=spec["kv_heads"], max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config)
