"""QLoRA fine-tuning of the reasoner, the nt8-reasoner registry and the reasoning engine, on a
tiny R1-shaped Llama built locally (real transformers, PEFT, TRL and bitsandbytes 4-bit)."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, run_module
from mlproject.config import load_config
from mlproject.experience import ExperienceBuffer
from mlproject.reasoner.chat import BOS, THINK_CLOSE, completion_text, parse_reply, r1_prompt, render_prompt
from mlproject.reasoner.data import prepare, read_jsonl, trade_examples
from mlproject.reasoner.tiny import build_tiny_model
from mlproject.reflection import PROMPT, annotate_trades

OBS = 4 * 5 + 2  # window 4, five features per bar, then the account


def trades_buffer(root, n_trades: int, duplicate: int = 0) -> ExperienceBuffer:
    """``n_trades`` closed three-bar trades (winners and losers), annotated by the rules; the first
    ``duplicate`` trades are recorded twice (same bars and outcome, another trade id: a replay)."""
    rows = []
    start = pd.Timestamp("2024-01-02 14:30", tz="UTC")
    for k in list(range(n_trades)) + list(range(duplicate)):
        side = 1 if k % 2 == 0 else -1
        pnl = 125.0 if k % 3 else -75.0  # 0.125% and 0.075% of the account
        obs = np.random.default_rng(k).standard_normal(OBS).astype(np.float32)  # a duplicate: the same market
        for j, position in enumerate((side, side, 0)):
            rows.append({"experience_id": f"t{k}-{len(rows)}", "time": start + pd.Timedelta(minutes=10 * k + j),
                         "symbol": "MES", "bar_period": "1min", "model_name": "nt8-agent", "model_version": "1",
                         "observation": obs, "action": 2 + position, "reward": 0.0, "next_observation": obs,
                         "terminated": False, "truncated": False, "position": position,
                         "equity": 100_000.0 + (pnl if j == 2 else 0.0), "trade_id": f"trade-{len(rows) // 3}",
                         "realised_pnl": pnl if j == 2 else 0.0, "source": "paper"})
    buffer = ExperienceBuffer(root)
    buffer.add(rows)
    buffer.flush()
    buffer.annotate(annotate_trades(buffer.query(columns=None)))
    return buffer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base")


def _cfg(tmp_path, tiny, **extra):
    settings = {"finetune.base_model": str(tiny), "finetune.output_dir": str(tmp_path / "ft"), "finetune.max_steps": 6,
                "finetune.batch_size": 4, "finetune.gradient_accumulation": 1, "finetune.learning_rate": 0.01,
                "finetune.eval_steps": 3, "finetune.max_length": 320, "finetune.lora_r": 4,
                "finetune.max_new_tokens": 12, "continuous_learning.experience_storage": str(tmp_path / "buffer"),
                "promotion.lock_file": str(tmp_path / "registry.lock"), **extra}
    return load_config(ROOT / "conf" / "smoke.yaml", [f"{k}={v}" for k, v in settings.items()])


def test_the_dataset_keeps_the_reasoning_in_the_targets_one_bos_and_splits_by_time(tmp_path, tiny):
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny)
    buffer = trades_buffer(tmp_path / "buffer", 10, duplicate=2)
    prepared = prepare(buffer, tmp_path / "ft", min_quality=0.0, validation_fraction=0.2, min_examples=4)
    assert prepared.dropped == {"below_quality": 0, "duplicates": 2}
    assert (len(prepared.train), len(prepared.validation)) == (8, 2)
    assert prepared.train["time"].max() < prepared.validation["time"].min()  # newest trades validate
    first = read_jsonl(prepared.train_path).iloc[0]
    assert first["prompt"].startswith("<｜User｜>You review one closed futures trade")  # BOS text dropped ...
    assert first["prompt"].endswith("<｜Assistant｜><think>\n")  # ... generation prompt kept
    assert THINK_CLOSE in first["completion"] and first["completion"].split(THINK_CLOSE)[1].strip().startswith("LESSON:")
    # The official template would strip the reasoning from an assistant turn; the pairs keep it.
    chat = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "why</think>a"}],
                                   tokenize=False)
    assert "why" not in chat
    # Through TRL's own tokenisation: one BOS per sequence, the reasoning inside the loss targets.
    from datasets import Dataset

    args = SFTConfig(output_dir=str(tmp_path / "o"), completion_only_loss=True, max_length=512, report_to="none",
                     use_cpu=True, bf16=False)
    # The data is prepared with no tokenizer; the prompts are what the tokenizer's own chat
    # template renders (how they were made before), so training sees the same token sequences.
    facts = trade_examples(buffer)["facts"]
    assert [r1_prompt(PROMPT.format(facts=f)) for f in facts] == [render_prompt(tok, PROMPT.format(facts=f))
                                                                    for f in facts]
    with_tokenizer = prepared.train.assign(prompt=[render_prompt(tok, PROMPT.format(facts=f))
                                                   for f in prepared.train["facts"]])
    trainer = SFTTrainer(model=str(tiny), args=args, processing_class=tok,
                         train_dataset=Dataset.from_pandas(prepared.train[["prompt", "completion"]]),
                         eval_dataset=Dataset.from_pandas(with_tokenizer[["prompt", "completion"]]))
    assert trainer.train_dataset.to_list() == trainer.eval_dataset.to_list()
    example = trainer.train_dataset[0]
    assert example["input_ids"].count(tok.bos_token_id) == 1 and example["input_ids"][0] == tok.bos_token_id
    targets = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    reasoning = prepared.train["completion"].iloc[0].split(THINK_CLOSE)[0].strip()
    assert reasoning and reasoning in tok.decode(targets)
    assert "You review" not in tok.decode(targets)  # the prompt is not trained on
    with pytest.raises(ValueError, match="min_examples = 50"):
        prepare(buffer, tmp_path / "ft2", 0.0, 0.2, 50)
    assert len(prepare(buffer, tmp_path / "ft3", 0.7, 0.2, 2).train) < len(prepared.train)  # quality filter


def test_qlora_steps_change_every_lora_parameter_and_lower_the_loss(tmp_path, tiny):
    import torch
    from transformers import TrainerCallback

    from mlproject.reasoner.engine import load_base, load_tokenizer
    from pipelines import finetune

    cfg = _cfg(tmp_path, tiny, **{"finetune.max_steps": 12})
    trades_buffer(tmp_path / "buffer", 8)
    tok = load_tokenizer(str(tiny))
    prepared = prepare(ExperienceBuffer(tmp_path / "buffer"), tmp_path / "ft", 0.0, 0.25, 4)
    base, _ = load_base(str(tiny), "4bit")
    assert "4bit" in type(base.model.layers[0].self_attn.q_proj).__name__  # bitsandbytes Linear4bit
    before_loss = finetune.completion_loss(base, tok, prepared.train, 320)
    start: dict[str, torch.Tensor] = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            start.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    model, tok = finetune.train_adapter(cfg, str(tiny), prepared, tmp_path / "work", [], (Snapshot(),))
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert start and set(after) == set(start) and all("lora_" in n for n in start)
    assert [n for n in start if torch.equal(start[n], after[n])] == []
    assert finetune.completion_loss(model, tok, prepared.train, 320) < before_loss - 0.05


def test_adapters_register_promote_on_validation_loss_reload_and_merge(tmp_path, tiny, mlflow_store):
    from mlproject.registry import history, production_version
    from pipelines import finetune

    trades_buffer(tmp_path / "buffer", 10)
    from mlproject.reasoner.engine import ReasoningEngine

    first = finetune.main(_cfg(tmp_path, tiny, **{"finetune.max_steps": 2}))
    assert (first.version, first.decision) == ("1", "promoted")
    engine = ReasoningEngine(max_new_tokens=4, check_every_s=0.0, seed=0)
    engine.generate("long 1 MES")
    assert engine.version == "1"
    better = finetune.main(_cfg(tmp_path, tiny, **{"finetune.max_steps": 10}))
    assert better.val_loss < first.val_loss and better.production_val_loss == pytest.approx(first.val_loss, rel=1e-4)
    assert (better.version, better.decision) == ("2", "promoted")
    engine.generate("long 1 MES")
    assert engine.version == "2"  # the promoted adapter is used at the next reflection
    worse = finetune.main(_cfg(tmp_path, tiny, **{"finetune.max_steps": 2}))
    assert worse.decision == "refused" and "is not below Production v2" in mlflow.get_run(worse.run_id).data.tags["reasons"]
    assert production_version("nt8-reasoner") == "2" and [e["version"] for e in history("nt8-reasoner")] == ["1", "2"]
    # The review archives the refused adapter (never Production nor its rollback target).
    from pipelines import orchestrate

    reviewed = orchestrate.main(_cfg(tmp_path, tiny, **{"continuous_learning.state_dir": str(tmp_path / "state")}),
                                "review").review
    assert reviewed.archived_reasoner == ["3"]
    assert mlflow.MlflowClient().get_model_version("nt8-reasoner", "3").current_stage == "Archived"
    run = mlflow.get_run(better.run_id)
    assert {"finetune/loss", "finetune/eval_loss", "finetune/tokens_per_s", "finetune/peak_rss_mb",
            "finetune/val_loss"} <= set(run.data.metrics)
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"reasoner-train", "reasoner-validation"}
    mv = mlflow.MlflowClient().get_model_version("nt8-reasoner", "2")
    assert mv.tags["base_model"] == str(tiny)
    local = mlflow.artifacts.download_artifacts("models:/nt8-reasoner/2")
    assert not (pd.io.common.Path(local) / "model").exists()  # adapter only: the base is referenced

    # A fresh process: the engine loads the Production adapter on its base and generates.
    script = ("import json, sys, mlflow; mlflow.set_tracking_uri(sys.argv[1]); "
              "from mlproject.reasoner.engine import ReasoningEngine; e = ReasoningEngine(max_new_tokens=8, seed=0); "
              "r = e.generate('long 1 MES'); print(json.dumps({'v': e.version, 'answer': r.answer, 'reasoning': r.reasoning}))")
    out = run_module(["python", "-c", script, mlflow_store], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    reply = json.loads(out.stdout.strip().splitlines()[-1])
    assert reply["v"] == "2" and (reply["answer"] or reply["reasoning"])

    # The engine as the buffer's annotator: the tiny model cannot answer in the LESSON/QUALITY
    # form, so each trade keeps the rules' note, marked as a fallback.
    from mlproject.reflection import closed_trades, reflect
    from pipelines import annotate

    llm = annotate.annotator(_cfg(tmp_path, tiny, **{"annotation.annotator": "reasoner"}))
    trade = closed_trades(ExperienceBuffer(tmp_path / "buffer").query(columns=None))[0]
    note = llm.reflect(trade, reflect(trade, 1.0, 0.7, 0.3), 0.7, 0.3)
    assert llm.engine.version == "2" and note["annotator"].startswith("rules (fallback: ValueError")

    # Merge: base + adapter as one folder that computes what the adapter on its base computes.
    import torch
    from transformers import AutoModelForCausalLM

    from mlproject.reasoner.engine import load_adapter_model

    cfg = _cfg(tmp_path, tiny)
    merged = AutoModelForCausalLM.from_pretrained(finetune.merge(cfg, "2", str(tmp_path / "merged")))
    adapted, tok = load_adapter_model(pd.io.common.Path(local), "none")
    ids = tok("long 1 MES held 3 bars", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_the_engine_parses_think_blocks_and_answers_without_one():
    assert parse_reply("The trend was up.\n</think>\n\nLESSON: keep\nQUALITY: 0.80<｜end▁of▁sentence｜>") == \
        parse_reply("<think>\nThe trend was up.</think>LESSON: keep\nQUALITY: 0.80")
    full = parse_reply("<think>The trend was up.</think>LESSON: keep")
    assert (full.reasoning, full.answer, full.closed) == ("The trend was up.", "LESSON: keep", True)
    bare = parse_reply("LESSON: no reasoning at all\nQUALITY: 0.5")
    assert (bare.reasoning, bare.answer) == ("", "LESSON: no reasoning at all\nQUALITY: 0.5")
    cut = parse_reply("<think>still thinking when the tokens ran out")
    assert (cut.reasoning, cut.answer, cut.closed) == ("still thinking when the tokens ran out", "", False)
    assert completion_text(" why ", " LESSON: x ") == "why\n</think>\n\nLESSON: x"


def test_the_rendered_prompt_has_one_bos(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    text = render_prompt(tok, "q")
    assert not text.startswith(BOS) and tok(text)["input_ids"].count(tok.bos_token_id) == 1


def test_finetune_entry_point_through_mlflow_run(tmp_path, tiny, mlflow_store):
    from pipelines import finetune

    cfg = _cfg(tmp_path, tiny)
    trades_buffer(tmp_path / "buffer", 8)
    prepared = finetune.main(cfg, prepare_only=True).prepared  # --prepare-only
    assert prepared.validation_path == tmp_path / "ft" / "validation.jsonl" and len(read_jsonl(prepared.validation_path)) == 2
    out = run_module(["mlflow", "run", str(ROOT), "-e", "finetune", "--env-manager", "local", "-P", f"base_model={tiny}",
                      "-P", f"data={tmp_path / 'ft'}", "-P", "max_steps=2", "-P", "lora_r=4", "-P", "quantization=4bit",
                      "-P", f"overrides=finetune.batch_size=4 finetune.max_length=320 finetune.eval_steps=1 "
                      f"promotion.lock_file={tmp_path / 'registry.lock'} mlflow.tracking_uri={mlflow_store}"],
                     tmp_path, env={"MLFLOW_TRACKING_URI": mlflow_store})
    assert out.returncode == 0, out.stderr[-3000:]
    assert mlflow.MlflowClient().get_model_version("nt8-reasoner", "1").current_stage == "Production"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        finetune.main(cfg, data=str(tmp_path / "nowhere"))


def test_a_cycle_without_the_base_model_skips_fine_tuning_and_says_why(tmp_path, tiny, mlflow_store):
    from mlproject.cycle.state import CycleState
    from pipelines import orchestrate

    trades_buffer(tmp_path / "buffer", 6)
    cfg = _cfg(tmp_path, tiny, **{"finetune.base_model": "someone/not-downloaded-8B",
                                  "continuous_learning.state_dir": str(tmp_path / "state")})
    result = orchestrate.main(cfg, "finetune", force=True)
    assert result.finetune.status.startswith("skipped: base model 'someone/not-downloaded-8B' is not on this machine")
    assert "`hf download someone/not-downloaded-8B` (into the Hugging Face cache)" in \
        mlflow.get_run(result.run_id).data.tags["cycle.finetune"]
    assert "finetune" not in CycleState(tmp_path / "state").data  # the watermark did not move


def test_prepare_only_needs_no_model_and_a_real_run_says_how_to_download_it(tmp_path, mlflow_store):
    from mlproject.reasoner.engine import ReasonerUnavailable
    from pipelines import finetune

    trades_buffer(tmp_path / "buffer", 8)
    missing = tmp_path / "no-such-base"
    sets = {"finetune.base_model": str(missing), "finetune.output_dir": str(tmp_path / "ft"),
            "continuous_learning.experience_storage": str(tmp_path / "buffer")}
    out = run_module(["python", "-m", "pipelines.finetune", "--prepare-only", "--config", str(ROOT / "conf" / "smoke.yaml"),
                      *sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])], tmp_path,
                     env={"MLFLOW_TRACKING_URI": mlflow_store})
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "ft" / "train.jsonl")) == 6 and len(read_jsonl(tmp_path / "ft" / "validation.jsonl")) == 2
    assert not missing.exists()
    cfg = load_config(ROOT / "conf" / "smoke.yaml", [f"{k}={v}" for k, v in sets.items()])
    with pytest.raises(ReasonerUnavailable, match=f"`hf download deepseek-ai/DeepSeek-R1-Distill-Llama-8B "
                                                  f"--local-dir {missing}`"):
        finetune.main(cfg)
