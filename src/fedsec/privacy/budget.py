"""A DP-SGD privacy budget per hospital: each hospital may set its own (epsilon, delta); the
server stops selecting a hospital whose next round would take it past its epsilon.

Scenario keys (``privacy.dp_sgd.budgets``), one entry per hospital name, plus ``default``
for the hospitals not named (without ``default`` they have no budget)::

    privacy:
      dp_sgd:
        noise_multiplier: 1.0
        budgets:
          cleveland: {epsilon: 2.0}
          switzerland: {epsilon: 4.0, delta: 1.0e-4}
          default: {epsilon: 8.0}

A budget's ``delta`` (optional) replaces ``privacy.dp_sgd.delta`` for that hospital: its
DP-SGD accounting runs at that delta (``DPConfig.for_hospital``), so the epsilon it reports
and the epsilon its budget is checked against are the same number. Errors name the key
(``privacy.dp_sgd.budgets.<hospital>.epsilon``): an unknown hospital, epsilon <= 0, delta
outside (0, 1); delta >= 1/N of that hospital is refused before training starts
(``check_delta``).

The stop. Before each training round the server predicts each hospital's epsilon after one
more round with the same Opacus accountant the hospital uses (``dp_sgd.epsilon`` on the
hospital's plan: its noise, sampling rate, steps per round and delta, from its training-set
size and the scenario) and the rounds its ledger has charged it so far (``EpsilonLedger``,
unconfirmed rounds included, as the hospital itself counts them). A hospital whose
prediction exceeds its budget is not selected, in this round or any later one (its spending
cannot fall); the round's record names it under ``privacy.budget.left_out`` with the
prediction. When no hospital can train, the run ends cleanly: status ``budget_exhausted``,
the finished rounds kept, and the reason in ``summary.json``'s ``error``.

``summary.json``'s ``privacy.dp_sgd.ledger`` gains, per hospital, ``budget`` (and
``budget_delta``) and ``stopped_at`` (the first round it was left out, or null).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsec.errors import FedsecError
from fedsec.privacy.options import number, option_error

SECTION = "dp_sgd"
KEY = "budgets"
DEFAULT = "default"
STATUS = "budget_exhausted"  # summary.json's status when every hospital's budget is spent


class BudgetExhausted(FedsecError):
    """No hospital can train another round within its privacy budget: the run ends here."""


@dataclass(frozen=True)
class Budget:
    """One hospital's (epsilon, delta) budget; delta None = ``privacy.dp_sgd``'s delta."""

    epsilon: float
    delta: float | None = None


def parse_budgets(value) -> dict[str, Budget] | None:
    """``privacy.dp_sgd.budgets`` -> {hospital name or "default": Budget}; None when absent.
    Errors name ``privacy.dp_sgd.budgets[.<name>[.<key>]]``."""
    if value is None:
        return None
    if isinstance(value, Budget):
        return value
    if not hasattr(value, "items"):
        raise option_error(SECTION, KEY, f"expected a mapping of hospital name -> {{epsilon, delta}}, got {value!r}")
    out: dict[str, Budget] = {}
    for name, entry in value.items():
        key = f"{KEY}.{name}"
        if isinstance(entry, Budget):
            out[str(name)] = entry
            continue
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            entry = {"epsilon": entry}  # shorthand: cleveland: 2.0
        if not hasattr(entry, "items"):
            raise option_error(SECTION, key, f"expected {{epsilon: <number>, delta: <number>}}, got {entry!r}")
        unknown = [k for k in entry if k not in ("epsilon", "delta")]
        if unknown:
            raise option_error(SECTION, f"{key}.{unknown[0]}", "unknown option (options: epsilon, delta)")
        if "epsilon" not in entry:
            raise option_error(SECTION, f"{key}.epsilon", "missing: the hospital's epsilon budget")
        eps = number(SECTION, f"{key}.epsilon", entry["epsilon"], minimum=0.0, strict_min=True)
        delta = number(SECTION, f"{key}.delta", entry.get("delta"), minimum=0.0, maximum=1.0, strict_min=True,
                       strict_max=True, allow_none=True)
        out[str(name)] = Budget(eps, delta)
    return out


def budget_for(budgets: dict[str, Budget] | None, hospital: str) -> Budget | None:
    """The hospital's own budget, else ``default``, else None (no budget)."""
    if not budgets:
        return None
    return budgets.get(hospital, budgets.get(DEFAULT))


def check_names(budgets: dict[str, Budget] | None, hospitals: list[str] | None) -> None:
    """Every name in ``budgets`` (but ``default``) is a hospital of the scenario."""
    if not budgets or hospitals is None:
        return
    from fedsec.registry import did_you_mean

    for name in budgets:
        if name != DEFAULT and name not in hospitals:
            raise option_error(SECTION, f"{KEY}.{name}", f"unknown hospital '{name}'{did_you_mean(name, hospitals)}; "
                                                         f"the hospitals are {', '.join(hospitals)} (or 'default')")


def scenario_hospitals(scenario) -> list[str] | None:
    """The hospitals' names when the scenario alone gives them (before loading data)."""
    from fedsec.scenario import natural_sites

    fed = scenario.federation
    if fed.sites:
        return list(fed.sites)
    if str(fed.partition.get("name", "natural")) == "natural":
        return natural_sites(scenario.task.name)
    if fed.hospitals is not None:
        return [f"hospital_{i}" for i in range(int(fed.hospitals))]
    return None


