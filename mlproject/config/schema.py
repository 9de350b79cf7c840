"""The run configuration's schema: one typed, validated model per section of ``conf/*.yaml``.

The model defaults *are* the embedded defaults and each field's docstring is its documentation:
``docs/configuration.md`` is generated from them (``python -m mlproject.config.reference``).
``extra="forbid"`` and ``strict=True`` make a misspelt key or a wrong type an error;
:mod:`mlproject.config.loading` turns those errors into messages that name the key, the file and
the line.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from mlproject.config.base import _Strict
from mlproject.config.live import BridgeConfig, MonitoringConfig
from mlproject.config.values import check_time_zone, flatten, parse_duration
from mlproject.instruments import resolve_instrument


class InstrumentConfig(_Strict):
    """A futures contract: a preset name (``ES``), or every field below, or a preset plus the
    fields that differ from it. Fields without a preset must be complete: a partial spec is an
    error naming the missing fields (it never inherits the default ES silently)."""

    preset: str | None = None
    """Name of a preset in ``mlproject.instruments.PRESETS`` whose values the fields below override."""
    symbol: str | None = None
    """Display symbol; defaults to the preset name. Another preset's name is an error (use that preset)."""
    tick_size: float | None = Field(default=None, gt=0)
    """Minimum price increment."""
    point_value: float | None = Field(default=None, gt=0)
    """Money per 1.0 price point per contract."""
    commission_per_side: float | None = Field(default=None, ge=0)
    """Commission and fees per contract per side, in money."""
    slippage_ticks: float | None = Field(default=None, ge=0)
    """Slippage assumed on every fill, in ticks against the trader."""
    max_contracts: int | None = Field(default=None, ge=1)
    """Largest absolute position; the action space is {-max..+max} contracts."""

    @model_validator(mode="after")
    def _resolvable(self) -> InstrumentConfig:
        resolve_instrument(self)  # unknown preset / missing custom fields -> error naming them
        return self


class EnvConfig(_Strict):
    """Settings of ``envs.FuturesTradingEnv`` (RLlib passes them, plus ``bars``, as ``env_config``)."""

    instrument: InstrumentConfig = Field(default_factory=lambda: InstrumentConfig(preset="ES"))
    """Preset name (ES, MES, NQ, ... see ``mlproject.instruments.PRESETS``) or a mapping of instrument fields."""
    window: int = Field(default=32, ge=1)
    """Bars of features in one observation."""
    vol_window: int = Field(default=20, ge=2)
    """Trailing bars for the volume z-score."""
    norm_window: int = Field(default=100, ge=2)
    """Trailing bars of returns used to normalise return and range features."""
    feature_set: Literal["base", "multi_timeframe", "trader"] = "base"
    """``multi_timeframe`` adds the newest bar's 5- and 15-bar returns and a volatility regime
    (``mlproject.features.CONTEXT_NAMES``); ``trader`` adds to those the bars the open trade has
    lasted (``bars_in_trade``); models record their set and run with it."""
    episode_bars: int | None = Field(default=None, ge=1)
    """Bars per episode; None means from the start bar to the end of the data."""
    random_start: bool = True
    """Draw the episode start from the env's seeded generator; False starts at the first usable bar."""
    max_episode_steps: int | None = Field(default=None, ge=1)
    """Truncate the episode after this many steps."""
    initial_equity: float = Field(default=100_000.0, gt=0)
    """Account equity at reset, in money."""
    equity_floor_fraction: float = Field(default=0.5, ge=0, lt=1)
    """Terminate when equity falls below this fraction of the initial equity."""
    reward_scale: float = Field(default=1.0, gt=0)
    """Reward = reward_scale * (equity change - risk penalty)."""
    risk_penalty: float = Field(default=0.0, ge=0)
    """Extra weight on every increase of the drawdown from the equity peak (0 = pure PnL): the
    drawdown-penalised reward (with ``reward: money``)."""
    reward: Literal["money", "differential_sharpe"] = "money"
    """What training maximises per step: ``money`` (the equity change, less the risk penalty) or
    ``differential_sharpe`` (Moody and Saffell's differential Sharpe ratio of the step's return:
    each step's contribution to an exponentially weighted Sharpe ratio). Evaluation and the gate
    stay in money either way."""
    dsr_eta: float = Field(default=0.01, gt=0, lt=1)
    """Adaptation rate of the differential Sharpe ratio's moving moments (about 1/eta steps)."""

    @model_validator(mode="after")
    def _one_risk_term(self) -> EnvConfig:
        if self.reward == "differential_sharpe" and self.risk_penalty:
            raise ValueError("env.risk_penalty penalises the money reward; with env.reward=differential_sharpe "
                             "set it to 0")
        return self

    @field_validator("instrument", mode="before")
    @classmethod
    def _preset_name(cls, value: Any) -> Any:
        return {"preset": value} if isinstance(value, str) else value


