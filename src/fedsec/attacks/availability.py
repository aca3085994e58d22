"""Availability attacks: hospitals that slow the consortium down, leave when it hurts most,
or send replies meant to exhaust the server.

They act on the reply a hospital sends (the ``poison_reply`` hook, last thing in its
ClientApp). Time is simulated (fedsec.federation.participation): a stalling hospital says
when its reply arrives (the ``sim-arrival-s`` reply metric), a dropout says it sent nothing
(``sim-dropped``); nothing sleeps. What they cost is read from the run: rounds lost,
simulated time to the target metric, final and per-hospital utility (summary.json's
``availability``; docs/attacks.md, "Availability").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from fedsec.attacks.base import Attack
from fedsec.federation.participation import ARRIVAL_KEY, DROPPED_KEY
from fedsec.registry import ATTACKS, option


@ATTACKS.register()
class Stall(Attack):
    """A hospital that replies just after the round's deadline, every round: under the
    ``wait`` policy it stretches every round to the deadline, under ``proceed`` it is left
    out (its data with it). Without a deadline it stalls past ``federation.timeout_s``."""

    name = "stall"
    goal = "availability"
    kind = "stall"
    verb = "stalls every round past the deadline"
    success_metric = "simulated_time_s"
    success_wording = "the rounds' simulated time grows (wait) or its data is lost (proceed), against the no-attack run"

    @dataclass
    class Options:
        margin_s: float = option(1.0, "how many simulated seconds after the deadline the reply arrives", min=0.0)
        arrival_s: Optional[float] = option(None, "a fixed simulated arrival second instead (null: deadline + "
                                                  "margin_s)", gt=0.0)

    def poison_reply(self, state, metrics, ctx):
        if self.options["arrival_s"] is not None:
            t = float(self.options["arrival_s"])
        else:
            fed = ctx.extra["scenario"].federation
            deadline = (fed.participation or {}).get("deadline_s")
            t = float(deadline if deadline is not None else fed.timeout_s) + float(self.options["margin_s"])
        metrics[ARRIVAL_KEY] = t
        return state, metrics


@ATTACKS.register()
class StrategicDropout(Attack):
    """A hospital that sends nothing in the rounds it chooses: the rounds it lists, rounds
    drawn with ``probability``, and, with ``rare_label``, every round while its training data
    holds at least ``min_share`` of that label (it withholds the data the consortium has least
    of). The server cannot tell a dropout from a crash: it waits until its cut-off."""

    name = "strategic_dropout"
    goal = "availability"
    kind = "dropout"
    verb = "drops out strategically"
    success_metric = "auroc"
    success_wording = "rounds are lost and the global AUROC falls against the no-attack run"

    @dataclass
    class Options:
        drop_rounds: List[int] = option([], "rounds in which it drops out")
        probability: float = option(0.0, "probability of dropping out in any other round (seeded by scenario "
                                         "seed, round and hospital)", min=0.0, max=1.0)
        rare_label: Optional[int] = option(None, "drop out in every round while its data holds at least "
                                                 "min_share of this label (null: off)", min=0)
        min_share: float = option(0.5, "the share of rare_label in its training data that makes it drop out",
                                  min=0.0, max=1.0)

    def check(self, num_hospitals, malicious, key=""):
        if any(r < 1 for r in self.options["drop_rounds"]):
            raise self.option_error("drop_rounds", "must list rounds >= 1")

    def drops(self, ctx) -> bool:
        """Whether the hospital drops out of round ``ctx.server_round`` (a function of the
        options, the scenario seed, the round, the hospital and its data: no state)."""
        o = self.options
        if ctx.server_round in o["drop_rounds"]:
            return True
        if o["probability"] > 0:
            seed = int(ctx.extra["scenario"].seed)
            u = np.random.default_rng([seed, int(ctx.server_round), int(ctx.hospital), 73]).random()
            if u < o["probability"]:
                return True
        if o["rare_label"] is not None:
            y = ctx.extra["data"].y
            if y.ndim == 2:  # multi-label: rows carrying the label
                share = float(y[:, o["rare_label"]].float().mean()) if y.shape[1] > o["rare_label"] else 0.0
            else:
                share = float((y == o["rare_label"]).float().mean()) if len(y) else 0.0
            if share >= o["min_share"]:
                return True
        return False

    def poison_reply(self, state, metrics, ctx):
        if self.drops(ctx):
            metrics[DROPPED_KEY] = 1
        return state, metrics


@ATTACKS.register()
class OversizedReply(Attack):
    """A hospital whose reply carries extra arrays of ``extra_mb`` megabytes, far larger than
    the model, meant to exhaust the server's memory and bandwidth. The server drops replies
    whose arrays are not the global model's (malformed) and, with ``federation.max_reply_mb``,
    drops an oversized reply before unpacking it."""

    name = "oversized_reply"
    goal = "availability"
    kind = "resource_exhaustion"
    verb = "sends oversized replies"
    success_metric = "received_mb"
    success_wording = "the megabytes the server received per round, and whether the reply was unpacked"

    @dataclass
    class Options:
        extra_mb: float = option(16.0, "megabytes of extra float32 arrays added to the reply", gt=0.0, max=4096.0)
        arrays: int = option(1, "how many extra arrays the megabytes are spread over", min=1, max=1000)

    def poison_reply(self, state, metrics, ctx):
        n = int(self.options["arrays"])
        per = max(1, int(self.options["extra_mb"] * 1e6 / 4 / n))
        out = dict(state)
        for i in range(n):
            out[f"padding.{i}"] = torch.zeros(per, dtype=torch.float32)
        return out, metrics
