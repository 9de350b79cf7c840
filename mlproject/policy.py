"""The trained policy outside Ray: its recorded settings, loading, greedy actions.

A logged policy model carries the settings it was trained with (:class:`PolicySettings`, in
the MLflow model's metadata under :data:`SETTINGS_KEY` and as the logged model's params), so
every consumer builds that model's observations from the model's own window, normalisation,
features and contract size, whatever the current config says.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlproject.data import infer_bar_period
from mlproject.features import FEATURE_SETS, feature_set_of, obs_size
from mlproject.instruments import PRESETS, resolve_instrument
from mlproject.quiet import quiet_rllib
from mlproject.registry import resolve_version

MODULE_SUBDIR = "learner_group/learner/rl_module/default_policy"
"""Where an RLlib algorithm checkpoint keeps the policy's RLModule."""

SETTINGS_KEY = "nt8_policy"
"""Key of the settings in the MLflow model's ``metadata`` (the MLmodel file)."""

SETTINGS_VERSION = 1
"""Layout version of the recorded settings."""


class ModelMismatch(ValueError):
    """A policy cannot be run on the given bars or settings; the message names the model and
    the setting."""


@dataclass(frozen=True)
class PolicySettings:
    """Everything needed to build a policy's observations and to read its actions."""

    window: int
    vol_window: int
    norm_window: int
    features: tuple[str, ...]
    feature_set_version: int
    instrument: dict[str, Any]
    """``InstrumentSpec`` fields (symbol, tick_size, point_value, costs, max_contracts)."""
    bar_period: str | None
    """Median bar spacing of the training bars (``str(pd.Timedelta)``), None if unknown."""
    obs_size: int

    @property
    def max_contracts(self) -> int:
        return int(self.instrument["max_contracts"])

    @property
    def feature_set(self) -> str | None:
        """The ``env.feature_set`` the model was trained with (None: one this code does not compute)."""
        return feature_set_of(self.features, self.feature_set_version)

    @classmethod
    def from_env(cls, env: Any, bars: Any = None) -> PolicySettings:
        """Settings of a policy trained with ``env`` (an ``EnvConfig``) on ``bars``."""
        period = None
        if bars is not None and len(bars) >= 2:
            period = str(infer_bar_period(bars))
        version, names = FEATURE_SETS[env.feature_set]
        return cls(env.window, env.vol_window, env.norm_window, names, version,
                   resolve_instrument(env.instrument).to_dict(), period, obs_size(env.window, env.feature_set))

    def to_dict(self) -> dict[str, Any]:
        return {"settings_version": SETTINGS_VERSION, **asdict(self), "features": list(self.features)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PolicySettings:
        fields = {k: raw[k] for k in cls.__dataclass_fields__}
        fields["features"] = tuple(fields["features"])
        return cls(**fields)

    def params(self) -> dict[str, str]:
        """Flat ``policy.*`` params for the logged model (shown on its page in the MLflow UI)."""
        out = {f"policy.{k}": str(v) for k, v in self.to_dict().items() if k != "instrument"}
        out.update({f"policy.instrument.{k}": str(v) for k, v in self.instrument.items()})
        out["policy.features"] = ",".join(self.features)
        return out

    def observation_differences(self, other: PolicySettings) -> list[str]:
        """The settings that make the two policies' observations or actions differ."""
        keys = ("window", "vol_window", "norm_window", "features", "feature_set_version", "max_contracts")
        return [f"{k} {getattr(self, k)!r} vs {getattr(other, k)!r}" for k in keys
                if getattr(self, k) != getattr(other, k)]


@dataclass
class LoadedPolicy:
    """A policy model loaded from MLflow: what it is, what it was trained with, how it acts."""

    uri: str
    label: str
    """How messages name it: ``nt8-agent v3`` for a registered version, else the URI."""
    settings: PolicySettings | None
    """None for a model logged before settings were recorded (only its input size is known)."""
    input_size: int | None
    predict: Callable[[np.ndarray], np.ndarray]


def model_label(uri: str) -> str:
    """``nt8-agent v3`` for a ``models:/`` URI that resolves to a registered version, else the URI."""
    mv = resolve_version(uri)  # None for URIs outside the registry; raises for a missing version
    return f"{mv.name} v{mv.version}" if mv is not None else uri


def load_policy_model(uri: str, local: str | Path | None = None) -> LoadedPolicy:
    """Load an MLflow policy model (registry URI, ``models:/m-...``, ``runs:/``, a local path);
    ``local``: a folder ``uri`` was already downloaded to (loaded from there, named by ``uri``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    label = model_label(uri)
    quiet_rllib()
    try:
        model = mlflow.pyfunc.load_model(str(local) if local is not None else uri)
    except MlflowException as exc:  # unknown name/version/run: a bad input, said with the URI
        raise ValueError(f"{uri}: {exc.message}") from None
    meta = model.metadata
    raw = (meta.metadata or {}).get(SETTINGS_KEY)
    settings = PolicySettings.from_dict(raw) if raw else None
    input_size = _signature_width(meta.get_input_schema())
    return LoadedPolicy(uri, label, settings, input_size, _predictor(model, input_size))


def _signature_width(schema: Any) -> int | None:
    """The observation width of a one-tensor input signature; None for any other (or no) signature."""
    if schema is not None and schema.is_tensor_spec() and len(schema.inputs) == 1:
        return int(schema.inputs[0].shape[-1])
    return None


def _predictor(model: Any, input_size: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """``model``'s predict on an observation batch, skipping MLflow's schema check for a batch
    that would pass it (:func:`_own_policy_model`)."""
    own = _own_policy_model(model, input_size)

    def predict(obs: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(obs, dtype=np.float32)
        if own is not None and batch.ndim == 2 and batch.shape[1] == input_size:
            # What MLflow's schema check would pass (a float32 batch of the signature's width),
            # straight to the model (its per-call check costs as much as a 256-row forward pass).
            return np.asarray(own.predict(None, batch))
        return np.asarray(model.predict(batch))

    return predict


def _own_policy_model(model: Any, input_size: int | None) -> Any:
    """The ``RLlibPolicy`` inside a pyfunc model that this project logged (``policy_model.py``)
    with an unnamed float32 tensor signature, which a batch can be checked against without
    MLflow; else None (every other model goes through ``model.predict``)."""
    schema = model.metadata.get_input_schema()
    if input_size is None or schema is None or np.dtype(schema.inputs[0].type) != np.float32:
        return None
    try:
        inner = model.unwrap_python_model()
    except Exception:  # not a python_model pyfunc: MLflow says so with an MlflowException
        return None
    return inner if type(inner).__name__ == "RLlibPolicy" and hasattr(inner, "module") else None


def read_settings(model_dir: str | Path) -> PolicySettings | None:
    """Settings recorded in a downloaded MLflow model folder (None if it records none)."""
    from mlflow.models import Model

    raw = (Model.load(str(model_dir)).metadata or {}).get(SETTINGS_KEY)
    return PolicySettings.from_dict(raw) if raw else None


def find_module_dir(path: Path) -> Path:
    """The RLModule checkpoint inside a logged pyfunc model, an algorithm checkpoint, or itself."""
    import yaml

    candidates = [path / MODULE_SUBDIR, path]
    if (path / "MLmodel").is_file():  # a logged pyfunc: its MLmodel says where rl_module went
        flavor = yaml.safe_load((path / "MLmodel").read_text()).get("flavors", {}).get("python_function", {})
        relative = (flavor.get("artifacts") or {}).get("rl_module", {}).get("path")
        candidates = [path / relative] if relative else []
    for candidate in candidates:
        if (candidate / "module_state.pkl").exists() and (candidate / "class_and_ctor_args.pkl").exists():
            return candidate
    raise ValueError(f"{path}: no RLlib policy checkpoint found (expected a pyfunc policy model with an "
                     "rl_module artifact, an algorithm checkpoint or an RLModule checkpoint)")


MEMBER_ARTIFACT = "rl_module"
"""The pyfunc artifact of a policy's RLModule (an ensemble's member 0; :mod:`mlproject.ensemble`)."""
_MEMBER = re.compile(r"rl_module(?:_(\d+))?")
_CHECKPOINT_MEMBER = re.compile(r"member-(\d+)")


def member_artifact(k: int) -> str:
    """The pyfunc artifact name of member ``k`` (member 0 keeps the single policy's name)."""
    return MEMBER_ARTIFACT if k == 0 else f"{MEMBER_ARTIFACT}_{k}"


def find_module_dirs(path: str | Path) -> list[Path]:
    """Every member's RLModule checkpoint inside a logged pyfunc model (its ``rl_module*``
    artifacts, in member order) or a training run's ``checkpoint`` folder (``member-<k>``
    subfolders); one policy's folder gives a list of one (:func:`find_module_dir`)."""
    import yaml

    path = Path(path)
    found: list[tuple[int, Path]] = []
    if (path / "MLmodel").is_file():
        flavor = yaml.safe_load((path / "MLmodel").read_text()).get("flavors", {}).get("python_function", {})
        for name, spec in (flavor.get("artifacts") or {}).items():
            match = _MEMBER.fullmatch(name)
            if match and spec.get("path"):
                found.append((int(match[1] or 0), path / spec["path"]))
    elif path.is_dir():
        found = [(int(m[1]), child) for child in path.iterdir() if (m := _CHECKPOINT_MEMBER.fullmatch(child.name))]
    if len(found) < 2:
        return [find_module_dir(path)]
    return [find_module_dir(folder) for _, folder in sorted(found)]


def resolve_init_from(uri: str, members: bool = False) -> tuple[Any, dict[str, str], Any]:
    """Local RLModule dir (``members``: every member's, a list; :func:`find_module_dirs`), parent
    tags and the parent's recorded ``PolicySettings`` (None for a checkpoint folder or a model that
    records none) for ``--init-from`` (models:/..., runs:/..., a path)."""
    import mlflow

    find = find_module_dirs if members else find_module_dir
    parent: dict[str, str] = {"parent_uri": uri}
    if Path(uri).exists():
        path = Path(uri)
        return find(path), parent, read_settings(path) if (path / "MLmodel").is_file() else None
    mv = resolve_version(uri)
    if mv is not None:
        parent.update(parent_version=str(mv.version), parent_run_id=mv.run_id or "")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    return find(local), parent, read_settings(local) if (local / "MLmodel").is_file() else None


def load_module(path: str | Path) -> Any:
    """RLModule from a module checkpoint dir, or from an algorithm checkpoint containing one.
    Needs no running Ray."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    quiet_rllib()
    path = Path(path)
    if (path / MODULE_SUBDIR).is_dir():
        path = path / MODULE_SUBDIR
    return RLModule.from_checkpoint(str(path))


def greedy_actions(module: Any, obs: np.ndarray) -> np.ndarray:
    """Most likely action (int64) for each row of a float32 observation batch."""
    import torch
    from ray.rllib.core.columns import Columns

    batch = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32))
    if batch.ndim == 1:
        batch = batch[None]
    with torch.no_grad():
        out = module.forward_inference({Columns.OBS: batch})
    return torch.argmax(out[Columns.ACTION_DIST_INPUTS], dim=-1).numpy().astype(np.int64)


def module_policy(module: Any):
    """A backtest policy (``mlproject.backtest.Policy``: observation batch -> actions) from an
    RLModule: :func:`greedy_actions`, through the module's own torch layers under
    ``torch.inference_mode`` when they reproduce ``forward_inference`` exactly (:func:`plain_net`),
    called as the functions those layers call (``F.linear``, ``tanh``, ``relu``: the same
    arithmetic, without ``nn.Module``'s per-layer dispatch; ~100 us per batch of 256 rows against
    ~135 us through the Sequential and ~230 us through RLlib's wrapper, which also switches the
    module to eval mode on every call), else through ``forward_inference``."""
    net = plain_net(module)
    if net is None:
        return lambda obs: greedy_actions(module, obs)
    return _layers_policy(layer_steps(net))


def layer_steps(net: Any) -> list[tuple[Any, tuple[Any, ...]]]:
    """The functions a plain Linear/Tanh/ReLU stack's layers call, with their weights, in order."""
    import torch
    import torch.nn.functional as F

    steps: list[tuple[Any, tuple[Any, ...]]] = []
    for layer in net.modules():
        if isinstance(layer, torch.nn.Linear):
            steps.append((F.linear, (layer.weight, layer.bias)))
        elif isinstance(layer, torch.nn.Tanh):
            steps.append((torch.tanh, ()))
        elif isinstance(layer, torch.nn.ReLU):
            steps.append((torch.relu, ()))
    return steps


def _layers_policy(steps: list[tuple[Any, tuple[Any, ...]]]) -> Callable[[np.ndarray], np.ndarray]:
    """Greedy actions through ``steps``, the functions a plain stack's layers call (and their
    weights), in order, under ``torch.inference_mode``."""
    import torch

    def act(obs: np.ndarray) -> np.ndarray:
        h = torch.from_numpy(np.ascontiguousarray(obs, dtype=np.float32))
        if h.ndim == 1:
            h = h[None]
        with torch.inference_mode():
            for fn, args in steps:
                h = fn(h, *args)
            return torch.argmax(h, dim=-1).numpy().astype(np.int64)

    return act


def plain_net(module: Any) -> Any:
    """The actor's MLP and the policy head as one ``torch.nn.Sequential`` (the module's own layers,
    not copies), when it is a plain Linear/Tanh/ReLU stack whose output equals
    ``forward_inference``'s logits bit for bit on random batches; else None."""
    import torch
    from ray.rllib.core.columns import Columns

    encoder = getattr(module, "encoder", None)
    actor = getattr(encoder, "actor_encoder", None) or getattr(encoder, "encoder", None)
    layers = [getattr(getattr(part, "net", None), "mlp", None) for part in (actor, getattr(module, "pi", None))]
    if any(layer is None for layer in layers):
        return None
    net = torch.nn.Sequential(*layers)
    if not all(isinstance(layer, (torch.nn.Linear, torch.nn.Tanh, torch.nn.ReLU, torch.nn.Sequential))
               for layer in net.modules()):
        return None
    size = int(np.prod(module.observation_space.shape))
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for rows in (1, 3, 16, 256):
            batch = torch.from_numpy(rng.normal(0.0, 2.0, (rows, size)).astype(np.float32))
            if not torch.equal(net(batch), module.forward_inference({Columns.OBS: batch})[Columns.ACTION_DIST_INPUTS]):
                return None
    return net


def module_weights(module: Any) -> dict[str, np.ndarray]:
    """The module's parameters as numpy arrays (to compare two policies)."""
    return {k: np.asarray(v) for k, v in module.get_state().items() if hasattr(v, "shape")}


def fast_greedy(module: Any) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`greedy_actions` without RLlib's per-call overhead, for the bridge: the actor's MLP
    and the policy head evaluated in float64 numpy (about 12 us for one observation, against
    ~80 us for torch and ~350 us for ``forward_inference`` here). Where the two best logits are
    too close for float64 to be sure of float32 torch's choice, that row goes through the torch
    layers themselves, so the action is always the one ``forward_inference`` picks. Used only
    for a plain Linear/Tanh/ReLU stack whose torch layers reproduce ``forward_inference``'s
    logits exactly on random batches; otherwise the slow path is returned."""
    net = plain_net(module)
    if net is None:
        return lambda obs: greedy_actions(module, obs)
    return _float64_policy(net)


def _float64_policy(net: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Greedy actions through ``net`` in float64 numpy; near ties through ``net`` itself."""
    steps = float64_layers(net)

    def act(obs: np.ndarray) -> np.ndarray:
        obs = np.ascontiguousarray(obs, dtype=np.float32)
        if obs.ndim == 1:
            obs = obs[None]
        h = forward_float64(obs.astype(np.float64), steps)
        actions = np.argmax(h, axis=-1)
        if h.shape[-1] > 1:
            close = near_ties(h, actions)
            if close.any():  # float32 rounding could decide these: ask torch itself
                actions[close] = _torch_greedy(net, obs[close])
        return actions.astype(np.int64)

    return act


def float64_layers(net: Any) -> list[tuple[str, Any, Any]]:
    """(kind, weight, bias) per layer of a plain Linear/Tanh/ReLU stack, the weights as float64
    numpy (transposed for ``h @ weight``)."""
    import torch

    steps: list[tuple[str, Any, Any]] = []
    for layer in net.modules():
        if isinstance(layer, torch.nn.Linear):
            bias = layer.bias.detach().double().numpy() if layer.bias is not None else 0.0
            steps.append(("linear", layer.weight.detach().double().numpy().T.copy(), bias))
        elif isinstance(layer, (torch.nn.Tanh, torch.nn.ReLU)):
            steps.append((type(layer).__name__.lower(), None, None))
    return steps


def forward_float64(h: np.ndarray, steps: list[tuple[str, Any, Any]]) -> np.ndarray:
    """The logits of a float64 batch through :func:`float64_layers`."""
    for kind, weight, bias in steps:
        if kind == "linear":
            h = h @ weight + bias
        elif kind == "tanh":
            h = np.tanh(h)
        else:
            h = np.maximum(h, 0.0)
    return h


def near_ties(h: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Rows whose best logit (at ``actions``) is within float32 rounding of the runner-up.
    Overwrites the best logits of ``h``."""
    rows = np.arange(len(h))
    best = h[rows, actions]
    h[rows, actions] = -np.inf
    return best - h.max(axis=-1) <= 1e-4 * (1.0 + np.abs(best))


def _torch_greedy(net: Any, obs: np.ndarray) -> np.ndarray:
    """Greedy actions of float32 observations through the torch layers themselves."""
    import torch

    with torch.no_grad():
        return torch.argmax(net(torch.from_numpy(obs)), dim=-1).numpy().astype(np.int64)


def settings_overrides(parent: PolicySettings) -> list[str]:
    """``--set`` items that make a config build ``parent``'s observations and contract (the
    recorded instrument as its preset plus the fields that differ from it, or every field)."""
    items = [f"env.window={parent.window}", f"env.vol_window={parent.vol_window}",
             f"env.norm_window={parent.norm_window}"] + ([f"env.feature_set={parent.feature_set}"]
                                                          if parent.feature_set else [])
    recorded = dict(parent.instrument)
    symbol = str(recorded.pop("symbol", "") or "")
    preset = PRESETS.get(symbol.split()[0].upper()) if symbol.strip() else None
    if preset is not None:  # its preset (a contract month such as "ES 12-24" is shown by its preset)
        items.append(f"env.instrument.preset={preset.symbol}")
        recorded = {k: v for k, v in recorded.items() if preset.to_dict().get(k) != v}
    else:
        items.append(f"env.instrument.symbol={symbol}")
    items += [f"env.instrument.{k}={v}" for k, v in recorded.items()]
    return items


def network_settings(module: Any) -> dict[str, Any]:
    """``train.hiddens`` and ``train.activation`` of an RLModule (from its model config)."""
    config = module.model_config
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return {"hiddens": list(get("fcnet_hiddens") or []), "activation": get("fcnet_activation")}


def continue_differences(parent: PolicySettings | None, network: dict[str, Any] | None,
                         cfg: Any) -> tuple[list[str], list[str]]:
    """What keeps a run of ``cfg`` (a ``Config``) from continuing to train a policy recorded with
    ``parent`` settings and ``network`` (:func:`network_settings`; None: not compared): the
    differences, "model vs config", and the ``--set`` items that make the config match it. The one
    rule both an ``--init-from`` and the cycle's warm start from Production follow."""
    settings = PolicySettings.from_env(cfg.env)
    differ = parent.observation_differences(settings) if parent is not None else []
    wanted = [item for item in settings_overrides(parent) if item not in settings_overrides(settings)] if differ else []
    ours = {"hiddens": list(cfg.train.hiddens), "activation": cfg.train.activation}
    for key in ("hiddens", "activation") if network is not None else ():
        if network[key] != ours[key]:
            differ.append(f"train.{key} {network[key]!r} vs {ours[key]!r}")
            value = ",".join(map(str, network[key])) if key == "hiddens" else network[key]
            wanted.append(f"train.{key}=[{value}]" if key == "hiddens" else f"train.{key}={value}")
    return differ, wanted


def set_items(items: list[str]) -> str:
    """``--set`` arguments for a shell (``[32,32]`` quoted: zsh would glob it)."""
    return " ".join(f"--set {shlex.quote(item)}" for item in items)


def fresh_module(obs_size: int, n_actions: int, hiddens: list[int] | tuple[int, ...] = (64, 64),
                 activation: str = "tanh", seed: int = 0) -> Any:
    """An untrained PPO RLModule of the shape training makes (for benchmarks and tests that need
    a real policy without a training run); needs no running Ray."""
    import gymnasium as gym
    import torch
    from ray.rllib.algorithms.ppo.torch.default_ppo_torch_rl_module import DefaultPPOTorchRLModule
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    quiet_rllib()
    torch.manual_seed(seed)
    space = gym.spaces.Box(-np.inf, np.inf, (obs_size,), np.float32)
    return RLModuleSpec(module_class=DefaultPPOTorchRLModule, observation_space=space,
                        action_space=gym.spaces.Discrete(n_actions),
                        model_config=DefaultModelConfig(fcnet_hiddens=list(hiddens), fcnet_activation=activation)).build()
