"""A DP-SGD privacy budget per hospital (privacy.dp_sgd.budgets): bad keys are exit 2 naming
the key; the server never selects a hospital past its budget (asserted from rounds.jsonl),
hospitals with different budgets leave at different rounds, and the run ends cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsec.cli import main
from fedsec.errors import FedsecError, ScenarioError
from fedsec.privacy.budget import Budget, BudgetExhausted, BudgetKeeper, parse_budgets
from fedsec.privacy.dp_sgd import DPConfig, EpsilonLedger, epsilon, plan
from fedsec.scenario import load_scenario

HEART = Path(__file__).resolve().parents[2] / "scenarios" / "heart_fedavg.yaml"


def _load_error(budgets: str) -> ScenarioError:
    with pytest.raises(ScenarioError) as info:
        load_scenario(HEART, [f"privacy.dp_sgd={{noise_multiplier: 1.0, budgets: {budgets}}}"])
    return info.value


@pytest.mark.parametrize("budgets,key,text", [
    ("{clevland: {epsilon: 2.0}}", "privacy.dp_sgd.budgets.clevland", "unknown hospital 'clevland' (did you mean 'cleveland'?)"),
    ("{cleveland: {epsilon: 0}}", "privacy.dp_sgd.budgets.cleveland.epsilon", "must satisfy 0 < value"),
    ("{default: {epsilon: -1.0}}", "privacy.dp_sgd.budgets.default.epsilon", "must satisfy 0 < value"),
    ("{va: {epsilon: 1.0, delta: 1.0}}", "privacy.dp_sgd.budgets.va.delta", "value < 1"),
    ("{va: {epsilon: 1.0, eps: 2}}", "privacy.dp_sgd.budgets.va.eps", "unknown option"),
    ("{va: {delta: 1.0e-5}}", "privacy.dp_sgd.budgets.va.epsilon", "missing"),
    ("[1, 2]", "privacy.dp_sgd.budgets", "expected a mapping"),
])
def test_bad_budgets_are_scenario_errors_naming_the_key(budgets, key, text):
    err = _load_error(budgets)
    assert err.key == key and text in err.detail


def test_bad_budgets_exit_2_naming_the_key(tmp_path, capsys):
    code = main(["run", str(HEART), "engine.name=inline",
                 "privacy.dp_sgd={noise_multiplier: 1.0, budgets: {hungry: {epsilon: 1.0}}}", "--out", str(tmp_path)])
    assert code == 2
    assert "key 'privacy.dp_sgd.budgets.hungry'" in capsys.readouterr().err
    # delta >= 1/N of that hospital (switzerland: N = 30, 1/N = 0.033): refused before training
    code = main(["run", str(HEART), "engine.name=inline",
                 "privacy.dp_sgd={noise_multiplier: 1.0, budgets: {switzerland: {epsilon: 1.0, delta: 0.05}}}",
                 "--out", str(tmp_path / "b")])
    assert code == 2
    err = capsys.readouterr().err
    assert "privacy.dp_sgd.budgets.switzerland.delta: 0.05 is not below 1/N for switzerland (N = 30" in err
    assert not (tmp_path / "b" / "rounds.jsonl").exists()


def test_a_budget_delta_is_the_hospitals_own_delta():
    dp = DPConfig.parse({"noise_multiplier": 1.0, "delta": 1e-4,
                         "budgets": {"va": {"epsilon": 3.0, "delta": 1e-5}, "default": 8.0}})
    assert dp.budgets["default"] == Budget(8.0, None)
    assert dp.for_hospital("va").delta == 1e-5 and dp.for_hospital("cleveland").delta == 1e-4
    assert dp.for_hospital("va").budgets == dp.budgets
    assert parse_budgets(None) is None


class _Local:
    epochs, batch_size, steps = 1, 4, None


def test_the_keeper_predicts_the_next_round_with_the_accountant_and_leaves_out_who_would_exceed():
    dp = DPConfig.parse({"noise_multiplier": 1.0, "budgets": {"a": {"epsilon": 1.0}, "b": {"epsilon": 100.0}}})
    ledger = EpsilonLedger()
    keeper = BudgetKeeper(dp, ["a", "b", "c"], {0: 199, 1: 199, 2: 30}, _Local(), 20, ledger)
    p = plan(dp, 199, _Local(), 20)
    one = epsilon(p.noise_multiplier, p.sample_rate, p.steps_per_round, p.delta)
    assert keeper.next_epsilon(0) == pytest.approx(one) and one < 1.0
    assert keeper.eligible([0, 1, 2], 1) == [0, 1, 2]  # c has no budget; a's first round fits
    ledger.record_round(1, ["a", "b", "c"], {h: {"dp-epsilon": one, "dp-rounds": 1} for h in ("a", "b", "c")})
    two = epsilon(p.noise_multiplier, p.sample_rate, 2 * p.steps_per_round, p.delta)
    assert keeper.next_epsilon(0) == pytest.approx(two) and two > 1.0
    assert keeper.eligible([0, 1, 2], 2) == [1, 2]
    assert keeper.round_block() == {"left_out": ["a"], "next_epsilon": {"a": pytest.approx(two)}}
    assert keeper.stopped_at == {"a": 2}
    # nobody left: a clean stop, naming what each has spent
    tight = DPConfig.parse({"noise_multiplier": 1.0, "budgets": {"default": {"epsilon": 0.5}}})
    with pytest.raises(BudgetExhausted, match=r"round 1: every hospital's privacy budget is spent.*a 0 of 0\.5"):
        BudgetKeeper(tight, ["a", "b"], {0: 199, 1: 199}, _Local(), 20, EpsilonLedger()).eligible([0, 1], 1)
    assert issubclass(BudgetExhausted, FedsecError)


def test_hospitals_leave_at_their_budgets_and_the_run_ends_cleanly(tmp_path):
    """Heart, DP-SGD noise 1.0, inline engine: cleveland's budget is 1.0 (one round costs it
    0.87, two 1.07), hungary's 2.0 (seven rounds), switzerland 3.0 at its own delta 0.01
    (four rounds; at the default delta 1e-3 one round already costs it 2.36), va the default
    3.0 (seven rounds)."""
    import fedsec

    budgets = ("{cleveland: {epsilon: 1.0}, hungary: {epsilon: 2.0}, switzerland: {epsilon: 3.0, delta: 0.01}, "
               "default: {epsilon: 3.0}}")
    summary = fedsec.run(str(HEART), overrides=["engine.name=inline", "federation.rounds=20",
                                                f"privacy.dp_sgd={{noise_multiplier: 1.0, budgets: {budgets}}}"],
                         out=tmp_path, progress=False)
    assert summary["status"] == "budget_exhausted" and "round 8: every hospital's privacy budget is spent" in summary["error"]
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 7
    budget = {"cleveland": 1.0, "hungary": 2.0, "switzerland": 3.0, "va": 3.0}
    stopped: dict[str, int] = {}
    for r in rounds:
        dp = r["privacy"]["dp_sgd"]
        for h, eps in dp["epsilon"].items():
            assert eps <= budget[h]  # never past its budget
        for h in r["privacy"]["budget"]["left_out"]:
            stopped.setdefault(h, r["round"])
            assert r["privacy"]["budget"]["next_epsilon"][h] > budget[h]
        for h in r["selected"]:
            assert h not in stopped  # never selected again once left out
        assert set(r["selected"]).isdisjoint(r["privacy"]["budget"]["left_out"])
    assert stopped == {"cleveland": 2, "switzerland": 5}
    assert rounds[0]["privacy"]["dp_sgd"]["delta"]["switzerland"] == 0.01  # its own delta
    assert rounds[0]["privacy"]["dp_sgd"]["delta"]["va"] == 0.001
    # the ledger: hospitals with different budgets left at different rounds
    ledger = summary["privacy"]["dp_sgd"]["ledger"]
    assert {h: (e["last_round"], e["stopped_at"], e["budget"]) for h, e in ledger.items()} == {
        "cleveland": (1, 2, 1.0), "hungary": (7, 8, 2.0), "switzerland": (4, 5, 3.0), "va": (7, 8, 3.0)}
    assert ledger["switzerland"]["budget_delta"] == 0.01
    # evaluation still covers every hospital (a stopped hospital keeps receiving the model)
    assert set(rounds[-1]["per_hospital"]) == set(budget)
