"""QLoRA fine-tuning of the reasoning model on annotated experiences; registered as ``nt8-reasoner``.

    python -m pipelines.finetune [--config conf/default.yaml] [--base-model PATH|HUB_ID|tiny]
                                 [--data FOLDER] [--max-steps 200] [--lora-r 16] [--quantization 4bit]
    python -m pipelines.finetune --prepare-only        # write train.jsonl / validation.jsonl only (no model needed)
    python -m pipelines.finetune --merge 3 --out merged/   # base + adapter of version 3 as one model folder
    mlflow run . -e finetune -P max_steps=200 --env-manager local

Steps, one MLflow run: prepare the data from the experience buffer (or read ``--data``, a folder
with ``train.jsonl`` and ``validation.jsonl``), logged as dataset inputs with their digests; train
a LoRA adapter with TRL's ``SFTTrainer`` on the base loaded by bitsandbytes (4-bit NF4 with double
quantisation: QLoRA; bf16 compute and activation checkpointing on a GPU), completion-only loss;
log ``finetune/loss``, ``finetune/eval_loss``, ``finetune/tokens_per_s`` and peak memory; log the
adapter with ``mlflow.transformers`` (adapter only, the base referenced by path or id); register
it; measure the completion loss of this adapter and of the Production adapter on the same
validation set; promote (registry lock, history) when it is lower, else refuse with the numbers.
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import pandas as pd

from mlproject.cli import base_parser, optional_int, run_cli
from mlproject.config import Config
from mlproject.experience import ExperienceBuffer
from mlproject.quiet import quiet_checkpointing_rename, quiet_dataset_source
from mlproject.reasoner.chat import check_prompt_format
from mlproject.reasoner.data import Prepared, prepare, read_jsonl
from mlproject.reasoner.engine import (
    ADAPTER_DIR,
    BASE_TAG,
    ReasonerUnavailable,
    adapter_base,
    load_adapter_model,
    load_base,
    load_tokenizer,
)
from mlproject.reasoner.tiny import TINY, build_tiny_model
from mlproject.registry import production_version, promote, record_verdict, register_version, registry_lock
from mlproject.tracking import pipeline_run, setup_tracking

log = logging.getLogger(__name__)

PACKAGES = ("transformers", "peft", "torch", "accelerate", "bitsandbytes", "safetensors")
"""Pinned in the logged adapter's pip requirements (as installed here)."""


@dataclass
class FinetuneResult:
    run_id: str
    prepared: Prepared
    model_uri: str | None = None
    version: str | None = None
    decision: str = "prepared only"
    val_loss: float = math.nan
    production_val_loss: float = math.nan
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_base(cfg: Config) -> str:
    """The base as a local folder or hub id (``tiny``: built locally under ``finetune.tiny_dir``)."""
    base = cfg.finetune.base_model
    return str(build_tiny_model(cfg.finetune.tiny_dir).resolve()) if base == TINY else base


def prepare_data(cfg: Config, data: str | None) -> Prepared:
    """The train/validation pairs: prepared from the buffer (no model needed), or read from ``data``
    (a folder with ``train.jsonl`` and ``validation.jsonl``); logged as the run's dataset inputs."""
    import mlflow

    f = cfg.finetune
    if data:
        prepared = _read_prepared(Path(data))
    else:
        buffer = ExperienceBuffer(cfg.continuous_learning.experience_storage)
        prepared = prepare(buffer, f.output_dir, f.min_quality, f.validation_fraction, f.min_examples)
        mlflow.log_metrics({f"finetune/dropped_{k}": float(v) for k, v in prepared.dropped.items()})
    for name, frame, path in (("train", prepared.train, prepared.train_path),
                              ("validation", prepared.validation, prepared.validation_path)):
        _log_split(name, frame, path)
    mlflow.log_artifact(str(prepared.train_path), "data")
    mlflow.log_artifact(str(prepared.validation_path), "data")
    return prepared


