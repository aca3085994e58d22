"""The scenario's ``privacy`` block -> checks before anything starts, and the server strategy
wrapped in the defenses it asks for.

Two entry points for the apps and the runner:
- :func:`check_privacy` (runner, before the engine starts): parses every option and refuses
  combinations that cannot hold (robust rule + secure aggregation, server-side clipping +
  secure aggregation, robust rule + central DP, DP-SGD on a model Opacus cannot train).
- :func:`wrap_strategy` (server_app.serve): central DP installed on FedsecStrategy (clipping and
  noise are steps of its round), then [SecAgg+] around it.
DP-SGD and compression act in the ClientApp (``fedsec.privacy.dp_sgd``,
``fedsec.privacy.compression``); the ClientApp's train handler carries
``mods=[secagg_mod, clipping_mod]``, which do nothing unless the server asks for them.
"""

from __future__ import annotations

from fedsec.errors import FedsecError


def _rule(scenario):
    spec = scenario.strategy if isinstance(scenario.strategy, dict) else {"rule": scenario.strategy}
    name = spec.get("rule", "fedavg")
    from fedsec.scenario import STRATEGY_FRAMEWORK_KEYS

    options = {k: v for k, v in spec.items() if k not in STRATEGY_FRAMEWORK_KEYS}
    if name == "fedavg" and not options:
        return None
    from fedsec.strategies.rules import make_rule

    return make_rule(name, **options)


def check_privacy(scenario, task=None, plans=None) -> None:
    """Raise FedsecError for an invalid or contradictory ``privacy`` block.

    task: the built Task (or, in a deployment, the ``NodesTask`` the hospitals described),
    to check that Opacus can train its model and delta against each hospital's size
    (optional). plans: the
    attack plans (fedsec.federation.adversary.build_plans), to refuse server-side collusion
    under secure aggregation (optional)."""
    p = scenario.privacy
    fed = scenario.federation
    rule = None
    if p.central_dp or p.secure_aggregation:
        rule = _rule(scenario)
    if p.dp_sgd:
        from fedsec.privacy.dp_sgd import DPConfig, check_delta, check_model

        from fedsec.privacy.budget import check_names, scenario_hospitals

        dp = DPConfig.parse(p.dp_sgd)
        check_names(dp.budgets, list(task.data.hospitals) if task is not None else scenario_hospitals(scenario))
        if task is not None:
            check_model(task.make_model(), scenario.task.model)
            check_delta(dp, task.train_sizes())
    if p.central_dp:
        from fedsec.privacy.central_dp import (
            CentralDPConfig,
            check_adaptive_noise,
            check_central_dp_compatible,
            noise_for_target,
            num_sampled,
        )

        cfg = CentralDPConfig.parse(p.central_dp)
        check_central_dp_compatible(rule)
        if task is not None:
            h = len(task.train_sizes())
            m = num_sampled(fed.fraction_train, h)
            z = cfg.noise_multiplier
            if z is None:
                z = noise_for_target(cfg.target_epsilon, cfg.delta_for(h), m / h if cfg.amplification else 1.0,
                                     fed.rounds)
            check_adaptive_noise(cfg, m, z)
        if p.secure_aggregation and cfg.clipping == "server":
            raise FedsecError("privacy.secure_aggregation with privacy.central_dp.clipping: server -- the server "
                              "cannot clip updates it cannot see; set privacy.central_dp.clipping: client")
    if p.secure_aggregation:
        from fedsec.privacy.central_dp import num_sampled
        from fedsec.privacy.secagg import SecAggConfig, check_secagg_compatible

        SecAggConfig.parse(p.secure_aggregation)
        check_secagg_compatible(rule, plans or ())
        if task is not None and num_sampled(fed.fraction_train, len(task.train_sizes())) < 2:
            raise FedsecError("privacy.secure_aggregation needs at least 2 hospitals per round; raise "
                              "federation.fraction_train")
    if p.compression:
        from fedsec.privacy.compression import CompressionConfig

        CompressionConfig.parse(p.compression)


def central_dp_history(previous_rounds: list[dict]) -> list[tuple[float, float, int]]:
    """The central-DP accountant's history rebuilt from a run's finished round records
    (rounds.jsonl), to resume a run with its privacy spent so far."""
    history = []
    for record in previous_rounds:
        info = (record.get("privacy") or {}).get("central_dp") or {}
        if "noise_multiplier_effective" in info:
            history.append((float(info["noise_multiplier_effective"]), float(info["sample_rate"]), 1))
    return history


def wrap_strategy(strategy, scenario, *, num_hospitals: int, max_train_size: int | None = None,
                  previous_rounds: list[dict] | None = None):
    """FedsecStrategy -> the strategy to ``start``: wrapped in central DP and/or SecAgg+ as the
    scenario asks (returns ``strategy`` itself when it asks for neither).

    num_hospitals: H. max_train_size: the largest hospital's training set (SecAgg+'s
    fixed-point weight range; 2x headroom for poisoned data that grows). previous_rounds: the
    finished round records when resuming (central DP's epsilon continues from them).
    """
    p = scenario.privacy
    outer = strategy
    if p.central_dp:
        from fedsec.privacy.central_dp import num_sampled, wrap_central_dp

        # installed on FedsecStrategy as steps of its round (clip after the coalition, noise
        # after the rule), not around it: ``outer`` stays the strategy itself
        wrap_central_dp(strategy, p.central_dp, num_sampled(scenario.federation.fraction_train, num_hospitals),
                        num_hospitals=num_hospitals, rounds=scenario.federation.rounds, seed=scenario.seed,
                        history=central_dp_history(previous_rounds or []))
    if p.secure_aggregation:
        from fedsec.privacy.secagg import wrap_secagg

        outer = wrap_secagg(outer, p.secure_aggregation,
                            max_weight=2.0 * max_train_size if max_train_size else None,
                            timeout=scenario.federation.timeout_s)
    return outer
