"""The reasoning engine: the Production ``nt8-reasoner`` (a LoRA adapter on its base) writing
post-trade reflections.

It loads the adapter that is in Production (the base 4-bit on a GPU, full precision on the CPU),
asks it the annotator's question with no system prompt and temperature 0.6 (DeepSeek's advice
for R1 distills), and splits the reply into the think block and the answer. Before each use it
asks the registry which version is in Production (at most every ``check_every_s``) and loads a
newly promoted adapter then. :class:`ReasonerAnnotator` makes it the buffer's LLM annotator
(``annotation.annotator: reasoner``), with the rules as fallback.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlproject.config.schema import FinetuneConfig
from mlproject.quiet import quiet_checkpointing_rename
from mlproject.reasoner.chat import THINK_CLOSE, THINK_OPEN, Reply, parse_reply, render_prompt
from mlproject.reflection import LLMAnnotator
from mlproject.registry import production_version

log = logging.getLogger(__name__)

ADAPTER_DIR = "peft"
"""Where ``mlflow.transformers`` keeps a PEFT adapter inside the logged model."""
BASE_TAG = "base_model"
"""Version tag naming the base (hub id or folder) an adapter was trained on."""


class ReasonerUnavailable(ValueError):
    """No reasoner version is in Production (or it cannot be loaded here)."""


def adapter_base(model_dir: Path) -> str:
    """The base model a logged adapter refers to (a local folder, else a hub id)."""
    import yaml

    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["transformers"]
    return str(flavor.get("base_model_path") or flavor.get("source_model_name"))


def quantization_config(quantization: str, on_gpu: bool) -> Any:
    """bitsandbytes settings for ``4bit`` (NF4, double quantisation, bf16 compute on a GPU) or
    ``8bit``; None for ``none``."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if on_gpu else torch.float32)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "none":
        return None
    raise ValueError(f"quantization {quantization!r}: one of 4bit, 8bit, none")


def _not_here(base: str, exc: OSError) -> ReasonerUnavailable:
    """How to get a base that is not here, with the ``hf`` client huggingface_hub installs: a hub
    id into the Hugging Face cache (where ``local_files_only`` finds it), a folder by ``--local-dir``."""
    hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~")) and not Path(base).exists()
    how = (f"`hf download {base}` (into the Hugging Face cache)" if hub_id else
           f"`hf download {FinetuneConfig.model_fields['base_model'].default} --local-dir {base}`")
    return ReasonerUnavailable(
        f"base model {base!r} is not on this machine ({str(exc).splitlines()[0]}); download it first with {how} "
        "or set finetune.base_model to a local folder or `tiny`")


def load_tokenizer(base: str) -> Any:
    """The tokenizer of a base model folder or cached hub id (nothing is downloaded)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base, local_files_only=True)
    except OSError as exc:
        raise _not_here(base, exc) from None


def load_base(base: str, quantization: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a base model folder or cached hub id; a base that is not here is
    an error saying how to get it (nothing is downloaded at run time)."""
    import torch
    from transformers import AutoModelForCausalLM

    on_gpu = torch.cuda.is_available()
    tokenizer = load_tokenizer(base)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base, local_files_only=True, quantization_config=quantization_config(quantization, on_gpu),
            dtype=torch.bfloat16 if on_gpu else torch.float32, device_map="auto" if on_gpu else None)
    except OSError as exc:
        raise _not_here(base, exc) from None
    return model, tokenizer


def load_adapter_model(model_dir: Path, quantization: str) -> tuple[Any, Any]:
    """(base + adapter, tokenizer) from a downloaded ``nt8-reasoner`` version."""
    from peft import PeftModel

    base, tokenizer = load_base(adapter_base(model_dir), quantization)
    with quiet_checkpointing_rename():
        model = PeftModel.from_pretrained(base, str(model_dir / ADAPTER_DIR))
    model.eval()
    return model, tokenizer


@dataclass
class _Loaded:
    version: str
    model: Any
    tokenizer: Any


class ReasoningEngine:
    """Reflections from the Production ``nt8-reasoner``; follows promotions."""

    def __init__(self, model_name: str = "nt8-reasoner", temperature: float = 0.6, max_new_tokens: int = 512,
                 quantization: str | None = None, check_every_s: float = 60.0, seed: int | None = None) -> None:
        self.model_name, self.temperature, self.max_new_tokens = model_name, temperature, max_new_tokens
        self.quantization, self.check_every_s, self.seed = quantization, check_every_s, seed
        self._loaded: _Loaded | None = None
        self._checked = -float("inf")

    @classmethod
    def from_config(cls, cfg: Any) -> ReasoningEngine:
        f = cfg.finetune
        return cls(f.register_model, f.temperature, f.max_new_tokens, seed=cfg.seed)

    @property
    def version(self) -> str | None:
        """The loaded version (None before the first use)."""
        return self._loaded.version if self._loaded else None

    def ensure_loaded(self) -> _Loaded:
        """The Production adapter, loaded (again, when another version was promoted since)."""
        import mlflow
        import torch

        now = time.monotonic()
        if self._loaded is not None and now - self._checked < self.check_every_s:
            return self._loaded
        self._checked = now
        version = production_version(self.model_name)
        if version is None:
            raise ReasonerUnavailable(f"no {self.model_name} version is in Production: fine-tune one first "
                                      "(python -m pipelines.finetune)")
        if self._loaded is None or self._loaded.version != version:
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{self.model_name}/{version}"))
            quantization = self.quantization or ("4bit" if torch.cuda.is_available() else "none")
            model, tokenizer = load_adapter_model(local, quantization)
            log.info("reasoning engine: %s v%s loaded (%s)", self.model_name, version, quantization)
            self._loaded = _Loaded(version, model, tokenizer)
        return self._loaded

    def generate(self, prompt: str) -> Reply:
        """The Production reasoner's reply to ``prompt`` (one user turn), split at ``</think>``."""
        import torch

        loaded = self.ensure_loaded()
        tok = loaded.tokenizer
        inputs = tok(render_prompt(tok, prompt), return_tensors="pt").to(loaded.model.device)
        if self.seed is not None:
            torch.manual_seed(self.seed)
        sample = self.temperature > 0
        with torch.no_grad():
            out = loaded.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=sample,
                                        temperature=self.temperature if sample else None,
                                        top_p=0.95 if sample else None, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
        return parse_reply(text)


class ReasonerAnnotator(LLMAnnotator):
    """:class:`LLMAnnotator` with the engine in place of the HTTP endpoint: same prompt, same
    parsing, same rule-based fallback."""

    def __init__(self, engine: ReasoningEngine, retries: int = 0) -> None:
        super().__init__("local", f"{engine.model_name}", retries=retries)
        self.engine = engine

    def ask(self, prompt: str) -> str:
        reply = self.engine.generate(prompt)
        self.model = f"{self.engine.model_name}:v{self.engine.version}"
        return f"{THINK_OPEN}{reply.reasoning}{THINK_CLOSE}{reply.answer}"