def _read_prepared(folder: Path) -> Prepared:
    """The pairs of a folder with ``train.jsonl`` and ``validation.jsonl``, each holding a record."""
    train, validation = read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "validation.jsonl")
    if train.empty or validation.empty:
        raise ValueError(f"{folder}: train.jsonl and validation.jsonl must each hold at least one record")
    return Prepared(folder / "train.jsonl", folder / "validation.jsonl", train, validation, {})


def _log_split(name: str, frame: pd.DataFrame, path: Path) -> None:
    """One split as a dataset input of the run (``training`` or ``validation``) and its size."""
    import mlflow

    with quiet_dataset_source():
        dataset = mlflow.data.from_pandas(frame[["prompt", "completion"]], source=str(path.resolve()),
                                          name=f"reasoner-{name}")
    mlflow.log_input(dataset, context="training" if name == "train" else "validation")
    mlflow.log_metric(f"finetune/{name}_examples", float(len(frame)))


def completion_loss(model: Any, tokenizer: Any, frame: pd.DataFrame, max_length: int) -> float:
    """Mean cross-entropy per completion token over ``frame`` (prompt tokens masked, one EOS
    after the completion, as in training): the number the gate compares."""
    import torch

    total, tokens = 0.0, 0
    model.eval()
    device = next(model.parameters()).device
    for prompt, completion in zip(frame["prompt"], frame["completion"]):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"][:max_length]
        start = next((k for k, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
        labels = [-100] * start + ids[start:]
        counted = sum(1 for t in labels[1:] if t != -100)  # the model predicts token k+1 from 0..k
        if counted == 0:
            continue
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device))
        total += float(out.loss) * counted
        tokens += counted
    if tokens == 0:
        raise ValueError("no completion tokens to score in the validation set (finetune.max_length too short?)")
    return total / tokens