class SyntheticConfig(_Strict):
    """Seeded synthetic futures bars (``mlproject.data.synthetic_bars``)."""

    momentum: float | None = Field(default=None, ge=0, le=1)
    """Instead of the regime model: 1-minute bars with a planted signal, each following the previous
    bar's direction with this probability (``mlproject.data.momentum_bars``); null: the regime model."""
    momentum_flip_at: float | None = Field(default=None, gt=0, lt=1)
    """With ``momentum``: the fraction of the bars after which the signal reverses (a drifting market)."""

    n_bars: int = Field(default=20_000, ge=10)
    """Number of bars."""
    seed: int = 0
    """Generator seed."""
    bar_minutes: int = Field(default=1, ge=1)
    """Bar period in minutes."""
    tick_size: float = Field(default=0.25, gt=0)
    """Prices are rounded to this tick."""
    start_price: float = Field(default=4500.0, gt=0)
    """First price."""
    start: str = "2024-01-02"
    """First session date."""
    annual_vol: float = Field(default=0.18, gt=0)
    """Average annualised volatility."""


class SplitConfig(_Strict):
    """Time-ordered train / validation / test fractions."""

    train: float = Field(default=0.7, ge=0, le=1)
    """Share of the bars, oldest first, that trains the policy."""
    validation: float = Field(default=0.15, ge=0, le=1)
    """Share after the train split that picks the best checkpoint."""
    test: float = Field(default=0.15, ge=0, le=1)
    """Newest share: held-out evaluation and the promotion gate."""
    gap: int = Field(default=0, ge=0)
    """Bars dropped between consecutive splits (embargo)."""

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"train + validation + test must be 1, got {total:g}")
        return self


class DataChecksConfig(_Strict):
    """Warnings (never errors) when the bars do not look like the configured instrument."""

    max_tick_value_fraction: float = Field(default=0.001, gt=0)
    """Warn when one tick of max_contracts is worth more than this fraction of the initial equity."""
    max_daily_move_fraction: float = Field(default=0.2, gt=0)
    """Warn when a typical day's move on max_contracts (the median bar's close-to-close move,
    scaled to a day by the square root of bars per day) is worth more than this fraction of the
    initial equity: an ES spec on BTC prices, say (ES on ES moves about 1.5% of 100,000 a day)."""
    off_grid_fraction: float = Field(default=0.01, ge=0, le=1)
    """Warn when more than this fraction of the prices is off the instrument's tick grid."""


class IntakeConfig(_Strict):
    """New market data dropped into a folder, picked up by the orchestrator's maintenance."""

    folder: str | None = None
    """Where new NT8 exports (or CSV/Parquet bar files) are dropped; None: no intake. Each file is
    taken once (by content digest): merged into ``history`` and moved to ``<folder>/ingested/``,
    or, when it does not validate, moved to ``<folder>/rejected/`` with ``<name>.error.txt``."""
    history: str = "data/history/bars.parquet"
    """The instrument's merged bar history (Parquet). Once it exists, the cycle trains and
    evaluates on it instead of ``data.source``."""
    settle_seconds: float = Field(default=30.0, ge=0)
    """A file modified more recently than this is left for the next pass (still being copied)."""


