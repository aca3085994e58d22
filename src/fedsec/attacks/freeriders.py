"""Free-riders and Sybils: hospitals that take the consortium's model without contributing to
it, and one party that enters the consortium under several hospital identities.

Free-riders (Lin, Du & Liu 2019, "Free-riders in Federated Learning: Attacks and Defenses",
arXiv 1911.12560; Fraboni, Vidal & Lorenzi 2021, "Free-rider Attacks on Model Aggregation in
Federated Learning", AISTATS). A free-rider does no useful training and sends something that
looks like an update; it still reports its sample count, so FedAvg weights it like an honest
hospital of that size.

- :class:`FreeRider` (client side, works on real nodes): ``plain`` returns the global model
  unchanged (update 0; Fraboni et al.'s plain free-rider); ``disguised`` returns the global
  model plus Gaussian noise ``N(0, sigma_t^2 I)`` with ``sigma_t = sigma * t^-decay`` (t the
  round; Fraboni et al.'s disguised free-rider, whose noise decays like an honest update's
  size; ``decay: 0`` is Lin et al.'s random-weights attack with Gaussian instead of uniform
  values).
- :class:`StaleFreeRider` (server side): ``global_delta`` sends the last change of the global
  model it knows (Lin et al.'s "delta weights" attack), optionally plus Gaussian noise
  (their "advanced delta weights"); ``own`` trains once, in its first active round, and
  replays that update in every later round.

  Why server side: a stale free-rider needs the global model of an earlier round or its own
  earlier update, i.e. state between rounds. Client hooks must keep none (a round's message
  may reach any Ray actor: attacks/base.py ``state_dict``), and the message carries only the
  current global model. The server-side ``collude`` hook sees exactly what the free-rider
  itself knows (the global model it received, its own honest update of the round) and keeps
  its history in ``state_attributes`` (saved in the checkpoint). It therefore runs in
  simulation only, though a real free-rider needs no other hospital's data.

Sybils (Douceur 2002; the threat FoolsGold, Fung et al. 2020, is built against):
:class:`Sybil` makes the k hospitals of its entry (one party's identities) send the same
update: the mean of their own updates of the round (or the first one's), each identity
optionally adding a small relative Gaussian perturbation. Combine it with a poisoning attack
on the same hospitals (``label_flip``, ``badnets``) for the direction they push together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedsec.attacks.base import Attack, AttackContext
from fedsec.registry import ATTACKS, option


def _draw(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal values (float64 draw from ``generator``) in ``like``'s dtype/device."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(like.dtype).to(like.device)


def noise_sigma(sigma: float, decay: float, server_round: int) -> float:
    """``sigma * t^-decay``: the disguised free-rider's noise in round t (1-based)."""
    return float(sigma) * float(max(int(server_round), 1)) ** (-float(decay))


@ATTACKS.register()
class FreeRider(Attack):
    """A free-rider that sends the global model back (``plain``: update exactly 0) or the
    global model plus Gaussian noise with std ``sigma * t^-decay`` in round t
    (``disguised``). It reports its real sample count (FedAvg weights it). Its local training
    result is discarded: what it sends does not depend on its data."""

    name = "free_rider"
    goal = "availability"
    kind = "free_riding"
    verb = "sends no real update (free-rider)"
    success_metric = None
    success_wording = ("the free-rider is not named in defense.flagged and keeps its FedAvg weight; "
                       "the consortium's AUROC falls by its share of the weights")

    @dataclass
    class Options:
        mode: str = option("plain", "plain: the global model unchanged; disguised: plus Gaussian noise",
                           choices=("plain", "disguised"))
        sigma: float = option(0.01, "disguised: std of the noise in round 1", min=0.0)
        decay: float = option(0.0, "disguised: the noise std is sigma * round^-decay (0: constant)", min=0.0)

    def sigma_at(self, server_round: int) -> float:
        """The std of the noise this free-rider adds in ``server_round`` (0 when plain)."""
        if self.options["mode"] == "plain":
            return 0.0
        return noise_sigma(self.options["sigma"], self.options["decay"], server_round)

    def poison_update(self, global_params, local_params, ctx: AttackContext):
        s = self.sigma_at(ctx.server_round)
        if s == 0.0:
            return global_params.clone()
        return global_params + s * _draw(global_params.shape, ctx.generator, global_params)