def _peak_memory_mb() -> dict[str, float]:
    import torch

    out = {"finetune/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available():
        out["finetune/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _callback(history: list[dict[str, float]]) -> Any:
    """A TrainerCallback logging loss, validation loss and tokens/s to the active MLflow run."""
    from transformers import TrainerCallback

    class ToMlflow(TrainerCallback):
        started = time.perf_counter()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.started = time.perf_counter()  # tokens/s of training, not of loading the model

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            metrics = _step_metrics(logs or {}, self.started)
            if metrics:
                _record_step(metrics, state, history)

    return ToMlflow()


_LOGGED = {"loss": "loss", "eval_loss": "eval_loss", "learning_rate": "learning_rate",
           "grad_norm": "grad_norm", "mean_token_accuracy": "token_accuracy"}
"""Trainer log keys -> ``finetune/...`` metric names."""


def _step_metrics(logs: dict[str, Any], started: float) -> dict[str, float]:
    """The finite numbers of one trainer log as ``finetune/...`` metrics, with tokens/s since ``started``."""
    metrics = {f"finetune/{_LOGGED[k]}": float(v) for k, v in logs.items()
               if k in _LOGGED and isinstance(v, (int, float)) and math.isfinite(float(v))}
    if "num_tokens" in logs:
        metrics["finetune/tokens_per_s"] = float(logs["num_tokens"]) / (time.perf_counter() - started)
    return metrics


def _record_step(metrics: dict[str, float], state: Any, history: list[dict[str, float]]) -> None:
    """Add peak memory; log to the active run (outside one, only the log line) and to ``history``."""
    import mlflow

    metrics.update(_peak_memory_mb())
    if mlflow.active_run():  # outside a run (a test, a notebook) only the log line
        mlflow.log_metrics(metrics, step=state.global_step)
    history.append({**metrics, "step": float(state.global_step)})
    log.info("fine-tune step %d/%d %s", state.global_step, state.max_steps,
             " ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in metrics.items()))


def train_adapter(cfg: Config, base: str, prepared: Prepared, work: Path, history: list[dict[str, float]],
                  callbacks: tuple[Any, ...] = ()) -> tuple[Any, Any]:
    """QLoRA: the base through bitsandbytes, a LoRA adapter trained by TRL's SFTTrainer on the
    prompt/completion pairs (completion-only loss). Returns (PEFT model, tokenizer). ``callbacks``:
    further ``TrainerCallback`` objects (tests look at the weights before the first step)."""
    import datasets
    import torch
    from transformers import PrinterCallback
    from trl import SFTTrainer

    datasets.disable_progress_bars()  # per-map bars for a few hundred rows; the step log shows progress

    f = cfg.finetune
    on_gpu = torch.cuda.is_available()
    model, tokenizer = _trainable_base(base, f.quantization, on_gpu)
    args = _sft_config(cfg, work, on_gpu)
    lora = _lora_config(cfg)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer, peft_config=lora,
                         train_dataset=datasets.Dataset.from_pandas(prepared.train[["prompt", "completion"]]),
                         eval_dataset=datasets.Dataset.from_pandas(prepared.validation[["prompt", "completion"]]),
                         callbacks=[_callback(history), *callbacks])
    trainer.remove_callback(PrinterCallback)  # prints each log dict; the callback above logs them
    trainer.train()
    return trainer.model, tokenizer


def _trainable_base(base: str, quantization: str, on_gpu: bool) -> tuple[Any, Any]:
    """(the base model loaded for training, its tokenizer)."""
    from peft import prepare_model_for_kbit_training

    model, tokenizer = load_base(base, quantization)
    if quantization != "none":
        # TRL does not do this itself: norms in fp32, input grads for activation checkpointing.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=on_gpu)
    return model, tokenizer


def _lora_config(cfg: Config) -> Any:
    """The LoRA adapter of ``finetune.*`` (rank, alpha, dropout, target modules) for a causal LM."""
    from peft import LoraConfig

    f = cfg.finetune
    return LoraConfig(r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout, task_type="CAUSAL_LM",
                      target_modules=f.target_modules)


def _sft_config(cfg: Config, work: Path, on_gpu: bool) -> Any:
    """TRL's SFTConfig from ``finetune.*``: completion-only loss, evaluation every ``eval_steps``,
    no checkpoints, and on a GPU bf16, activation checkpointing and paged 8-bit Adam."""
    from trl import SFTConfig

    f = cfg.finetune
    return SFTConfig(
        output_dir=str(work), max_steps=f.max_steps, learning_rate=f.learning_rate, warmup_steps=0.03,
        per_device_train_batch_size=f.batch_size, per_device_eval_batch_size=f.batch_size,
        gradient_accumulation_steps=f.gradient_accumulation, max_length=f.max_length, completion_only_loss=True,
        eval_strategy="steps", eval_steps=f.eval_steps, logging_steps=max(1, min(10, f.eval_steps, f.max_steps)),
        save_strategy="no", report_to="none", seed=cfg.seed, use_cpu=not on_gpu,
        # bf16 with 4-bit on the CPU is ~10x slower (API-NOTES); paged 8-bit Adam needs CUDA.
        bf16=on_gpu, activation_checkpointing=on_gpu, optim="paged_adamw_8bit" if on_gpu else "adamw_torch",
        disable_tqdm=True)


def log_adapter(model: Any, tokenizer: Any, base: str) -> Any:
    """The adapter as an ``mlflow.transformers`` model: adapter weights only; a local base is
    referenced by its path (``base_model_path``), a hub base by its id."""
    import mlflow

    local = Path(base).is_dir()
    reqs = [f"{name}=={package_version(name).split('+')[0]}" for name in PACKAGES]
    return mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer}, name="adapter", task="text-generation",
        base_model_path=base if local else None, pip_requirements=reqs, model_card="" if local else None)


def production_loss(cfg: Config, model: Any, tokenizer: Any, base: str, validation: pd.DataFrame) -> tuple[str | None, float]:
    """(Production version, its completion loss on ``validation``); the adapter is loaded beside
    the new one when both share the base (one base in memory), else on its own base."""
    import mlflow

    name = cfg.finetune.register_model
    current = production_version(name)
    if current is None:
        return None, math.nan
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{current}"))
    if adapter_base(local) == base:
        model.load_adapter(str(local / ADAPTER_DIR), adapter_name="production")
        model.set_adapter("production")
        try:
            return current, completion_loss(model, tokenizer, validation, cfg.finetune.max_length)
        finally:
            model.set_adapter("default")
            model.delete_adapter("production")
    try:
        other, other_tok = load_adapter_model(local, cfg.finetune.quantization)
    except ReasonerUnavailable as exc:  # its base is gone: it cannot be compared, so nothing is promoted
        log.warning("Production %s v%s cannot be evaluated: %s", name, current, exc)
        return current, math.nan
    return current, completion_loss(other, other_tok, validation, cfg.finetune.max_length)


