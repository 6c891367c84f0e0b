"""The precision rule: bf16 where the machine's matrix units make it pay, fp32 elsewhere."""

import torch
import yaml

from cifarlab.hardware import choose_amp
from cifarlab.train import train
from tests.conftest import make_config

CPU = torch.device("cpu")
AMX = {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
NO_AMX = {"avx512f", "avx512_bf16", "avx2"}


def test_auto_picks_bf16_on_a_cpu_with_amx_and_fp32_without():
    amp, reason = choose_amp("auto", CPU, AMX)
    assert amp == "bf16" and "AMX" in reason
    amp, reason = choose_amp("auto", CPU, NO_AMX)
    assert amp == "off" and "no AMX" in reason
    assert choose_amp("auto", CPU, set())[0] == "off"  # no /proc/cpuinfo: the safe choice


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
    config = make_config(data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                         epochs=1, batch_size=8, val_size=6, lr=0.02, threads=1)  # fmt: skip
    messages = []
    train(config, tmp_path / "run", log=messages.append)
    assert any("amp: auto -> fp32 (no AMX" in m for m in messages)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["amp"] == "off"
    again = []
    train(
        config, tmp_path / "run", resume=True, log=again.append
    )  # auto vs stored off: the same run
    assert any("already finished" in m for m in again)