class BudgetKeeper:
    """The server's side of the budgets: who may train next round.

    dp: the run's DPConfig. hospitals: names by id. train_sizes: hospital id -> training
    records (the nodes' introductions). local / planned_rounds: the scenario's local training
    and federation.rounds (the hospital's plan). ledger: the strategy's EpsilonLedger."""

    def __init__(self, dp, hospitals: list[str], train_sizes: dict[int, int], local, planned_rounds: int, ledger):
        self.dp, self.hospitals, self.sizes = dp, list(hospitals), dict(train_sizes)
        self.local, self.planned_rounds, self.ledger = local, int(planned_rounds), ledger
        self.left_out: dict[str, float] = {}  # this round's: name -> predicted epsilon
        self.stopped_at: dict[str, int] = {}

    def budget(self, hospital: int) -> Budget | None:
        return budget_for(self.dp.budgets, self.hospitals[hospital])

    def next_epsilon(self, hospital: int) -> float:
        """The hospital's cumulative epsilon after one more round of training (Opacus's
        accountant, as the hospital computes it: ``dp_sgd.train_dp_sgd``)."""
        from fedsec.privacy.dp_sgd import epsilon, plan

        name = self.hospitals[hospital]
        p = plan(self.dp.for_hospital(name), self.sizes[hospital], self.local, self.planned_rounds)
        charged = self.ledger.charged([name])[0]
        return epsilon(p.noise_multiplier, p.sample_rate, p.steps_per_round * (charged + 1), p.delta, p.accountant)

    def eligible(self, available: list[int], server_round: int) -> list[int]:
        """``available`` without the hospitals whose next round would exceed their budget
        (remembered for the round's record). Raises BudgetExhausted when none is left."""
        self.left_out = {}
        keep = []
        for h in available:
            b = self.budget(h)
            nxt = self.next_epsilon(h) if b is not None else None
            if b is not None and not nxt <= b.epsilon:
                name = self.hospitals[h]
                self.left_out[name] = nxt
                self.stopped_at.setdefault(name, int(server_round))
            else:
                keep.append(h)
        if available and not keep:
            spent = ", ".join(f"{n} {self.spent(n):.3g} of {budget_for(self.dp.budgets, n).epsilon:g} "
                              f"(next round {e:.3g})" for n, e in self.left_out.items())
            raise BudgetExhausted(f"round {server_round}: every hospital's privacy budget is spent, no hospital "
                                  f"can train another round (epsilon spent of budget: {spent})")
        return keep

    def spent(self, name: str) -> float:
        return float(self.ledger.entries.get(name, {}).get("epsilon", 0.0))

    def round_block(self) -> dict:
        """The round's ``privacy.budget`` record: who was left out, with the epsilon one more
        round would have brought them to."""
        return {"left_out": sorted(self.left_out), "next_epsilon": dict(sorted(self.left_out.items()))}


def keeper_for(strategy, scenario, hospitals: list[str], sizes: dict[int, dict]) -> BudgetKeeper | None:
    """The strategy's BudgetKeeper when ``privacy.dp_sgd.budgets`` is set, else None.
    sizes: hospital id -> {"num-train", ...} (``server_app.introduce_nodes``)."""
    dp_options = scenario.privacy.dp_sgd
    if not dp_options or not dp_options.get(KEY):
        return None
    from fedsec.privacy.dp_sgd import DPConfig

    dp = DPConfig.parse(dp_options)
    return BudgetKeeper(dp, hospitals, {h: int(s["num-train"]) for h, s in sizes.items()},
                        scenario.federation.local, scenario.federation.rounds, strategy._dp_ledger)


def summarise(scenario, records: list[dict], dp_summary: dict | None, ended_for_budget: bool = False) -> dict | None:
    """``summary.json``'s ``privacy.dp_sgd`` with the budgets added to its per-hospital
    ledger: ``budget``, ``budget_delta``, ``stopped_at`` (first round left out, or null).
    Hospitals that never trained get an entry with epsilon 0. ``ended_for_budget``: the run
    ended because no hospital could train (every budgeted hospital stopped by then)."""
    dp_options = (scenario.privacy.dp_sgd or {}) if scenario is not None else {}
    budgets = parse_budgets(dp_options.get(KEY)) if dp_options else None
    if not budgets:
        return dp_summary
    out = dict(dp_summary or {"epsilon_max": 0.0, "epsilon": {}, "ledger": {}})
    ledger = {h: dict(e) for h, e in (out.get("ledger") or {}).items()}
    stopped: dict[str, int] = {}
    for rec in records:
        for name in ((rec.get("privacy") or {}).get("budget") or {}).get("left_out") or []:
            stopped.setdefault(name, int(rec.get("round", 0)))
    names = sorted(set(ledger) | set(stopped) | {n for r in records for n in (r.get("per_hospital") or {})})
    for name in names:
        b = budget_for(budgets, name)
        entry = ledger.setdefault(name, {"epsilon": 0.0, "last_round": None, "rounds": 0})
        entry["budget"] = b.epsilon if b is not None else None
        if b is not None and b.delta is not None:
            entry["budget_delta"] = b.delta
        if name not in stopped and b is not None and ended_for_budget:
            stopped[name] = len(records) + 1  # left out in the round that found no hospital (no record)
        entry["stopped_at"] = stopped.get(name)
    out["ledger"] = dict(sorted(ledger.items()))
    return out