class DataConfig(_Strict):
    """Where the bars come from and how they are read."""

    source: str = "synthetic"
    """A bar file (NT8 export, CSV, Parquet) or 'synthetic'."""
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    """Used when source is 'synthetic'."""
    tick_period: str = "1min"
    """Bar period for NT8 tick files (a pandas offset alias)."""
    drop_duplicates: bool = False
    """Explicit repair: drop exact duplicate lines (logged) instead of failing."""
    tz: str | None = None
    """Time zone of the timestamps in the file; None keeps them naive."""
    splits: SplitConfig = Field(default_factory=SplitConfig)
    """Train / validation / test split."""
    output_dir: str = "data/bars"
    """Where ingest writes normalised Parquet."""
    checks: DataChecksConfig = Field(default_factory=DataChecksConfig)
    """Does the data fit the instrument (warnings)."""
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    """New exports dropped into a folder (``data.intake.folder``)."""

    @field_validator("tick_period")
    @classmethod
    def _pandas_offset(cls, value: str) -> str:
        import pandas as pd

        try:
            pd.tseries.frequencies.to_offset(value)
        except ValueError:
            raise ValueError(f"tick_period {value!r} is not a pandas offset alias such as 1min, 5min, 1h") from None
        return value

    @field_validator("tz")
    @classmethod
    def _time_zone(cls, value: str | None) -> str | None:
        return check_time_zone(value, "tz")


class TrainConfig(_Strict):
    """RLlib training (``pipelines.train``): algorithm, hyper-parameters, resources, selection."""

    algorithm: str = "PPO"
    """RLlib algorithm; PPO is the one supported and tested."""
    iterations: int = Field(default=200, ge=1)
    """Training iterations (each samples train_batch_size env steps)."""
    hiddens: list[int] = Field(default_factory=lambda: [64, 64])
    """Hidden layer sizes of the policy and value networks."""
    activation: Literal["tanh", "relu", "silu"] = "tanh"
    """Hidden activation: tanh, relu, silu."""
    train_batch_size: int = Field(default=4000, ge=1)
    """Env steps per training iteration (per learner)."""
    minibatch_size: int = Field(default=128, ge=1)
    """SGD minibatch size."""
    num_epochs: int = Field(default=4, ge=1)
    """SGD passes over each train batch."""
    lr: float = Field(default=3e-4, gt=0)
    """Adam learning rate."""
    gamma: float = Field(default=0.99, ge=0, le=1)
    """Discount factor."""
    gae_lambda: float = Field(default=0.95, ge=0, le=1)
    """GAE lambda."""
    entropy_coeff: float = Field(default=0.0, ge=0)
    """Entropy bonus."""
    clip_param: float = Field(default=0.2, gt=0)
    """PPO ratio clip."""
    vf_clip_param: float = Field(default=10.0, gt=0)
    """Clip of the value-function loss (in scaled-reward units)."""
    use_kl_loss: bool = True
    """RLlib PPO's adaptive KL penalty on top of the clipped objective (RLlib's default); false
    leaves the clipped objective alone, as Stable-Baselines3's PPO has it."""
    reward_scale: float = Field(default=0.01, gt=0)
    """Extra reward multiplier while training only, for the money reward (PPO's value function
    learns best on rewards of order 1; a 1-lot ES bar moves tens of dollars). Backtests report money."""
    train_episode_bars: int | None = Field(default=1000, ge=2)
    """Bars per training episode (random windows of the train split); null = to the end."""
    num_env_runners: int = Field(default=0, ge=0)
    """Remote env-runner actors; 0 samples in the driver (best on 2 cores)."""
    num_envs_per_env_runner: int = Field(default=8, ge=1)
    """Envs per runner, stepped as one numpy vector env."""
    use_gpu: bool | None = None
    """GPU learner: None = when torch sees a GPU, true = require one, false = CPU."""
    ray_address: str | None = None
    """Join this Ray cluster (RAY_ADDRESS in the environment also works); null = start a local Ray."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs for a local Ray; null = all."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Torch threads in the training process; null = torch's default. 1 is faster for the small
    default networks on a 2-core machine (benchmarks/train_throughput.py --threads 1)."""
    eval_every: int = Field(default=5, ge=1)
    """Run the validation backtest every K iterations."""
    val_windows: int = Field(default=8, ge=1)
    """The validation backtest plays this many equal windows of the validation split; the best
    checkpoint is the one with the best median of val_metric over them (one long window let a
    single lucky stretch pick the checkpoint)."""
    val_metric: Literal["sharpe", "sortino", "total_return", "profit_factor", "calmar"] = "sharpe"
    """Validation metric that picks the best checkpoint: sharpe, sortino, total_return, profit_factor, calmar."""
    patience: int = Field(default=50, ge=1)
    """Stop after this many iterations without a better validation metric."""
    register_model: str = "nt8-agent"
    """Registered model that gets a new version per training run ('' = do not register)."""
    ensemble: int = Field(default=1, ge=1, le=16)
    """Policies trained per run (seeds seed, seed+1000, ..., one after another in one Ray session, each
    selected on validation as usual); K > 1 registers one model acting on their mean logits (the
    bridge, evaluation and the gate see one model; each member's curves are a nested run)."""

    @model_validator(mode="after")
    def _patience_covers_an_evaluation(self) -> TrainConfig:
        if self.patience < self.eval_every:
            raise ValueError(f"patience ({self.patience}) must be >= eval_every ({self.eval_every}): "
                             "otherwise training stops before the next validation can show an improvement")
        return self

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        if value.upper() != "PPO":
            raise ValueError(f"algorithm {value!r} is not supported; supported: PPO")
        return value.upper()



