"""What a retrain says it is about to do before it starts (it may take hours)."""

from __future__ import annotations

import shlex
from pathlib import Path

from conftest import ROOT

from mlproject.config import load_config
from mlproject.policy import PolicySettings
from mlproject.cycle.production import ProductionModel, retrain_plan, settings_mismatch


def test_a_retrain_on_other_settings_than_production_says_it_trains_from_scratch_and_how_to_continue():
    """After the demo Production is an MES model with window 16; the default config is ES with
    window 32: the plan names both, the budget, "from scratch", and a --set that continues it."""
    demo, default = load_config(ROOT / "conf" / "smoke.yaml"), load_config(None)
    network = {"hiddens": list(demo.train.hiddens), "activation": demo.train.activation}
    why = settings_mismatch(PolicySettings.from_env(demo.env), default, network)
    plan = retrain_plan(default, ProductionModel("5", "models:/nt8-agent/5", Path("."), False, why))
    assert plan.startswith("Production nt8-agent v5 trades MES with window 16, max_contracts 2; this config is ES "
                           "with window 32, max_contracts 1; train.hiddens [32, 32] vs [64, 64] (model vs config): "
                           "training a NEW model from scratch (200 iterations of 4,000 steps), not a warm start. "
                           "To continue the deployed model use the config it was trained with, e.g. --set "), plan
    words = shlex.split(plan.split("e.g. ", 1)[1])
    fix = [w for k, w in enumerate(words) if k % 2 == 1 and words[k - 1] == "--set"]
    assert fix == ["env.window=16", "env.instrument.preset=MES", "env.instrument.max_contracts=2",
                   "train.hiddens=[32,32]"], plan
    assert "train.hiddens [32, 32] vs [64, 64] (model vs config)" in plan
    continued = load_config(None, fix)  # the suggestion does continue it (the same rule as train --init-from)
    assert settings_mismatch(PolicySettings.from_env(demo.env), continued, network) == ""
    warm = ProductionModel("5", "models:/nt8-agent/5", Path("."), True)
    assert retrain_plan(continued, warm) == "warm start from Production nt8-agent v5 (200 iterations of 4,000 steps)"
    assert retrain_plan(demo, None) == "nothing in Production: training a first model from scratch (3 iterations of 512 steps)"