def main(cfg: Config, base_model: str | None = None, data: str | None = None, max_steps: int | None = None,
         lora_r: int | None = None, quantization: str | None = None, prepare_only: bool = False) -> FinetuneResult:
    """Prepare, train, log, register and gate one adapter (see the module docstring)."""
    import mlflow

    cfg = _with_updates(cfg, {"base_model": base_model, "max_steps": max_steps, "lora_r": lora_r,
                              "quantization": quantization})
    setup_tracking(cfg)
    with pipeline_run(cfg, "finetune") as run:
        mlflow.set_tag("finetune.base_model", cfg.finetune.base_model)
        if not prepare_only:  # before the data: a base that is not here stops the run first
            base = _checked_base(cfg, data)
        prepared = prepare_data(cfg, data)
        result = FinetuneResult(run.info.run_id, prepared)
        if prepare_only:
            log.info("prepared %s and %s", prepared.train_path, prepared.validation_path)
            return result
        model, tokenizer = _timed_training(cfg, base, prepared, result.history)
        result.val_loss = completion_loss(model, tokenizer, prepared.validation, cfg.finetune.max_length)
        _log_and_register(cfg, model, tokenizer, base, result)
        result.decision, reason = _gate_and_promote(cfg, result, model, tokenizer, base)
        _log_verdict(cfg, result, reason)
        return result


def _with_updates(cfg: Config, updates: dict[str, Any]) -> Config:
    """``cfg`` with the given (non-empty) ``finetune.*`` values of the command line."""
    updates = {k: v for k, v in updates.items() if v}
    if updates:
        cfg = cfg.model_validate({**cfg.model_dump(), "finetune": {**cfg.finetune.model_dump(), **updates}})
    return cfg


def _checked_base(cfg: Config, data: str | None) -> str:
    """The base (:func:`resolve_base`), its tokenizer loaded: a base that is not here fails first."""
    import mlflow

    base = resolve_base(cfg)
    tokenizer = load_tokenizer(base)
    if not data:  # the buffer's pairs are in the R1-Distill-Llama form: the base must read them so
        check_prompt_format(tokenizer, base)
    mlflow.set_tag("finetune.base_path", base)
    return base