GateMetric = Literal["sharpe", "sortino", "calmar", "psr", "total_return", "annual_return", "profit_factor",
                     "win_rate", "expectancy", "payoff_ratio", "max_drawdown", "annual_volatility"]
"""Metrics the promotion gate can compare (``mlproject.metrics.trading_metrics`` keys)."""


DEFAULT_TUNE_SPACE: dict[str, list[Any]] = {
    "train.lr": [1.0e-4, 3.0e-4, 1.0e-3],
    "train.gamma": [0.9, 0.99],
    "train.entropy_coeff": [0.0, 0.01],
    "env.window": [16, 32],
    "env.feature_set": ["base", "multi_timeframe", "trader"],
    "env.reward": ["money", "differential_sharpe"],
    "continuous_learning.retrain_history_bars": [None, 2000],
}


class TuneConfig(_Strict):
    """The tracked search (``pipelines.tune``, ``mlflow run . -e tune``): Ray Tune with ASHA over
    ``space``; each trial trains PPO as ``pipelines.train`` does and is scored on the validation
    split's folds (never the test split); each is a nested MLflow run."""

    num_samples: int = Field(default=8, ge=1)
    """Trials; each draws every setting of ``space`` at random."""
    grace_period: int = Field(default=10, ge=1)
    """ASHA: training iterations every trial gets before it may be stopped (at most train.iterations)."""
    reduction_factor: int = Field(default=3, ge=2)
    """ASHA: at each rung only the best 1/reduction_factor of the trials go on."""
    max_concurrent: int | None = Field(default=None, ge=1)
    """Trials trained at once (null: as many as the Ray session's CPUs allow, cpus_per_trial each)."""
    cpus_per_trial: float = Field(default=1.0, gt=0)
    """CPUs one trial holds (it samples and learns in its own process)."""
    space: dict[str, list[Any]] = Field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_TUNE_SPACE.items()})
    """Setting (a dotted key of this config) -> the values a trial draws from. A file or ``--set
    tune.space.train.lr=[0.0001,0.001]`` changes or adds keys; one value pins a setting for every
    trial. ``continuous_learning.retrain_history_bars`` is the training history: a trial trains on
    the newest that many bars of the train split (null: all)."""

    @field_validator("space", mode="before")
    @classmethod
    def _dotted(cls, value: Any) -> Any:
        # --set tune.space.train.lr=[...] arrives nested ({"train": {"lr": [...]}}): one dotted key.
        return flatten(value) if isinstance(value, dict) else value

    @field_validator("space")
    @classmethod
    def _choices(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [key for key, choices in value.items() if not choices]
        if empty:
            raise ValueError(f"tune.space.{empty[0]} has no values to draw from")
        return value


class PromotionConfig(_Strict):
    """The promotion gate (``pipelines.promote``) and the deploy target (``registry_hooks``)."""

    model_name: str = Field(default="nt8-agent", min_length=1)
    """Registered model that deploys."""
    metric: GateMetric = "sharpe"
    """Evaluation metric (mean over windows) the challenger must improve (drawdown, volatility and
    cost metrics: lower is better)."""
    min_improvement: float = Field(default=0.0, ge=0)
    """The challenger must beat Production on ``metric`` by more than this (metric units)."""
    min_psr: float = Field(default=0.5, ge=0, le=1)
    """Probabilistic Sharpe Ratio of the challenger's per-bar returns against Production's Sharpe."""
    min_dsr: float = Field(default=0.5, ge=0, le=1)
    """Deflated Sharpe Ratio against Production's Sharpe: the PSR with the benchmark raised by the
    best Sharpe that as many no-skill tries would show by luck, counting every candidate tried for
    this registered model (validated checkpoints of every retrain: ``gate/trials``). 0: off."""
    min_window_share: float = Field(default=0.6, ge=0, le=1)
    """Share of the evaluation windows (consecutive recent folds, each traded only after its own
    observation window of bars: an embargo from the training bars) in which the challenger's return
    must beat Production's: a clear majority, not one lucky stretch. 0: off."""
    max_drawdown: float = Field(default=0.25, gt=0, le=1)
    """Worst window's maximum drawdown (fraction) the challenger may have."""
    min_trades: int = Field(default=10, ge=0)
    """Closed trades the challenger must make over all evaluation windows."""
    beat_flat: bool = True
    """Quality floor: every candidate, the first one included, must also beat flat (no trading:
    0 on ``metric``, a Sharpe of 0, a return of 0 in each window) by the rules ``beat_flat_by``
    names."""
    beat_flat_by: Literal["all", "psr"] = "all"
    """``all``: every rule it must beat Production by (``metric``, PSR, Deflated Sharpe over the
    candidates tried, windows won); ``psr``: ``metric`` and the PSR only (the gate before
    2026-12-04: every promotion regret measured on the real series was a first model let in by it)."""
    shadow_bars: int = Field(default=0, ge=0)
    """Live evidence before Production: a challenger that passes the gate goes to the **Staging**
    stage (alias ``staging``) and shadow-trades beside Production in the bridge (its decisions
    recorded as experiences with source ``shadow``, never sent) until maintenance compares the two
    on at least this many same live bars (and ``shadow_min_trades``); better goes to Production,
    otherwise Staging is archived. 0: a passing challenger goes straight to Production."""
    shadow_min_trades: int = Field(default=5, ge=0)
    """Closed shadow trades the live comparison needs besides ``shadow_bars``."""
    shadow_min_dsr: float | None = Field(default=None, ge=0, le=1)
    """The Deflated Sharpe the live comparison asks of the shadow over the candidates tried
    (against Production's per-bar Sharpe on the same bars); null: ``min_dsr``; 0: off."""
    lock_file: str | None = None
    """Cross-process lock of registry writes and reconciles; null: beside a sqlite store (or in
    the temp folder for a server). Writers on several machines name a file in a shared folder."""
    deploy_dir: str = "deploy"
    """Where registry_hooks.reconcile exports the Production model."""
    keep_releases: int = Field(default=3, ge=2)
    """Exported releases kept in deploy_dir (current and previous at least)."""


class MlflowConfig(_Strict):
    """Tracking settings; MLFLOW_TRACKING_URI in the environment wins over tracking_uri."""

    tracking_uri: str | None = None
    """None: MLflow's default, sqlite:///mlflow.db in the working directory."""
    experiment: str = Field(default="nt8-rl", min_length=1)
    """Experiment that pipeline runs go to."""


class ContinuousLearningConfig(_Strict):
    """The seed's continuous-learning thresholds (names kept from the seed)."""

    retrain_frequency: int = Field(default=1000, ge=1)
    """New experiences between retraining checks."""
    retrain_new_bars: int | None = Field(default=None, ge=1)
    """New bars in the intake history since the last retrain that make a retrain due on their
    own (None: only experiences do)."""
    min_experiences: int = Field(default=500, ge=1)
    """Experiences needed before any retraining."""
    evaluation_episodes: int = Field(default=10, ge=1)
    """Backtest windows per evaluation."""
    min_annotated_for_finetune: int = Field(default=100, ge=1)
    """Annotated experiences needed before LLM fine-tuning."""
    experience_buffer_size: int = Field(default=10_000, ge=1)
    """Experiences kept in the buffer."""
    experience_storage: str = "data/experience_buffer"
    """Directory (or pyarrow filesystem URI) of the Parquet experience buffer."""
    high_value_min_quality: float = Field(default=0.7, ge=0, le=1)
    """Annotated experiences of at least this quality (or tagged high_value) are high-value."""
    failed_max_quality: float = Field(default=0.3, ge=0, le=1)
    """Experiences of at most this quality (or tagged failed, or closing a loss) are failed."""
    state_dir: str = "data/orchestrator"
    """The orchestrator's durable watermarks (last retrain, last fine-tune) and its lock."""
    paper_bars: int | None = Field(default=None, ge=2)
    """The cycle paper-trades this many bars of the test split through the bridge before its
    threshold checks (the demo, a simulation); null: experiences come from the live bridge."""
    retrain_history_bars: int | None = Field(default=None, ge=10)
    """A retrain trains, validates and gates on the bars its new experiences came from plus this
    many bars of history before them (at least the newest this many bars); each simulation step on
    the newest this many. Null: all of the market data. A market that drifted is learned from its
    recent past."""
    offline_pass: Literal["none", "bc", "marwil"] = "none"
    """Before a retrain's PPO run: RLlib MARWIL on the buffer's experiences (``bc``: beta 0,
    behaviour cloning; ``marwil``: advantage-weighted), starting from the Production policy; PPO
    then starts from its result."""
    offline_iterations: int = Field(default=5, ge=1)
    """Offline pass: MARWIL training iterations."""
    high_value_weight: int = Field(default=3, ge=1)
    """Offline pass: each high-value experience counts this many times (1: no weighting)."""
    maintenance_every: str = "1d"
    """``orchestrate --loop``: how often maintenance runs (30s, 5m, 1h, 1d, 1w)."""
    retrain_every: str = "1w"
    """``orchestrate --loop``: how often the retrain check runs (it retrains only when due)."""
    finetune_every: str = "1w"
    """``orchestrate --loop``: how often the fine-tune check runs (it fine-tunes only when due)."""
    review_every: str = "30d"
    """``orchestrate --loop``: how often the review runs (every live version compared, cleanup)."""
    keep_versions: int = Field(default=5, ge=1)
    """Review: newest versions kept un-archived (refused ones are archived first; never Production
    nor its rollback target)."""

    @field_validator("maintenance_every", "retrain_every", "finetune_every", "review_every")
    @classmethod
    def _duration(cls, value: str) -> str:
        if parse_duration(value) < 1.0:
            raise ValueError(f"{value!r}: at least 1 s")
        return value


class AnnotationConfig(_Strict):
    """Who writes the post-trade reflections (``pipelines.annotate``)."""

    annotator: Literal["rules", "llm", "reasoner"] = "rules"
    """rules: deterministic, no network. llm: an OpenAI-compatible chat endpoint (a local Ollama
    serving deepseek-r1:8b, say). reasoner: the Production ``nt8-reasoner`` (the fine-tuned
    adapter on its base) in this process. Both fall back to the rules for any trade they cannot
    annotate."""
    endpoint: str | None = None
    """Base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:11434/v1 (needed for llm)."""
    model: str = "deepseek-r1:8b"
    """Model name sent to the endpoint."""
    timeout_s: float = Field(default=60.0, gt=0)
    """Seconds one request may take."""
    retries: int = Field(default=2, ge=0)
    """Further attempts after a failed request, before the rule-based fallback."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's key, if it needs one (never in config)."""
    quality_scale: float = Field(default=0.001, gt=0)
    """Rule-based quality: 0.5 + 0.5 tanh(PnL / (2 x quality_scale x equity at entry)); 0.001 makes
    a trade that made 0.1% of the account score 0.73 (high_value at the default 0.7)."""

    @model_validator(mode="after")
    def _llm_needs_an_endpoint(self) -> AnnotationConfig:
        if self.annotator == "llm" and not self.endpoint:
            raise ValueError("annotator llm needs annotation.endpoint (an OpenAI-compatible base URL)")
        return self


class FinetuneConfig(_Strict):
    """QLoRA fine-tuning of the reasoning model (``pipelines.finetune``) and the reasoning engine."""

    base_model: str = "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    """Hub id (already in the local Hugging Face cache: nothing is downloaded at run time), a local
    model folder, or ``tiny``: a tiny R1-shaped Llama built locally (tests, the CPU demo)."""
    tiny_dir: str = "data/finetune/tiny-base"
    """Where ``base_model: tiny`` is built."""
    output_dir: str = "data/finetune"
    """The prepared JSONL datasets (``train.jsonl``, ``validation.jsonl``)."""
    quantization: Literal["4bit", "8bit", "none"] = "4bit"
    """4bit: bitsandbytes NF4 with double quantisation (QLoRA); 8bit: LLM.int8; none: full precision."""
    lora_r: int = Field(default=16, ge=1)
    """LoRA rank: the inner size of each low-rank update."""
    lora_alpha: int = Field(default=32, ge=1)
    """LoRA scaling: the update is multiplied by lora_alpha / lora_r."""
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the LoRA layers' input."""
    target_modules: str = "all-linear"
    """PEFT target modules (``all-linear``: every linear layer but the output head)."""
    max_steps: int = Field(default=200, ge=1)
    """Optimiser steps of one fine-tuning run."""
    learning_rate: float = Field(default=2e-4, gt=0)
    """Peak learning rate of the adapter's optimiser."""
    batch_size: int = Field(default=1, ge=1)
    """Sequences per device step."""
    gradient_accumulation: int = Field(default=8, ge=1)
    """Device steps whose gradients add up to one optimiser step (batch_size x this sequences)."""
    max_length: int = Field(default=2048, ge=16)
    """Longest training sequence in tokens (longer ones are truncated)."""
    eval_steps: int = Field(default=50, ge=1)
    """Validation loss every this many steps."""
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    """The newest this share of the examples (by trade time) is the validation set."""
    min_quality: float = Field(default=0.0, ge=0, le=1)
    """Annotations of trades with a lower quality score are left out of the training data."""
    min_examples: int = Field(default=4, ge=2)
    """Fewer distinct examples than this: no fine-tuning (a clear error)."""
    register_model: str = "nt8-reasoner"
    """Registered model of the adapters; Production reasons."""
    temperature: float = Field(default=0.6, ge=0)
    """Reasoning engine: sampling temperature (DeepSeek recommends 0.5-0.7 for R1 distills)."""
    max_new_tokens: int = Field(default=512, ge=1)
    """Reasoning engine: longest reply."""


class Config(_Strict):
    """Everything one run needs."""

    seed: int = 0
    """Global seed."""
    data: DataConfig = Field(default_factory=DataConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    continuous_learning: ContinuousLearningConfig = Field(default_factory=ContinuousLearningConfig)
    annotation: AnnotationConfig = Field(default_factory=AnnotationConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    bridge: BridgeConfig = Field(default_factory=BridgeConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what ``config.yaml`` holds)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        return flatten(self.to_dict())

