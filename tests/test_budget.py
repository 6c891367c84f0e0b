"""Training to a time budget: the plan's arithmetic, and a run that takes the plan end to end."""

import pytest
import yaml

from cifarlab.budget import Timings, plan_steps
from cifarlab.config import load_recipe, parse_duration, with_steps
from cifarlab.errors import UserError
from cifarlab.train import train
from tests.conftest import make_config


def test_the_plan_fits_training_every_validation_and_the_final_passes():
    t = Timings(step=2.0, val_image=0.01)  # 100 steps an epoch, 1,000 val images: 10 s a pass
    steps = plan_steps(t, seconds_left=900.0, steps_per_epoch=100, n_val=1000, final=40.0)
    epochs = -(-steps // 100)
    used = steps * 2.0 + epochs * 10.0 + 40.0
    assert used <= 900.0 and used + 2.0 + 10.0 > 900.0  # one more step (and pass) would not fit
    assert plan_steps(t, seconds_left=1.0, steps_per_epoch=100, n_val=1000, final=40.0) == 1


def test_a_fractional_length_keeps_the_schedules_shape():
    fast = load_recipe("fast")  # 16 epochs, 3.5 of warm-up
    planned = with_steps(fast, steps=250, steps_per_epoch=44)
    assert planned.train_steps == 250 and planned.epochs == 6
    assert planned.warmup_epochs == pytest.approx(3.5 * (250 / 44) / 16, abs=1e-4)


@pytest.mark.parametrize(
    ("text", "seconds"), [("900", 900), ("90s", 90), ("15m", 900), ("1.5h", 5400)]
)
def test_durations_read_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-5m", "soon", "nanm"])
def test_bad_durations_are_one_line_errors(text):
    with pytest.raises(UserError, match="expected a duration"):
        parse_duration(text)


def test_a_budgeted_run_says_what_it_chose_and_stores_it(synthetic_images, tmp_path, monkeypatch):
    monkeypatch.setattr("cifarlab.budget.measure", lambda run: Timings(step=1.0, val_image=0.001))
    messages = []
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                         epochs=10, warmup_epochs=1.0, batch_size=8, val_size=6, lr=0.02, time_budget=5.5,
                         threads=1)  # fmt: skip
    result = train(config, tmp_path / "run", log=messages.append)
    chosen = [m for m in messages if m.startswith("time budget")]
    assert chosen and "steps (" in chosen[0]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert 1 <= saved["train_steps"] <= 5 and saved["time_budget"] == 5.5
    steps_per_epoch = 30 // 8
    assert saved["epochs"] == -(-saved["train_steps"] // steps_per_epoch) == len(result.history)
    again = []
    train(config, tmp_path / "run", resume=True, log=again.append)  # the same budgeted run
    assert any("already finished" in m for m in again)
