"""The precision rule: bf16 where the machine's matrix units make it pay, fp32 elsewhere."""

import math
import os
from types import SimpleNamespace

import pytest
import torch
import yaml

from cifarlab.errors import UserError
from cifarlab.hardware import (
    bf16_speedup,
    choose_amp,
    pick_device,
    setup_hardware,
    time_bf16_speedup,
)
from cifarlab.train import train
from tests.conftest import make_config

CPU = torch.device("cpu")
AMX = {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
NO_AMX = {"avx512f", "avx512_bf16", "avx2"}


def test_auto_picks_bf16_on_a_cpu_with_amx_and_fp32_without_bf16():
    never = lambda: pytest.fail("a CPU whose answer is known is not timed")  # noqa: E731
    amp, reason = choose_amp("auto", CPU, AMX, never)
    assert amp == "bf16" and "AMX" in reason
    amp, reason = choose_amp("auto", CPU, {"avx2", "avx512f"}, never)
    assert amp == "off" and "no bf16 instructions" in reason
    assert choose_amp("auto", CPU, set(), never)[0] == "off"  # no /proc/cpuinfo: the safe choice


def test_without_amx_but_with_avx512_bf16_the_timed_steps_decide():
    amp, reason = choose_amp("auto", CPU, NO_AMX, lambda: 2.1)  # as on an AMD EPYC (Zen 5)
    assert amp == "bf16" and "2.10x" in reason
    amp, reason = choose_amp("auto", CPU, NO_AMX, lambda: 0.8)  # as on a Xeon without AMX
    assert amp == "off" and "fp32" in reason and "0.80x" in reason


def test_scoring_follows_the_machines_kept_timing_whatever_the_number_of_images(monkeypatch):
    from cifarlab.hardware import inference_hardware

    monkeypatch.setattr("cifarlab.hardware.cpu_flags", lambda: set(NO_AMX))
    monkeypatch.setattr("cifarlab.hardware.bf16_speedup", lambda: 2.0)
    assert inference_hardware(CPU).amp_dtype == torch.bfloat16  # one image or 50,000 alike


def test_scoring_uses_the_runs_own_precision_where_the_device_runs_it(monkeypatch):
    from cifarlab.hardware import inference_hardware

    monkeypatch.setattr("cifarlab.hardware.cpu_flags", lambda: set(NO_AMX))
    monkeypatch.setattr("cifarlab.hardware.bf16_speedup", lambda: 2.0)  # auto would say bf16
    assert inference_hardware(CPU, "off").amp_dtype is None  # trained in fp32: scored in fp32
    monkeypatch.setattr("cifarlab.hardware.bf16_speedup", lambda: 0.5)  # auto would say fp32
    assert inference_hardware(CPU, "bf16").amp_dtype == torch.bfloat16
    assert inference_hardware(CPU, "fp16").amp_dtype is None  # fp16 needs CUDA: the rule's


def test_the_bf16_timing_is_kept_per_machine_so_the_choice_does_not_flip(monkeypatch, tmp_path):
    readings = iter([1.7, 0.2, 0.9])  # what the load of the moment would make it read
    monkeypatch.setattr("cifarlab.hardware.time_bf16_speedup", lambda: next(readings))
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "root"))
    bf16_speedup.cache_clear()
    try:
        assert bf16_speedup() == 1.7
        bf16_speedup.cache_clear()  # another process on this machine
        assert bf16_speedup() == 1.7 and choose_amp("auto", CPU, NO_AMX)[0] == "bf16"
        (tmp_path / "root" / "hardware.json").unlink()  # deleted: timed again
        bf16_speedup.cache_clear()
        assert bf16_speedup() == 0.2
        (tmp_path / "root" / "hardware.json").write_text("{damaged")
        bf16_speedup.cache_clear()
        assert bf16_speedup() == 0.9  # a damaged file is timed over, not an error
    finally:
        bf16_speedup.cache_clear()


def test_a_timing_that_cannot_be_kept_is_said_not_kept(monkeypatch, tmp_path):
    import errno

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr("cifarlab.hardware.time_bf16_speedup", lambda: 1.7)
    monkeypatch.setattr("cifarlab.hardware.replaced_when_complete", read_only)
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "root"))
    bf16_speedup.cache_clear()
    try:
        amp, reason = choose_amp("auto", CPU, NO_AMX)  # a read-only data root: no error
        assert amp == "bf16" and "kept in" not in reason
        assert f"not kept ({tmp_path / 'root' / 'hardware.json'}: read-only file system)" in reason
        monkeypatch.undo()  # writable again: kept, and said so
        monkeypatch.setattr("cifarlab.hardware.time_bf16_speedup", lambda: 1.7)
        monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "root"))
        bf16_speedup.cache_clear()
        assert "timed once, kept in" in choose_amp("auto", CPU, NO_AMX)[1]
        assert (tmp_path / "root" / "hardware.json").is_file()
    finally:
        bf16_speedup.cache_clear()