def _timed_training(cfg: Config, base: str, prepared: Prepared, history: list[dict[str, float]]) -> tuple[Any, Any]:
    """:func:`train_adapter` in a scratch folder; logs ``finetune/train_seconds``."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="nt8-finetune-") as tmp, quiet_checkpointing_rename():
        started = time.perf_counter()
        model, tokenizer = train_adapter(cfg, base, prepared, Path(tmp), history)
        mlflow.log_metric("finetune/train_seconds", time.perf_counter() - started)
    return model, tokenizer


def _log_and_register(cfg: Config, model: Any, tokenizer: Any, base: str, result: FinetuneResult) -> None:
    """Log the adapter and register it as a new version (``result.model_uri``, ``result.version``)."""
    f = cfg.finetune
    info = log_adapter(model, tokenizer, base)
    result.model_uri = info.model_uri
    result.version = str(register_version(info.model_uri, f.register_model, {
        BASE_TAG: f.base_model, "run_id": result.run_id, "val_loss": f"{result.val_loss:.6g}",
        "quantization": f.quantization, "lora_r": str(f.lora_r)},
        description=f"LoRA r={f.lora_r} on {f.base_model}, {len(result.prepared.train)} trades").version)


def _log_verdict(cfg: Config, result: FinetuneResult, reason: str) -> None:
    """The gate's decision: final metrics, run tags, the version's ``gate.*`` tags and a log line."""
    import mlflow

    f = cfg.finetune
    mlflow.log_metrics({"finetune/val_loss": result.val_loss, **_peak_memory_mb(),
                        **({"finetune/production_val_loss": result.production_val_loss}
                           if math.isfinite(result.production_val_loss) else {})})
    mlflow.set_tags({"decision": result.decision, "reasons": reason, "candidate_version": result.version})
    record_verdict(f.register_model, result.version, result.decision, reason, result.run_id)
    log.info("%s v%s %s: %s", f.register_model, result.version, result.decision, reason)


def _gate_and_promote(cfg: Config, result: FinetuneResult, model: Any, tokenizer: Any, base: str) -> tuple[str, str]:
    """Promote when the new adapter's validation loss is below Production's on the same set;
    re-checked under the registry lock (Production may have moved while training)."""
    name = cfg.finetune.register_model
    before, prod_loss = production_loss(cfg, model, tokenizer, base, result.prepared.validation)
    with registry_lock(cfg.promotion.lock_file):
        now = production_version(name)
        if now != before:
            before, prod_loss = production_loss(cfg, model, tokenizer, base, result.prepared.validation)
        result.production_val_loss = prod_loss
        if before is not None and math.isnan(prod_loss):
            return "refused", (f"Production v{before} cannot be evaluated here (its base model is not on this "
                               "machine), so the new adapter cannot be shown better")
        if before is not None and not result.val_loss < prod_loss:
            return "refused", (f"validation loss {result.val_loss:.4f} is not below Production v{before}'s "
                               f"{prod_loss:.4f} on the same {len(result.prepared.validation)} validation trades")
        reason = ("nothing in Production: first adapter" if before is None else
                  f"validation loss {result.val_loss:.4f} < Production v{before}'s {prod_loss:.4f} on the same "
                  f"{len(result.prepared.validation)} validation trades")
        promote(name, result.version, reason, {"val_loss": result.val_loss}, lock_file=cfg.promotion.lock_file)
        return "promoted", reason


def merge(cfg: Config, version: str, out: str) -> Path:
    """Base + adapter of ``nt8-reasoner`` ``version`` merged into one model folder (full precision:
    a merged model is for serving elsewhere, e.g. converted to GGUF for Ollama)."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{cfg.finetune.register_model}/{version}"))
    model, tokenizer = load_adapter_model(local, "none")
    merged = model.merge_and_unload()
    target = Path(out)
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    log.info("merged %s v%s (base %s) into %s", cfg.finetune.register_model, version, adapter_base(local), target)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--base-model", default="", help="hub id, local folder or tiny (default: finetune.base_model)")
    parser.add_argument("--data", default="", help="folder with train.jsonl and validation.jsonl (default: prepare "
                        "from the experience buffer)")
    parser.add_argument("--max-steps", type=optional_int, default=None, help="default: finetune.max_steps")
    parser.add_argument("--lora-r", type=optional_int, default=None, help="default: finetune.lora_r")
    parser.add_argument("--quantization", default="", choices=["", "4bit", "8bit", "none"],
                        help="default: finetune.quantization")
    parser.add_argument("--prepare-only", action="store_true", help="write the JSONL datasets and stop")
    parser.add_argument("--merge", default="", metavar="VERSION", help="merge this nt8-reasoner version into --out")
    parser.add_argument("--out", default="", help="--merge: the folder to write")
    return parser


def _cli(cfg: Config, args: argparse.Namespace) -> None:
    if args.merge:
        if not args.out:
            raise ValueError("--merge needs --out FOLDER")
        setup_tracking(cfg)
        print(merge(cfg, args.merge, args.out))
        return
    result = main(cfg, args.base_model or None, args.data or None, args.max_steps, args.lora_r,
                  args.quantization or None, args.prepare_only)
    print(f"{result.decision}: {cfg.finetune.register_model} v{result.version}" if result.version
          else f"prepared {result.prepared.train_path} and {result.prepared.validation_path}")


if __name__ == "__main__":
    run_cli(build_parser(), _cli)
