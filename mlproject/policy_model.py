"""MLflow "model from code" for the RL policy: this file is logged with the model and run by
MLflow when the model loads; it is not imported by the library.

Input: a float32 batch of FuturesTradingEnv observations (n, obs_dim), built with the settings
recorded in this model's metadata (``nt8_policy``: window, normalisation, features, instrument).
Output: int64 actions (target position + max_contracts). The RLlib RLModule checkpoint travels as the artifact
``rl_module`` (an ensemble's further members as ``rl_module_1`` ...: the action is the argmax of their mean
logits); loading it needs no running Ray. Self-contained on purpose (only mlflow, numpy,
torch and ray[rllib]): a serving environment has the pinned packages, not this project.
Mirrors ``mlproject.policy.load_module`` / ``greedy_actions`` / ``plain_net`` and the layer steps of
``module_policy`` (copied, not imported: the file must run where only the pinned packages are
installed; tests/test_evaluate.py checks both give forward_inference's actions).
"""

import mlflow
import numpy as np


class RLlibPolicy(mlflow.pyfunc.PythonModel):
    """Greedy policy of an RLlib RLModule."""

    def load_context(self, context):
        from ray.rllib.core.rl_module.rl_module import RLModule
        from ray.util.debug import log_once

        # RLlib's RLModule constructor warns about a deprecated RLModuleConfig that it builds
        # itself; nothing a user of this model can change (mlproject/quiet.py says more).
        log_once("RLModule(config=[RLModuleConfig object])")

        # An ensemble (train.ensemble > 1) has one artifact per member: rl_module, rl_module_1, ...
        names = sorted((k for k in context.artifacts if k == "rl_module" or k.startswith("rl_module_")),
                       key=lambda k: int(k.rpartition("_")[2]) if k != "rl_module" else 0)
        self.members = []
        for name in names:
            self.module = RLModule.from_checkpoint(context.artifacts[name])
            self.net = self._plain_net()
            self.steps = self._steps(self.net) if self.net is not None else None
            self.members.append((self.module, self.steps))
        self.module, self.steps = self.members[0]

    @staticmethod
    def _steps(net):
        """The Sequential's layers as the functions they call (F.linear, tanh, relu): the same
        arithmetic without nn.Module's per-layer dispatch (~25% of a 256-row batch)."""
        import torch
        import torch.nn.functional as F

        steps = []
        for layer in net.modules():
            if isinstance(layer, torch.nn.Linear):
                steps.append((F.linear, (layer.weight, layer.bias)))
            elif isinstance(layer, torch.nn.Tanh):
                steps.append((torch.tanh, ()))
            elif isinstance(layer, torch.nn.ReLU):
                steps.append((torch.relu, ()))
        return steps

    def _plain_net(self):
        """The actor MLP and policy head as one torch Sequential when its logits equal
        ``forward_inference``'s bit for bit on random batches (then predict skips RLlib's
        per-call wrapper, ~40% of a 256-row batch); else None."""
        import torch
        from ray.rllib.core.columns import Columns

        encoder = getattr(self.module, "encoder", None)
        actor = getattr(encoder, "actor_encoder", None) or getattr(encoder, "encoder", None)
        parts = [getattr(getattr(part, "net", None), "mlp", None) for part in (actor, getattr(self.module, "pi", None))]
        if any(part is None for part in parts):
            return None
        net = torch.nn.Sequential(*parts)
        if not all(isinstance(layer, (torch.nn.Linear, torch.nn.Tanh, torch.nn.ReLU, torch.nn.Sequential))
                   for layer in net.modules()):
            return None
        size = int(np.prod(self.module.observation_space.shape))
        rng = np.random.default_rng(0)
        with torch.no_grad():
            for rows in (1, 3, 16, 256):
                obs = torch.from_numpy(rng.normal(0.0, 2.0, (rows, size)).astype(np.float32))
                if not torch.equal(net(obs), self.module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]):
                    return None
        return net

    # Typed: MLflow warns about an untyped predict. np.ndarray is a hint MLflow infers no schema
    # from, so the logged signature (an unnamed float32 tensor) stays the one that is enforced.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import torch
        from ray.rllib.core.columns import Columns

        obs = torch.from_numpy(np.ascontiguousarray(np.asarray(model_input), dtype=np.float32))
        obs = obs.reshape(len(obs), -1)
        with torch.inference_mode():
            each = []
            for module, steps in self.members:
                if steps is not None:
                    logits = obs
                    for fn, args in steps:
                        logits = fn(logits, *args)
                else:
                    logits = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
                each.append(logits)
            # An ensemble's mean logits: summed in member order, then divided by K (the formula
            # of mlproject.ensemble.mean_logits, which the backtests and the bridge use).
            logits = each[0]
            if len(each) > 1:
                for more in each[1:]:
                    logits = logits + more
                logits = logits / len(each)
        return torch.argmax(logits, dim=-1).numpy().astype(np.int64)


mlflow.models.set_model(RLlibPolicy())
