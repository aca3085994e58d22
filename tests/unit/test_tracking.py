"""TensorBoard tracking: a round record in, scalars out, read back from the event file."""

from pathlib import Path

import pytest

from fedsec.scenario import load_scenario
from fedsec.tracking import TensorBoardTracker, scalars_of

ROOT = Path(__file__).resolve().parents[2]

RECORD = {
    "round": 2, "time_s": 0.5,
    "global": {"loss": 0.5, "accuracy": 0.75, "auroc": 0.8125, "sensitivity": float("nan")},
    "per_hospital": {"cleveland": {"auroc": 0.9}, "va long beach": {"auroc": 0.6}},
    "train": {"cleveland": {"loss": 0.4, "num_examples": 10, "seconds": 0.1}},
    "selected": ["cleveland"], "failures": [],
    "attack": {"asr": 0.875, "note": "text is skipped"},
    "defense": {"flagged": ["va long beach"], "threshold": 1.5},
}


def test_scalars_of_a_round_record():
    s = scalars_of(RECORD)
    assert s["global/auroc"] == 0.8125 and "global/sensitivity" not in s  # NaN left out
    assert s["hospital/cleveland/auroc"] == 0.9 and s["hospital/va_long_beach/auroc"] == 0.6
    assert s["train/cleveland/loss"] == 0.4
    assert s["attack/asr"] == 0.875 and "attack/note" not in s
    assert s["defense/flagged"] == 1 and s["defense/threshold"] == 1.5
    assert s["time/round_s"] == 0.5


def test_event_file_reads_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = TensorBoardTracker(tmp_path / "tensorboard")
    tracker(RECORD)
    tracker({**RECORD, "round": 3, "global": {"auroc": 0.85}})
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    auroc = acc.Scalars("global/auroc")
    assert [(e.step, round(e.value, 6)) for e in auroc] == [(2, 0.8125), (3, 0.85)]
    assert acc.Scalars("attack/asr")[0].value == pytest.approx(0.875)
    assert acc.Scalars("hospital/cleveland/auroc")[0].value == pytest.approx(0.9)


def test_only_when_the_scenario_asks(tmp_path):
    quick = ROOT / "scenarios" / "quickstart.yaml"
    assert TensorBoardTracker.for_run(load_scenario(quick), tmp_path) is None
    pytest.importorskip("tensorboard")
    tracker = TensorBoardTracker.for_run(load_scenario(quick, ["output.tensorboard=true"]), tmp_path)
    tracker(RECORD)
    tracker.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
