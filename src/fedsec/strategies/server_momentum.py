"""Server momentum (FedAvgM, Hsu et al. 2019) applied after any aggregation rule.

``strategy.server_momentum: beta`` and ``strategy.server_lr: eta`` make the server apply, each
round, ``v <- beta * v + delta`` and ``w <- w + eta * v``, where ``delta`` is the round's
aggregate (the rule's output, after central DP's noise when there is some). This is the
server-side "SGD with momentum" of the distributed-SGD papers (Baruch et al. 2019 used 0.9).
With ``beta = 0`` and ``eta = 1`` (the defaults) the step is ``delta`` itself, bit for bit.

Flower's ``FedAvgM`` does the same but only on top of FedAvg; fedsec applies its own rules'
aggregates (``FedsecStrategy.apply``), so the momentum is a small step of its own here. The
buffer ``v`` is part of the server state a checkpoint holds.
"""

from __future__ import annotations

import torch

from fedsec.errors import FedsecError, ScenarioError

KEYS = ("server_momentum", "server_lr")


def _number(spec: dict, key: str, default: float) -> float:
    v = spec.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ScenarioError(f"must be a number, got {v!r}", key=f"strategy.{key}")
    return float(v)


class ServerMomentum:
    """``step(delta)`` -> what to add to the global model. momentum: beta in [0, 1); lr: eta > 0."""

    def __init__(self, momentum: float = 0.0, lr: float = 1.0):
        if not 0.0 <= momentum < 1.0:
            raise ScenarioError(f"must be in [0, 1), got {momentum:g}", key="strategy.server_momentum")
        if not lr > 0.0:
            raise ScenarioError(f"must be positive, got {lr:g}", key="strategy.server_lr")
        self.momentum, self.lr = float(momentum), float(lr)
        self.velocity: torch.Tensor | None = None

    @classmethod
    def from_spec(cls, spec) -> "ServerMomentum | None":
        """The scenario's ``strategy`` mapping -> a ServerMomentum, or None when neither key
        is set (the server applies the aggregate as is). ScenarioError names a bad key."""
        spec = dict(spec) if isinstance(spec, dict) else {}
        if all(spec.get(k) is None for k in KEYS):
            return None
        return cls(_number(spec, "server_momentum", 0.0), _number(spec, "server_lr", 1.0))

    def step(self, delta: torch.Tensor) -> torch.Tensor:
        """The round's aggregate Tensor[d] -> the step applied to the global model, Tensor[d]
        in delta's dtype; updates the velocity."""
        if self.momentum == 0.0 or self.velocity is None:
            v = delta.clone()  # first round: v_1 = beta * 0 + delta_1 = delta_1 exactly
        else:
            v = self.momentum * self.velocity.to(delta.dtype) + delta
        self.velocity = v
        return v if self.lr == 1.0 else self.lr * v

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "lr": self.lr,
                "velocity": None if self.velocity is None else self.velocity.clone()}

    def load_state_dict(self, state: dict) -> None:
        if float(state.get("momentum", -1)) != self.momentum or float(state.get("lr", -1)) != self.lr:
            raise FedsecError(f"checkpoint: written with server_momentum {state.get('momentum')} and server_lr "
                              f"{state.get('lr')}, this scenario has {self.momentum:g} and {self.lr:g}")
        v = state.get("velocity")
        self.velocity = None if v is None else torch.as_tensor(v).clone()