@ATTACKS.register()
class StaleFreeRider(Attack):
    """A free-rider that sends a stale update (server side, see the module's docstring).

    ``global_delta``: the last change of the global model it knows, ``G_t - G_prev`` (G_prev:
    the global model of the last round this attack ran; Lin et al.'s delta weights), plus
    Gaussian noise of std ``noise`` (advanced delta weights; 0: none). In its first round it
    knows no change and sends the global model back (update 0).
    ``own``: its honest update of its first active round, replayed unchanged in every later
    round (a hospital that trained once)."""

    name = "stale_free_rider"
    goal = "availability"
    kind = "free_riding"
    simulation_only = True  # state between rounds lives on the server side (module docstring)
    verb = "replays a stale update (free-rider)"
    success_metric = None
    success_wording = FreeRider.success_wording
    state_attributes: ClassVar[tuple[str, ...]] = ("previous_global", "replay")

    @dataclass
    class Options:
        source: str = option("global_delta", "global_delta: the last global model change; own: its own "
                             "first update, replayed", choices=("global_delta", "own"))
        noise: float = option(0.0, "global_delta: std of Gaussian noise added (advanced delta weights)", min=0.0)

    def __init__(self, **options):
        super().__init__(**options)
        self.previous_global: torch.Tensor | None = None
        self.replay: dict[int, torch.Tensor] = {}

    def collude(self, benign_updates, n_malicious, ctx: AttackContext):
        own = (ctx.extra or {}).get("malicious_updates")
        current = (ctx.extra or {}).get("global_params")
        ids = [h for h in (ctx.participants or ctx.malicious) if h in ctx.malicious][:n_malicious]
        if self.options["source"] == "own":
            out = []
            for row, h in enumerate(ids):
                if h not in self.replay:  # its first round: it trains once, honestly
                    self.replay[h] = own[row].detach().cpu().clone()
                out.append(self.replay[h].to(benign_updates.device, benign_updates.dtype))
            return torch.stack(out)
        if current is None:
            raise ValueError("stale_free_rider: the server passes no global_params to the coalition")
        current = current.detach().cpu().double()
        if self.previous_global is None or self.previous_global.shape != current.shape:
            delta = torch.zeros_like(current)
        else:
            delta = current - self.previous_global
        self.previous_global = current.clone()
        out = delta.to(benign_updates.dtype).to(benign_updates.device).unsqueeze(0).repeat(n_malicious, 1)
        if self.options["noise"] > 0:
            out = out + float(self.options["noise"]) * _draw(out.shape, ctx.generator, out)
        return out


@ATTACKS.register()
class Sybil(Attack):
    """k hospital identities of one party send one update (server side, simulation only).

    ``source: mean``: the mean of the k identities' own updates of the round (what the party
    computed, e.g. with ``label_flip`` on the same hospitals); ``first``: the first identity's.
    ``noise``: each identity adds Gaussian noise of std ``noise * ||u|| / sqrt(d)`` (about a
    ``noise`` fraction of the update's norm), so the copies are near-identical, not equal."""

    name = "sybil"
    goal = "integrity"
    kind = "sybil"
    simulation_only = True  # the identities' updates are joined on the server side
    verb = "sends one update under several hospital identities (Sybils)"
    success_metric = "accuracy"
    success_wording = ("the Sybils keep their weight (defense.flagged does not name them) and the poisoning "
                       "they carry moves the main task's accuracy / balanced accuracy")

    @dataclass
    class Options:
        source: str = option("mean", "mean: the identities' mean update; first: the first identity's",
                             choices=("mean", "first"))
        noise: float = option(0.0, "relative std of each identity's perturbation (0: identical copies)", min=0.0)

    def collude(self, benign_updates, n_malicious, ctx: AttackContext):
        own = (ctx.extra or {}).get("malicious_updates")
        if own is None or len(own) == 0:
            return None
        own = torch.as_tensor(own).to(benign_updates.device, benign_updates.dtype)
        base = own.mean(dim=0) if self.options["source"] == "mean" else own[0]
        out = base.unsqueeze(0).repeat(n_malicious, 1)
        rel = float(self.options["noise"])
        if rel > 0:
            scale = rel * float(base.double().norm()) / math.sqrt(max(base.numel(), 1))
            out = out + scale * _draw(out.shape, ctx.generator, out)
        return out


__all__ = ["FreeRider", "StaleFreeRider", "Sybil", "noise_sigma"]
