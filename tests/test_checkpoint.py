import os
import pickle
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

from cifarlab.checkpoint import atomic_save, load_checkpoint
from cifarlab.errors import UserError
from cifarlab.rundir import RunLock
from tests.conftest import files_limited_to

# what load_checkpoint requires beside the weights (`checkpoint.ENTRIES`)
REST = {"config": {"model": "cnn"}, "classes": ["a", "b"], "mean": [0.5] * 3, "std": [0.25] * 3}
WRITER = f"""
import sys, torch
from cifarlab.checkpoint import atomic_save
big = {{"model": {{"w": torch.randn(60_000_000)}}, **{REST!r}}}  # ~240 MB: the write takes a while
print("writing", flush=True)
while True:
    atomic_save(big, __import__("pathlib").Path(sys.argv[1]))
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_old_file_loadable(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.arange(5)}, **REST, "marker": 1}, path)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.time() + 60
    writing = False  # kill while a temporary file is being filled
    while not writing and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
        writing = any(".tmp" in p.name for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and writing, "the kill came before or after any write"
    ckpt = load_checkpoint(path)
    assert ckpt.get("marker") == 1 or ckpt["model"]["w"].numel() == 60_000_000


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil(), "config": {}}, f)
    with pytest.raises(UserError, match="refused to load"):
        load_checkpoint(path)


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path):
    (tmp_path / ".lock").write_text("999999999")  # no such process: stale
    with RunLock(tmp_path):
        other = subprocess.run(
            [sys.executable, "-c", "from cifarlab.rundir import RunLock; import sys; RunLock(__import__('pathlib').Path(sys.argv[1])).__enter__()", str(tmp_path)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert other.returncode != 0 and "is in use by process" in other.stderr
    assert not (tmp_path / ".lock").exists()


def test_run_directory_without_room_or_creatable_path_is_refused(tmp_path, monkeypatch):
    import shutil as _shutil

    from cifarlab.rundir import prepare_run_dir

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"{blocker} is a file, not a folder"):
        prepare_run_dir(blocker / "run", need_bytes=1)
    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: usage._replace(free=10_000_000))
    with pytest.raises(UserError, match="10 MB free, checkpoints need about 200 MB"):
        prepare_run_dir(tmp_path / "new" / "run", need_bytes=200_000_000)
    assert not (tmp_path / "new").exists()  # the folders it made for the refused run went again


def test_refusing_a_pickle_never_suggests_weights_only_false(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    for name, save in (("raw.pt", pickle.dump), ("torch.pt", torch.save)):
        path = tmp_path / name
        with open(path, "wb") as f:
            save({"model": Evil(), "config": {}}, f)
        with pytest.raises(UserError) as refused:
            load_checkpoint(path)
        message = str(refused.value)
        assert "refused to load" in message and "\n" not in message
        assert "weights_only" not in message and "False" not in message
    assert "it would import posix.system" in message


def test_an_empty_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    from cifarlab.cli import main

    empty = tmp_path / "best.pt"
    empty.touch()
    with pytest.raises(UserError, match="not a readable checkpoint \\(the file is empty\\)"):
        load_checkpoint(empty)
    assert main(["evaluate", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "the file is empty" in err and "Traceback" not in err


@pytest.mark.parametrize("content", [b"hello\n", bytes(range(7, 250)) * 20])
def test_a_file_torch_did_not_write_is_named_as_such(tmp_path, capsys, content):
    from cifarlab.cli import main

    other = tmp_path / "model.pt"
    other.write_bytes(content)
    with pytest.raises(UserError, match="not a checkpoint \\(torch.save did not write it"):
        load_checkpoint(other)
    assert main(["evaluate", str(other)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_disk_room_is_counted_from_the_runs_own_checkpoints_less_what_it_holds(tmp_path):
    from cifarlab.rundir import checkpoint_room

    assert checkpoint_room(tmp_path) == 3 * 70_000_000  # a new run: the estimate
    (tmp_path / "last.pt").write_bytes(b"x" * 1000)
    (tmp_path / "best.pt").write_bytes(b"x" * 1000)
    assert checkpoint_room(tmp_path) == 1000  # replacing them needs one temporary copy


def test_a_file_name_at_the_file_systems_limit_is_written_whole(tmp_path):
    path = tmp_path / ("a" * 250 + ".pt")  # 253 bytes: legal, so its temporary name must be too
    atomic_save({"x": 1}, path)
    assert torch.load(path)["x"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def _trained_run(data, tmp_path):
    from cifarlab.train import train
    from tests.conftest import make_config

    config = make_config(data=str(data), data_root=str(tmp_path / "d"), model="cnn", width=0.25,
                         epochs=1, batch_size=8, val_size=6, warmup_epochs=0.0, tta="none",
                         threads=1)  # fmt: skip
    train(config, tmp_path / "run", log=lambda s: None)
    return tmp_path / "run"


def _zero_inside_a_tensor(path):
    """64 zero bytes in the middle of the largest member: the zip still opens, its CRC fails."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        big = max(archive.infolist(), key=lambda m: m.file_size)
    data = bytearray(path.read_bytes())
    at = big.header_offset  # local header: 30 bytes, then the name and extra field, then data
    name_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
    middle = at + 30 + name_len + extra_len + big.file_size // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return big.filename


def test_a_checkpoint_with_bytes_changed_inside_is_refused_and_never_rewritten(
    synthetic_images, tmp_path, capsys
):
    from cifarlab.cli import main

    run = _trained_run(synthetic_images, tmp_path)
    member = _zero_inside_a_tensor(run / "best.pt")
    damaged = (run / "best.pt").read_bytes()
    with pytest.raises(UserError, match=f"best.pt: damaged checkpoint, its member {member} fails"):
        load_checkpoint(run / "best.pt")  # torch.load would read the altered weights
    for command in (["evaluate", str(run)], ["calibrate", str(run)]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err, err
        assert "best.pt" in err and member in err and "restore it" in err and "last.pt" in err
    assert (run / "best.pt").read_bytes() == damaged  # calibrate did not save it with fresh CRCs


def test_a_truncated_last_pt_on_resume_is_one_line_with_the_way_out(
    synthetic_images, tmp_path, capsys
):
    from cifarlab.cli import main

    run = _trained_run(synthetic_images, tmp_path)
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])  # a copy cut short, a full disk
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "last.pt: not a complete checkpoint, the file is truncated" in err
    assert f"--init-from {run / 'best.pt'}" in err and "is)" not in err


def test_a_checkpoint_write_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    """torch.save raised its RuntimeError ("unexpected pos"): a traceback from train and calibrate."""
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.arange(5)}, **REST}, path)
    with files_limited_to(100_000), pytest.raises(UserError, match="last.pt: cannot write it"):
        atomic_save({"model": {"w": torch.zeros(1_000_000)}, **REST}, path)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
