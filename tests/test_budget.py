"""Training to a time budget: the plan's arithmetic, and a run that takes the plan end to end."""

import dataclasses
import re
import time

import pytest
import torch
import yaml

from cifarlab.budget import MIN_STEP_SECONDS, Timings, final_images, plan_steps
from cifarlab.checkpoint import load_checkpoint
from cifarlab.config import (
    TrainConfig,
    differences,
    load_recipe,
    model_width,
    parse_duration,
    save_config,
    with_steps,
)
from cifarlab.errors import UserError
from cifarlab.train import train
from tests.conftest import make_config


def test_the_plan_fits_training_every_validation_and_the_final_passes():
    # 2 s a step, 100 steps an epoch, 10 s of validation and saving an epoch, 40 s at the end
    steps = plan_steps(2.0, 10.0, seconds_left=900.0, steps_per_epoch=100, final=40.0)
    epochs = -(-steps // 100)
    used = steps * 2.0 + epochs * 10.0 + 40.0
    assert used <= 900.0 and used + 2.0 + 10.0 > 900.0  # one more step (and pass) would not fit
    assert plan_steps(2.0, 10.0, seconds_left=1.0, steps_per_epoch=100, final=40.0) == 1


def test_a_week_of_sub_second_epochs_is_planned_to_its_end():
    # 20 steps of 10 ms and 0.1 s of validation an epoch (a GPU's `fast`): two million epochs
    week = 7 * 86400.0
    steps = plan_steps(0.01, 0.1, week, 20, 5.0)
    epochs = -(-steps // 20)
    used = steps * 0.01 + epochs * 0.1 + 5.0
    assert used <= week and used + 0.01 + 0.1 > week  # not capped short of the budget
    for later, first in ((None, None), (0.008, lambda e: 20 * max(1, e // 3))):  # whole epochs
        assert plan_steps(0.01, 0.1, 3000.0, 20, 5.0, later, first) == _every_length(
            0.01, 0.1, 3000.0, 20, 5.0, later or 0.01, first or (lambda e: 20 * e)
        )


@pytest.mark.parametrize("step", [0.0, 1e-12])
def test_a_step_timed_at_zero_plans_a_bounded_run_not_a_division_by_zero(step):
    """A coarse timer reads a fast step as 0 s: it divided by zero, or planned ~1e13 steps."""
    for per_epoch in (0.0, 0.1):  # an evaluated image timed at 0 s too, or not
        steps = plan_steps(step, per_epoch, 60.0, 10, 0.0)
        assert 1 <= steps <= 60.0 / MIN_STEP_SECONDS


def _every_length(step, per_epoch, seconds, steps_per_epoch, final, later, first):
    """The most steps that fit, trying every number of epochs (the plan's definition)."""
    best = 0
    for epochs in range(1, int(seconds / per_epoch) + 2):
        room = seconds - final - epochs * per_epoch
        early = min(epochs * steps_per_epoch, first(epochs))
        fit = (
            int(room // step)
            if room <= early * step
            else early + int((room - early * step) // later)
        )
        if fit > (epochs - 1) * steps_per_epoch:
            best = max(best, min(epochs * steps_per_epoch, fit))
    return best


def test_steps_that_get_cheaper_after_the_first_epochs_fill_the_time_left():
    # 2 s a step for the first 100 steps (fastnet's whitening bias still training), then 1 s
    steps = plan_steps(2.0, 10.0, 900.0, 100, 40.0, later=1.0, first_steps=lambda epochs: 100)
    assert steps == 690  # 100 x 2 + 590 x 1 + 7 epochs x 10 + 40 = 900
    assert plan_steps(2.0, 10.0, 900.0, 100, 40.0) < steps  # at one pace: fewer


def test_the_probe_times_fastnet_as_it_trains_first_and_once_its_whitening_bias_stops(
    real_jpegs, data_root, monkeypatch
):
    import cifarlab.budget as budget
    from cifarlab.distributed import init_distributed
    from cifarlab.models.whitening import first_conv
    from cifarlab.training_run import build_run

    config = make_config(data=str(real_jpegs), data_root=str(data_root), val_size=100, subset=600,
                         batch_size=50, model="fastnet", whitening=True, whiten_bias_epochs=2,
                         epochs=6, amp="off")  # fmt: skip
    run = build_run(config, lambda s: None, init_distributed())
    trains = []

    def fake_step(run, batches, global_step):
        trains.append(first_conv(run.model).bias.requires_grad)
        return 0.5 if trains[-1] else 0.4

    monkeypatch.setattr(budget, "_step_seconds", fake_step)
    timings = budget.measure(run, timed=0.0)
    assert trains == [True, False] * 4  # alternating: 1 warm-up + 3 timed steps each
    assert (timings.step, timings.settled) == (0.5, 0.4)
    trains.clear()  # cheap steps are timed until each phase has 2 s timed: 0.4 s x 5
    assert budget.measure(run).step == 0.5 and trains == [True, False] * 6
    trains.clear()
    assert budget.measure(run, timed=100.0, most=4) and trains == [True, False] * 5
    trains.clear()  # steps whose warm-up alone took the probe's share of a short budget
    assert budget.measure(run, within=0.8) and trains == [True, False] * 2
    trains.clear()  # a pace that rules the run out stops the probe at its first timed step
    assert budget.measure(run, too_slow=lambda seconds: seconds > 0.45) is None
    assert trains == [True, False, True]
    trains.clear()  # a warm-up step twice as slow as that: at once
    assert budget.measure(run, too_slow=lambda seconds: seconds > 0.2) is None and trains == [True]
    first = budget.early_steps(config, 12)
    assert first(6) == 24 and first(3) == 12  # 2 of 6 epochs, shaped as the run is: 1 of 3


def test_the_probe_times_the_runs_own_step_with_its_optimiser_ema_and_lookahead(
    real_jpegs, data_root, monkeypatch
):
    import copy

    import torch

    import cifarlab.budget as budget
    from cifarlab.distributed import init_distributed
    from cifarlab.muon import MuonSGD
    from cifarlab.training_run import build_run

    config = make_config(data=str(real_jpegs), data_root=str(data_root), val_size=100, subset=400,
                         batch_size=100, micro_batch=50, model="fastnet", width=0.25, optimizer="muon",
                         ema=True, lookahead=True, mixup_alpha=0.2, epochs=2, amp="off")  # fmt: skip
    calls = {"train_step": 0, "muon": 0, "ema": 0}
    real_train_step, real_muon = budget.train_step, MuonSGD.step

    def train_step(*args):
        calls["train_step"] += 1
        return real_train_step(*args)

    def muon_step(self, *args):
        calls["muon"] += 1
        return real_muon(self, *args)

    monkeypatch.setattr(budget, "train_step", train_step)
    monkeypatch.setattr(MuonSGD, "step", muon_step)  # before the run binds its optimiser
    run = build_run(config, lambda s: None, init_distributed())
    real_ema = run.ema.update_parameters

    def ema_update(model):
        calls["ema"] += 1
        return real_ema(model)

    run.ema.update_parameters = ema_update
    built = copy.deepcopy({"model": run.model.state_dict(), "ema": run.ema.state_dict()})
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    budget.measure(run, steps=2, warmup=1, timed=0.0)
    assert calls == {"train_step": 3, "muon": 3, "ema": 3}  # the run's Muon and EMA, no stand-in
    for part, state in (("model", run.model.state_dict()), ("ema", run.ema.state_dict())):
        assert all(torch.equal(v, state[k]) for k, v in built[part].items()), part  # put back
    assert torch.equal(torch.rand(2), expected)  # the global random state as it was


def test_the_plan_is_corrected_after_the_first_epoch_past_half_the_budget(monkeypatch):
    import types

    import cifarlab.budget as budget

    config = with_steps(make_config(epochs=9, time_budget=900.0, tta="none"), 180, 10)
    run = types.SimpleNamespace(config=config, batches=[None] * 10, val_labels=[0] * 100)
    plan = budget.Plan(900.0, started=0.0, n_test=0)
    clock = [400.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    said = []
    assert plan.correct(run, 40, 2.0, 0.001, 1.0, said.append) is None  # before half the budget
    clock[0] = 500.0  # 5 epochs took 500 s, the last at 8 s a step: slower than planned
    corrected = plan.correct(run, 50, 8.0, 0.001, 1.0, said.append)
    final = 0.001 * budget.final_images(config, 100, 0)
    assert corrected.train_steps == 50 + budget.plan_steps(8.0, 1.0, 400.0, 10, final) < 180
    assert corrected.epochs == -(-corrected.train_steps // 10)
    assert said[0].startswith("time budget: epoch 5 ran at 8.000 s/step")
    run.config = corrected
    clock[0] = 550.0  # before the next check, an eighth of the budget later
    assert plan.correct(run, 55, 2.0, 0.001, 1.0, said.append) is None
    clock[0] = 620.0  # on the plan's pace: within 5% of the budget, the length stands
    assert plan.correct(run, 64, 8.0, 0.001, 1.0, said.append) is None and len(said) == 1
    assert plan.checks == 2


def test_a_late_check_is_followed_by_the_next_an_eighth_of_the_budget_later(monkeypatch):
    """A first check at the end of a long epoch, well past half the budget: the checks due on
    the schedule since came one every two steps of the next epoch, each timed on those two."""
    import types

    import cifarlab.budget as budget

    config = with_steps(make_config(epochs=9, time_budget=900.0, tta="none"), 180, 10)
    run = types.SimpleNamespace(config=config, batches=[None] * 10, val_labels=[0] * 100)
    plan = budget.Plan(900.0, started=0.0, n_test=0)
    clock = [700.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    run.config = plan.correct(run, 70, 10.0, 0.001, 1.0, lambda s: None)  # 7 epochs, 10 s/step
    assert run.config is not None and plan.checks == 1
    clock[0] = 705.0  # two steps into the next epoch, one of them fast
    assert plan.correct(run, 72, 5.0, 0.001, 1.0, lambda s: None) is None and plan.checks == 1
    clock[0] = 700.0 + 900 / 8
    assert plan.due(run, 84)


def test_a_run_that_slows_after_its_correction_is_corrected_again(monkeypatch):
    """Other work that starts after the correction slowed a run's steps 2x: corrected once, it
    ended near twice its budget."""
    import types

    import cifarlab.budget as budget

    config = with_steps(make_config(epochs=9, time_budget=900.0, tta="none"), 180, 10)
    run = types.SimpleNamespace(config=config, batches=[None] * 10, val_labels=[0] * 100)
    plan = budget.Plan(900.0, started=0.0, n_test=0)
    clock = [450.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    run.config = plan.correct(run, 90, 5.0, 0.001, 1.0, lambda s: None)  # on the planned pace
    assert abs(run.config.train_steps - 180) <= 2 and plan.checks == 1
    clock[0] = 600.0  # 110 steps in: 20 took 150 s, 7.5 s each, slower than the 5 s planned
    later = plan.correct(run, 110, 7.5, 0.001, 1.0, lambda s: None)
    final = 0.001 * budget.final_images(config, 100, 0)
    assert later.train_steps == 110 + budget.plan_steps(7.5, 1.0, 300.0, 10, final) < 160


def test_the_plan_is_not_corrected_on_an_epoch_before_the_pace_settles(monkeypatch):
    """Epochs that train the whitening bias step slower than the rest: a correction on one of
    them planned every later step at that pace, and a 2-minute run ended 8% early."""
    import types

    import cifarlab.budget as budget
    from cifarlab.training_run import settling_epoch

    config = make_config(epochs=9, time_budget=900.0, tta="none", whitening=True)
    config = with_steps(dataclasses.replace(config, whiten_bias_epochs=6), 90, 10)
    settle = settling_epoch(config)
    assert settle == 6
    run = types.SimpleNamespace(config=config, batches=[None] * 10, val_labels=[0] * 100)
    plan = budget.Plan(900.0, started=0.0, n_test=0)
    clock = [500.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    assert plan.correct(run, settle * 10, 8.0, 0.001, 1.0, lambda s: None) is None
    clock[0] = 600.0
    assert plan.correct(run, settle * 10 + 10, 8.0, 0.001, 1.0, lambda s: None) is not None


def test_a_plan_far_shorter_than_the_budget_is_corrected_halfway_through_itself(monkeypatch):
    import types

    import cifarlab.budget as budget

    config = with_steps(make_config(epochs=9, time_budget=900.0, tta="none"), 80, 10)
    run = types.SimpleNamespace(config=config, batches=[None] * 10, val_labels=[0] * 100)
    plan = budget.Plan(900.0, started=0.0, n_test=0, planned_end=200.0)  # a probe slowed 4x
    clock = [90.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    assert plan.correct(run, 30, 0.5, 0.001, 1.0, lambda s: None) is None  # before half the plan
    clock[0] = 120.0  # 4 epochs in 120 s, at 0.5 s a step: the rest of the budget fits more
    corrected = plan.correct(run, 40, 0.5, 0.001, 1.0, lambda s: None)
    assert corrected is not None and corrected.train_steps > 80 * 5


def test_the_final_passes_count_tta_calibration_and_test():
    fast = load_recipe("fast")  # flip-translate: 4 views
    assert final_images(fast, n_val=1000, n_test=0) == 4 * 1000 + 1000  # one fit: best.pt's
    assert final_images(fast, n_val=1000, n_test=500) == 5000 + 500 * 5
    ema = dataclasses.replace(fast, ema=True)  # the weights and the EMA weights
    assert final_images(ema, n_val=1000, n_test=0) == 4 * 1000 + 2 * 1000


def test_a_fractional_length_keeps_the_schedules_shape():
    fast = load_recipe("fast-sgd")  # 16 epochs, 3.5 of warm-up
    planned = with_steps(fast, steps=250, steps_per_epoch=44)
    assert planned.train_steps == 250 and planned.epochs == 6
    assert planned.warmup_epochs == pytest.approx(3.5 * (250 / 44) / 16, abs=1e-4)


@pytest.mark.parametrize(
    ("text", "seconds"), [("900", 900), ("90s", 90), ("15m", 900), ("1.5h", 5400), ("2d", 172800)]
)
def test_durations_read_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


def test_a_recipe_file_and_the_api_take_durations_as_the_command_line_does(tmp_path):
    import cifarlab

    (tmp_path / "mine.yaml").write_text("base: fast\ntime_budget: 15m\n")
    assert load_recipe(str(tmp_path / "mine.yaml")).time_budget == 900
    assert cifarlab.recipe("fast-cpu", time_budget="1.5h").time_budget == 5400
    assert cifarlab.recipe("fast-cpu", time_budget=0).time_budget == 0  # off, as before
    (tmp_path / "mine.yaml").write_text("base: fast\ntime_budget: soonm\n")
    with pytest.raises(UserError, match="mine.yaml: 'time_budget' 'soonm': expected a positive"):
        load_recipe(str(tmp_path / "mine.yaml"))


@pytest.mark.parametrize("text", ["", "m", "-5m", "soon", "nanm", "0"])
def test_bad_durations_are_one_line_errors(text):
    with pytest.raises(UserError, match="expected a positive duration"):
        parse_duration(text)


@pytest.mark.parametrize("args", [["--time-budget", "200h"], ["--time-budget", "-3", "--epochs", "2"],
                                  ["--time-budget", "1e9", "--epochs", "2"], ["--time-budget", "-5s"],
                                  ["--time-budget", "-.5h", "--epochs", "2"]])  # fmt: skip
def test_a_bad_budget_is_said_before_any_flag_conflict(args, tmp_path, capsys):
    from cifarlab.cli import main

    assert main(["train", "--recipe", "fast", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and (
        "at most 7 days" in err or "expected a positive duration" in err
    )
    assert not (tmp_path / "r").exists()


def test_a_budgeted_run_says_what_it_chose_and_trains_that_length(
    synthetic_images, tmp_path, monkeypatch
):
    # the probe is told a step takes 0.4 s: the plan fits a few epochs of 3 steps
    monkeypatch.setattr(
        "cifarlab.budget.measure", lambda run, **_: Timings(step=0.4, val_image=0.001)
    )
    messages = []
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                         epochs=10, warmup_epochs=1.0, batch_size=8, val_size=6, lr=0.02, time_budget=8.0,
                         threads=1, lookahead=True)  # fmt: skip
    result = train(config, tmp_path / "run", log=messages.append)
    chosen = [m for m in messages if m.startswith("time budget")]
    assert "steps (" in chosen[0]  # then maybe corrected past half the budget, and again
    assert all("ran at" in m for m in chosen[1:])
    first = int(chosen[0].split(" steps (")[0].split()[-1])
    length = int(chosen[-1].split(" steps instead")[0].split()[-1]) if chosen[1:] else first
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert first > 3 and saved["train_steps"] == length and saved["time_budget"] == 8.0
    steps_per_epoch = 30 // 8
    assert saved["epochs"] == -(-length // steps_per_epoch) == len(result.history)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["scheduler"]["last_epoch"] == length  # the schedule ran to its end
    assert ckpt["config"]["train_steps"] == length
    again = []
    train(config, tmp_path / "run", resume=True, log=again.append)  # the same budgeted run
    assert any("already finished" in m for m in again)


def test_the_probe_leaves_no_trace_a_budgeted_run_equals_its_planned_length_run(
    synthetic_images, tmp_path, monkeypatch
):
    # the probe trains the run it times (with its lookahead and EMA), then the run is built
    # again: the weights must be those of a run given the planned length from the start
    import torch

    monkeypatch.setattr("cifarlab.budget.Plan.correct", lambda *args: None)  # no re-plan
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                         epochs=4, batch_size=8, val_size=6, lr=0.005, time_budget=5.0, threads=1,
                         ema=True, lookahead=True, mixup_alpha=0.2)  # fmt: skip
    train(config, tmp_path / "budgeted", log=lambda s: None)
    planned = yaml.safe_load((tmp_path / "budgeted" / "config.yaml").read_text())
    fixed = make_config(**{**planned, "time_budget": 0.0})
    train(fixed, tmp_path / "fixed", log=lambda s: None)
    a = load_checkpoint(tmp_path / "budgeted" / "last.pt")
    b = load_checkpoint(tmp_path / "fixed" / "last.pt")
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == planned["train_steps"]
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def _train_fitting_width(images, tmp_path, monkeypatch, measure, budget: float):
    """A cnn with `fit_width` for 10 epochs of 3 steps under `budget` seconds, `measure` standing
    in for the timing; (its config, what it logged)."""
    monkeypatch.setattr("cifarlab.budget.measure", measure)
    monkeypatch.setattr("cifarlab.budget.Plan.correct", lambda *args: None)
    config = make_config(data=str(images), data_root=str(tmp_path / "d"), model="cnn", epochs=10,
                         batch_size=8, val_size=6, lr=0.02, time_budget=budget, threads=1,
                         fit_width=True)  # fmt: skip
    messages = []
    train(config, tmp_path / "run", log=messages.append)
    return config, messages


@pytest.mark.parametrize(
    ("scale", "stops_early", "tried", "width"),
    [
        (10, True, ["under half of 10 epochs fit at width 1; trying 0.5"], 0.5),
        (10, False, [r"2\.\d+ of 10 epochs fit at width 1; trying 0.5"], 0.5),
        (100, True, ["at width 1; trying 0.5", "at width 0.5; trying 0.25"], 0.25),  # the floor
    ],
)
def test_fit_width_halves_the_width_while_under_half_the_epochs_fit(
    synthetic_images, tmp_path, monkeypatch, capsys, scale, stops_early, tried, width
):
    from cifarlab.cli import main

    # a step costs scale x width^2 s against an 80 s budget for 10 epochs of 3 steps: a first
    # step (or the whole probe) shows that under half of them fit until the width is narrow
    def measure(run, too_slow=None, stopped=None, **_):
        step = scale * model_width(run.config) ** 2
        if stops_early and too_slow and too_slow(step):
            return None
        return Timings(step=step, val_image=0.001)

    config, messages = _train_fitting_width(synthetic_images, tmp_path, monkeypatch, measure, 80.0)
    narrowed = [m for m in messages if "; trying " in m]
    assert len(narrowed) == len(tried) and all(map(re.search, tried, narrowed)), narrowed
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["config"]["width"] == 1 and ckpt["model_args"]["width"] == width
    assert ckpt["config"]["width_halvings"] == len(tried)
    again = []
    train(config, tmp_path / "run", resume=True, log=again.append)  # the recipe's config still
    assert any("already finished" in m for m in again)  # names the same run
    for flags in ([], ["--set", "width=1"]):  # --resume as the CLI builds it: saved + flags
        assert main(["train", "--resume", "--out", str(tmp_path / "run"), *flags]) == 0
        assert "already finished" in capsys.readouterr().out
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "--set", "width=2"]) == 2
    assert "width: 1.0 -> 2.0" in capsys.readouterr().err  # never narrowed from 2
    saved = TrainConfig(**ckpt["config"])
    assert differences(saved, config) == []
    assert differences(saved, dataclasses.replace(config, fit_width=False)) == ["width_halvings"]
    assert differences(saved, dataclasses.replace(config, width=2.0)) == ["width"]


def test_a_budget_too_short_for_one_step_is_refused_and_leaves_no_run(
    synthetic_images, tmp_path, monkeypatch
):
    monkeypatch.setattr(
        "cifarlab.budget.measure", lambda run, **_: Timings(step=0.4, val_image=0.001)
    )
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                         epochs=10, batch_size=8, val_size=6, lr=0.02, time_budget=0.3, threads=1)  # fmt: skip
    with pytest.raises(
        UserError, match=r"--time-budget 0.3s is too short .* give --time-budget \d+s or more$"
    ):
        train(config, tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_a_budget_spent_before_training_starts_is_refused_before_the_data_loads(
    synthetic_images, tmp_path
):
    import time

    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn",
                         epochs=1, batch_size=8, val_size=6, time_budget=2.0)  # fmt: skip
    with pytest.raises(UserError, match=r"--time-budget 2s was spent before training could start"):
        train(config, tmp_path / "run", log=lambda s: None, started=time.perf_counter() - 3.0)
    assert not (tmp_path / "run").exists() and not (tmp_path / "d").exists()


def test_an_explicit_length_replaces_the_recipes_time_budget():
    from cifarlab.config import with_epochs, with_length

    fast_cpu = load_recipe("fast-cpu")
    assert fast_cpu.time_budget == 900
    assert with_epochs(fast_cpu, 2).time_budget == 0
    assert with_length(fast_cpu, None, 0.5).time_budget == 0


def _refused_at_every_width(synthetic_images, tmp_path, monkeypatch, per_width: float):
    """A `fit_width` run of 60 s whose first step is too slow at every width, each timing taking
    `per_width` seconds of a clock only the timings move: its error and the widths timed."""
    import types

    clock, timed = [time.perf_counter()], []
    timer = types.SimpleNamespace(perf_counter=lambda: clock[0], process_time=time.process_time)

    def measure(run, too_slow=None, stopped=None, **_):
        clock[0] += per_width
        timed.append(model_width(run.config))
        return None if too_slow and too_slow(100.0) else Timings(step=100.0, val_image=0.001)

    monkeypatch.setattr("cifarlab.budget.measure", measure)
    monkeypatch.setattr("cifarlab.train.time", timer)
    monkeypatch.setattr("cifarlab.budget.time", timer)
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn",
                         epochs=10, batch_size=8, val_size=6, lr=0.02, time_budget=60.0, threads=1,
                         fit_width=True)  # fmt: skip
    with pytest.raises(UserError) as refused:
        train(config, tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run").exists()
    return str(refused.value), timed


def test_a_budget_too_short_at_fit_widths_narrowest_names_that_width(
    synthetic_images, tmp_path, monkeypatch
):
    error, timed = _refused_at_every_width(synthetic_images, tmp_path, monkeypatch, 0.0)
    assert "too short for this run here at width 0.25: " in error and timed == [1.0, 0.5, 0.25]


def test_a_budget_spent_timing_one_width_is_refused_before_timing_a_narrower_one(
    synthetic_images, tmp_path, monkeypatch
):
    """`fast-cpu --subset 3000 --time-budget 60s` timed three widths under load and refused
    after 185 s."""
    error, timed = _refused_at_every_width(synthetic_images, tmp_path, monkeypatch, 40.0)
    assert "at width 1, and the 20 s left cannot time a narrower one" in error and timed == [1.0]


def test_fit_width_keeps_the_width_when_timing_a_narrower_one_would_eat_the_time_left(
    synthetic_images, tmp_path, monkeypatch
):
    import time

    # each timing takes 2 s of a 6 s budget, and under half of the 10 epochs fit at width 1
    def measure(run, too_slow=None, stopped=None, **_):
        time.sleep(2.0)
        return Timings(step=0.3, val_image=0.0001)

    _, messages = _train_fitting_width(synthetic_images, tmp_path, monkeypatch, measure, 6.0)
    assert not any("; trying " in m for m in messages), messages
    assert any("at width 1; kept, as timing a narrower one" in m for m in messages), messages
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["width_halvings"] == 0


def test_a_run_ending_within_its_epoch_is_corrected_on_the_steps_it_has_taken(monkeypatch):
    import types

    import cifarlab.budget as budget

    config = with_steps(make_config(epochs=1, time_budget=120.0, tta="none"), 60, 100)
    run = types.SimpleNamespace(config=config, batches=[None] * 100, val_labels=[0] * 100)
    plan = budget.Plan(120.0, started=0.0, n_test=0, planned_end=110.0, val_image=0.001)
    clock = [50.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: clock[0])
    assert not plan.due(run, 30)  # before half the plan
    clock[0] = 60.0
    assert plan.due(run, 30) and not plan.due(run, 2)  # two steps are too few to time
    longer = types.SimpleNamespace(config=with_steps(config, 160, 100), batches=run.batches)
    assert not plan.due(longer, 30)  # an epoch's end comes first and corrects there
    for other in (dict(compile=True), dict(whitening=True, whiten_bias_epochs=1)):
        unsettled = types.SimpleNamespace(
            config=dataclasses.replace(config, **other), batches=run.batches
        )
        assert not plan.due(unsettled, 30), other  # its pace is not the rest's: asked no more
    said = []  # 30 steps at 0.3 s each, far faster than planned: the rest fits over 2 epochs
    corrected = plan.correct(run, 30, 0.3, 0.001, 0.1, said.append)
    final = 0.001 * budget.final_images(config, 100, 0)
    assert corrected.train_steps == budget.plan_steps(0.3, 0.1, 60.0 + 30 * 0.3, 100, final)
    assert corrected.train_steps > 200 and corrected.epochs == 3
    assert said[0].startswith("time budget: 30 steps of epoch 1 ran at 0.300 s/step")
    assert not plan.due(run, 40)  # the next check comes an eighth of the budget later
    clock[0] = 75.0
    assert plan.due(run, 40)


@pytest.mark.parametrize("killed_writing", ["config.yaml", "last.pt"])
def test_a_run_corrected_within_its_epoch_ends_there_and_resumes_after_a_kill(
    killed_writing, synthetic_images, tmp_path, monkeypatch
):
    # corrected within epoch 1, the run has no last.pt yet: config.yaml is all it has, and a
    # kill while the correction writes either file must leave a run --resume starts over
    import cifarlab.budget as budget
    from cifarlab.checkpoint import Checkpointer

    class Killed(BaseException):
        pass

    real_fit, real_save = budget.fit_to_budget, Checkpointer.save

    def fit_late(run, started, log, *args):  # a plan whose budget is all but spent
        plan = real_fit(run, started, log, *args)
        plan.started -= plan.time_budget
        return plan

    def killed_config(config, path):
        if config.train_steps == 5:
            raise Killed  # as config.yaml is written, before it is renamed in
        save_config(config, path)

    def killed_checkpoint(self, state, *args, **kwargs):
        raise Killed  # as last.pt is written, before it is renamed in

    monkeypatch.setattr(budget, "measure", lambda run, **_: Timings(step=1.5, val_image=0.001))
    monkeypatch.setattr("cifarlab.train.fit_to_budget", fit_late)
    if killed_writing == "config.yaml":
        monkeypatch.setattr("cifarlab.train.save_config", killed_config)
    else:
        monkeypatch.setattr(Checkpointer, "save", killed_checkpoint)
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn",
                         width=0.25, epochs=10, batch_size=2, val_size=6, lr=0.01, time_budget=20.0)  # fmt: skip
    said = []
    with pytest.raises(Killed):
        train(config, tmp_path / "run", log=said.append)
    assert any(s.startswith("time budget: 5 steps of epoch 1 ran at") for s in said), said
    assert not (tmp_path / "run" / "last.pt").exists()
    kept = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert kept["time_budget"] == 20.0 and kept["data"] == str(synthetic_images)
    monkeypatch.setattr("cifarlab.train.save_config", save_config)
    monkeypatch.setattr(Checkpointer, "save", real_save)
    said.clear()
    result = train(None, tmp_path / "run", resume=True, log=said.append)  # as `--resume` does
    assert any("starting it over with its config" in s for s in said), said
    assert result.epochs == 1 and len(result.history) == 1  # corrected again, ends in epoch 1
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train_steps"] == 5
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["train_steps"] == 5


def test_a_correction_within_an_epoch_shows_the_new_epoch_count_on_the_progress_bar(
    synthetic_images, tmp_path, monkeypatch
):
    """The bar said "epoch 1/1" for the rest of an epoch whose correction made the run 2 long,
    and counted a whole epoch's steps in a last epoch that ends partway."""
    from tqdm.auto import tqdm

    import cifarlab.budget as budget

    shown, totals = [], []

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            shown.append(kwargs["desc"])

        def set_description(self, desc=None, refresh=True):
            shown.append(desc)

        def close(self):  # tqdm closes again as it is collected
            if self.total is not None:
                totals.append(self.total)
            super().close()
            self.total = None

    def correct(plan, run, done, *args):  # after 5 steps: 20 steps, 2 epochs of 15
        if plan.checks:
            return None
        plan.checks = 1
        return dataclasses.replace(run.config, train_steps=20, epochs=2)

    monkeypatch.setattr(budget, "measure", lambda run, **_: Timings(step=1.5, val_image=0.001))
    monkeypatch.setattr(budget.Plan, "due", lambda plan, run, done: done >= 5 and not plan.checks)
    monkeypatch.setattr(budget.Plan, "correct", correct)
    monkeypatch.setattr("cifarlab.train.tqdm", Bar)
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn",
                         width=0.25, epochs=10, batch_size=2, val_size=6, lr=0.01, time_budget=20.0,
                         on_nan="skip")  # fmt: skip
    result = train(config, tmp_path / "run", log=lambda s: None)
    assert result.epochs == 2 and shown == ["epoch 1/1", "epoch 1/2", "epoch 2/2"]
    assert totals == [15, 5]  # the second epoch ends after 5 of its 15 steps


def test_a_crash_between_a_corrections_checkpoint_and_its_config_yaml_resumes(
    synthetic_images, tmp_path, monkeypatch
):
    # the correction rewrites last.pt and config.yaml: killed between the two, the run must
    # not read as one whose config.yaml a user edited
    class Killed(BaseException):
        pass

    def correct(plan, run, *args):  # one step more after epoch 1, whatever the timing says
        if plan.checks:
            return None
        plan.checks = 1
        return dataclasses.replace(run.config, train_steps=7, epochs=3)

    killed = []

    def killed_once(config, path):
        if config.train_steps == 7 and not killed:
            killed.append(path)
            raise Killed  # after last.pt, before config.yaml
        save_config(config, path)

    monkeypatch.setattr(
        "cifarlab.budget.measure", lambda run, **_: Timings(step=0.4, val_image=0.001)
    )
    monkeypatch.setattr("cifarlab.budget.Plan.correct", correct)
    monkeypatch.setattr("cifarlab.train.save_config", killed_once)
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn",
                         width=0.25, epochs=10, batch_size=8, val_size=6, time_budget=8.0)  # fmt: skip
    with pytest.raises(Killed):
        train(config, tmp_path / "run", log=lambda s: None)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["train_steps"] == 7
    result = train(config, tmp_path / "run", resume=True, log=lambda s: None)
    assert result.epochs == 3
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train_steps"] == 7


def test_ctrl_c_during_the_probe_ends_it_at_that_step_not_after_the_whole_probe(
    synthetic_images, tmp_path, monkeypatch
):
    # fast-cpu's probe on a CPU times 8 steps of 4 s: a Ctrl-C waited out all of them, and the
    # plan of a run that would not start, before it stopped
    import os
    import signal

    import cifarlab.budget as budget
    from cifarlab.errors import Interrupted

    steps, said = [], []

    def step_seconds(run, batches, global_step):
        steps.append(global_step)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return 0.01  # cheap: the whole probe would take 11 steps

    monkeypatch.setattr(budget, "_step_seconds", step_seconds)
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn",
                         width=0.25, epochs=10, batch_size=8, val_size=6, threads=1,
                         time_budget=600.0, fit_width=True)  # fmt: skip
    with pytest.raises(Interrupted, match="stopped before training started") as stop:
        train(config, tmp_path / "run", log=said.append)
    assert steps == [1, 2] and stop.value.exit_code == 130
    assert not any("time budget" in s for s in said), said  # no plan, no narrower width tried
    assert not (tmp_path / "run").exists()


def test_a_correction_within_an_epoch_times_its_later_steps_not_its_warm_up(
    synthetic_images, tmp_path, monkeypatch
):
    """A process's first steps run slower while its memory is first touched: timed over the
    whole epoch so far, a 2-minute run was planned 2-4% short."""
    import types

    import cifarlab.budget as budget
    import cifarlab.train as train_module

    real_step, real_fit, taken = train_module.train_step, budget.fit_to_budget, []
    clock = [time.perf_counter()]

    def warming_step(run, *args):  # 3 steps of 0.5 s, 6 of 0.01 s, then other work: 0.1 s
        taken.append(1)
        clock[0] += 0.5 if len(taken) <= 3 else 0.01 if len(taken) <= 9 else 0.1
        return real_step(run, *args)

    timer = types.SimpleNamespace(perf_counter=lambda: clock[0], process_time=time.process_time)
    monkeypatch.setattr(train_module, "time", timer)  # the run's clock: only the steps advance it
    monkeypatch.setattr(budget, "time", timer)

    def fit_late(run, started, log, *args):  # a plan with 5 s of its budget left
        plan = real_fit(run, started, log, *args)
        plan.started -= plan.time_budget - 5
        return plan

    monkeypatch.setattr(budget, "measure", lambda run, **_: Timings(step=0.05, val_image=0.001))
    monkeypatch.setattr(train_module, "train_step", warming_step)
    monkeypatch.setattr(train_module, "fit_to_budget", fit_late)
    monkeypatch.setattr(
        budget.Plan, "due", lambda plan, run, done: (done, plan.checks) in {(7, 0), (14, 1)}
    )
    monkeypatch.setattr(budget.Plan, "next_check", lambda plan: 0.0)  # as `due` says
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn",
                         width=0.25, epochs=1, batch_size=2, val_size=6, lr=0.01, time_budget=60.0,
                         on_nan="skip")  # fmt: skip
    said = []
    train(config, tmp_path / "run", log=said.append)
    line = next(s for s in said if s.startswith("time budget: 7 steps of epoch 1 ran at"))
    pace = float(line.split(" ran at ")[1].split()[0])
    assert pace == pytest.approx(0.01), line  # not the whole epoch so far: (2 * 0.5 + 4 * 0.01) / 6
    line = next(s for s in said if s.startswith("time budget: 14 steps of epoch 1 ran at"))
    pace = float(line.split(" ran at ")[1].split()[0])
    assert pace == pytest.approx(0.52 / 7, abs=5e-4), line  # steps 8-14, not 9-14 (0.085)


def test_a_run_lengthened_within_its_epoch_and_killed_after_resumes_to_the_same_weights(
    synthetic_images, tmp_path, monkeypatch
):
    """The correction stretches the schedule from a mid-epoch checkpoint: a run killed after it
    and resumed ends with the weights of the run that was not killed."""
    import cifarlab.budget as budget
    import cifarlab.train as train_module

    class Killed(BaseException):
        pass

    def correct(plan, run, done, *args):  # after 5 steps of a 12-step run: 20 steps
        plan.checks += 1
        return dataclasses.replace(run.config, train_steps=20, epochs=2)

    real_step, taken = train_module.train_step, []

    def killed_at_step_6(run, *args):
        taken.append(1)
        if kill and len(taken) == 6:
            raise Killed
        return real_step(run, *args)

    monkeypatch.setattr(budget, "measure", lambda run, **_: Timings(step=0.4, val_image=0.001))
    monkeypatch.setattr(budget, "plan_steps", lambda *args: 12)  # whatever start-up took
    monkeypatch.setattr(budget.Plan, "due", lambda plan, run, done: done == 5 and not plan.checks)
    monkeypatch.setattr(budget.Plan, "correct", correct)
    monkeypatch.setattr(train_module, "train_step", killed_at_step_6)
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn",
                         width=0.25, epochs=10, batch_size=2, val_size=6, lr=0.02, time_budget=60.0,
                         on_nan="skip", ema=True, lookahead=True)  # fmt: skip
    kill = False
    train(config, tmp_path / "whole", log=lambda s: None)
    kill = True
    taken.clear()
    with pytest.raises(Killed):
        train(config, tmp_path / "killed", log=lambda s: None)
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["next_step"] == 5  # the correction's
    kill = False
    train(None, tmp_path / "killed", resume=True, log=lambda s: None)
    whole, resumed = (load_checkpoint(tmp_path / r / "last.pt") for r in ("whole", "killed"))
    assert whole["config"]["train_steps"] == resumed["config"]["train_steps"] == 20
    for part in ("model", "ema"):
        for k, v in whole[part].items():
            assert torch.equal(v, resumed[part][k]), (part, k)


def test_a_later_check_within_an_epoch_does_not_time_the_corrections_own_save(
    synthetic_images, tmp_path, monkeypatch
):
    """The steps since a correction within the epoch were timed from before its checkpoint was
    written: a 3 s save over six 0.1 s steps read as 0.6 s a step."""
    import types

    import cifarlab.budget as budget
    import cifarlab.checkpoint as checkpoint
    import cifarlab.train as train_module

    real_step, real_save, paces = train_module.train_step, checkpoint.Checkpointer.save, []
    clock = [time.perf_counter()]

    def step(run, *args):
        clock[0] += 0.1
        return real_step(run, *args)

    def slow_save(saver, state, *args, end_of_epoch=True, **kwargs):
        clock[0] += 0.0 if end_of_epoch else 3.0
        return real_save(saver, state, *args, end_of_epoch=end_of_epoch, **kwargs)

    def correct(plan, run, done, pace, *args):  # after 4 of 12 steps: 14
        paces.append(pace)
        plan.checks += 1
        return dataclasses.replace(run.config, train_steps=14) if done == 4 else None

    timer = types.SimpleNamespace(perf_counter=lambda: clock[0], process_time=time.process_time)
    monkeypatch.setattr(train_module, "time", timer)
    monkeypatch.setattr(budget, "time", timer)
    monkeypatch.setattr(budget, "measure", lambda run, **_: Timings(step=0.1, val_image=0.001))
    monkeypatch.setattr(budget, "plan_steps", lambda *args: 12)
    monkeypatch.setattr(budget.Plan, "due", lambda plan, run, done: done in (4, 10))
    monkeypatch.setattr(budget.Plan, "correct", correct)
    monkeypatch.setattr(train_module, "train_step", step)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", slow_save)
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn",
                         width=0.25, epochs=1, batch_size=2, val_size=6, lr=0.01, time_budget=60.0,
                         on_nan="skip")  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)
    assert paces[:2] == [pytest.approx(0.1), pytest.approx(0.1)]  # steps 3-4, then 5-10


def test_the_pace_within_an_epoch_is_read_where_the_device_was_synced(monkeypatch):
    """On CUDA the loss is read every 50 steps, and skipped batches leave no mark: the pace is
    time over the steps between marks (the host's clock between reads would time its queue),
    from two steps timed at least, the epoch's first half left out."""
    import types

    import cifarlab.train as train_module

    clock = [0.0]
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    pace = train_module._Pace()
    for step in (50, 100, 150, 250):  # step 200's read was skipped
        clock[0] = step * 0.1 if step < 150 else 15 + (step - 150) * 0.05
        pace.mark(step)
    assert not pace.ready()  # the later half of four marks is one interval
    clock[0] += 2.5
    pace.mark(300)
    assert pace.ready() and pace.seconds() == pytest.approx(0.05)  # from step 150 on
    pace.restart(300)
    clock[0] += 1.0
    pace.mark(310)
    assert not pace.ready()
    clock[0] += 1.0
    pace.mark(320)
    assert pace.ready() and pace.seconds() == pytest.approx(0.1)  # since the check