def test_the_bf16_timing_is_a_ratio_and_leaves_the_random_state_alone():
    # batch 8: a bf16 step is emulated, ~10x an fp32 one, on CPUs without bf16 instructions
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ratio = time_bf16_speedup(rounds=1, batch=8)
    assert torch.equal(torch.rand(3), expected)
    assert math.isfinite(ratio) and ratio > 0  # its size is the machine's: tested on a clock below
    with torch.inference_mode():  # as when evaluate's first scoring triggers the timing
        assert math.isfinite(time_bf16_speedup(rounds=1, batch=8))


def test_the_bf16_timing_times_the_training_loops_own_step_in_both_precisions(monkeypatch):
    # a clock that only the step moves: fp32 takes 3 units, bf16 1, the warm-up round 0.1
    # each (the fastest, so counting it would give 1.0)
    seen, now = [], [0.0]

    def train_step(run, x, y, rand):
        seen.append(run.hw.amp_dtype)
        now[0] += 0.1 if len(seen) <= 2 else 1 if run.hw.amp_dtype else 3
        return torch.zeros(()), torch.zeros(len(x), 10)

    monkeypatch.setattr("cifarlab.hardware.train_step", train_step)
    monkeypatch.setattr("cifarlab.hardware.time", SimpleNamespace(perf_counter=lambda: now[0]))
    # fp32 time over bf16 time, the warm-up left out
    assert time_bf16_speedup(rounds=2) == pytest.approx(3.0)
    assert sorted(map(str, seen)) == ["None"] * 3 + ["torch.bfloat16"] * 3


def test_an_explicit_choice_is_kept_on_any_cpu():
    assert choose_amp("bf16", CPU, NO_AMX)[0] == "bf16"
    assert choose_amp("off", CPU, AMX)[0] == "off"


def test_training_in_bf16_on_the_cpu_end_to_end(synthetic_images, tmp_path):
    messages = []
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                         epochs=2, batch_size=8, val_size=6, lr=0.02, amp="bf16", threads=1)  # fmt: skip
    result = train(config, tmp_path / "run", log=messages.append)
    assert any("amp: bf16 as configured" in m for m in messages)
    assert any("cpu (bf16" in m for m in messages)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"] * 1.2
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["amp"] == "bf16"


def test_auto_stores_what_it_chose_and_a_resume_with_auto_matches(
    synthetic_images, tmp_path, monkeypatch
):
    monkeypatch.setattr("cifarlab.hardware.cpu_flags", lambda: set(NO_AMX))
    monkeypatch.setattr("cifarlab.hardware.bf16_speedup", lambda: 0.8)
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                         epochs=1, batch_size=8, val_size=6, lr=0.02, threads=1)  # fmt: skip
    messages = []
    train(config, tmp_path / "run", log=messages.append)
    assert any("amp: auto -> fp32 (no AMX, but AVX512-BF16" in m for m in messages)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["amp"] == "off"
    again = []
    train(
        config, tmp_path / "run", resume=True, log=again.append
    )  # auto vs stored off: the same run
    assert any("already finished" in m for m in again)


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                    reason="this machine has the devices refused below")  # fmt: skip
@pytest.mark.parametrize(("name", "needle"), [("mps", "MPS"), ("cuda", "CUDA"), ("cuda:3", "CUDA")])
def test_a_device_this_machine_lacks_is_one_line_naming_how_to_use_the_cpu(name, needle):
    with pytest.raises(UserError, match=f"{needle}.* use --device cpu$"):
        pick_device(name, "--device cpu")
    with pytest.raises(UserError, match="use --set device=cpu$"):
        pick_device(name)


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_fp16_is_refused_off_cuda_whether_the_device_is_named_or_chosen(device):
    if device == "auto" and torch.cuda.is_available():  # auto picks CUDA, where fp16 runs
        assert setup_hardware(make_config(amp="fp16", device=device)).amp_dtype == torch.float16
        return
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        setup_hardware(make_config(amp="fp16", device=device))


def test_more_threads_than_cores_are_capped_at_the_cores_and_warned(monkeypatch):
    used = []
    monkeypatch.setattr(torch, "set_num_threads", used.append)  # the tests' own stay as set
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    hw = setup_hardware(make_config(threads=1000, amp="off"))
    assert "threads=1000 is more than the 2 core(s)" in hw.threads_warning and used == [2]
    assert setup_hardware(make_config(threads=2, amp="off")).threads_warning == "" and used[-1] == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes share the two cores
    hw = setup_hardware(make_config(threads=2, amp="off"))
    assert "more than the 1 core(s) each" in hw.threads_warning and used[-1] == 1
