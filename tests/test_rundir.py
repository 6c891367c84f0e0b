"""A run directory has one writer, and training never silently overwrites what is in it."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cifarlab.errors import UserError
from cifarlab.rundir import RUN_FILES, RunLock, claim_run_dir, prepare_run_dir, rewrite_lock

RACER = """
import os, sys, time
from pathlib import Path
from cifarlab.errors import UserError
from cifarlab.rundir import RunLock
go = Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.0005)
try:
    with RunLock(Path(sys.argv[1])):
        print("won", flush=True)
        time.sleep(0.3)
except UserError:
    print("lost", flush=True)
"""

HOLDER = """
import sys, time
from pathlib import Path
from cifarlab.rundir import RunLock
with RunLock(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(60)
"""


def _python(script: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True, env=env
    )


def test_two_processes_racing_for_the_lock_never_both_hold_it(tmp_path):
    for trial in range(20):
        go = tmp_path / f"go-{trial}"
        racers = [_python(RACER, tmp_path, go) for _ in range(2)]
        for p in racers:
            assert p.stdout.readline().strip() == "ready"
        go.touch()
        outcomes = sorted(p.communicate(timeout=30)[0].strip() for p in racers)
        assert outcomes == ["lost", "won"], f"trial {trial}: {outcomes}"


def test_a_lock_of_a_killed_holder_is_taken_whatever_pid_the_file_names(tmp_path):
    holder = _python(HOLDER, tmp_path)
    assert holder.stdout.readline().strip() == "holding"
    with pytest.raises(UserError, match=f"is in use by process {holder.pid}; wait for it"):
        RunLock(tmp_path).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    for pid in ("999999999", str(os.getppid())):  # a dead pid, then a live unrelated one
        (tmp_path / ".lock").write_text(pid)
        with RunLock(tmp_path):
            assert (tmp_path / ".lock").read_text() == str(os.getpid())


@pytest.mark.parametrize("name", [*RUN_FILES, "notes.txt", "eval-val"])
def test_a_directory_holding_a_run_or_anything_else_is_refused_without_resume(tmp_path, name):
    """Only a run is advised --resume: other files hold nothing to continue."""
    run = tmp_path / "run"
    run.mkdir()
    (run / name).mkdir() if name == "eval-val" else (run / name).write_text("x")
    fix = "add --resume to continue it or pick a new --out"
    if name not in RUN_FILES:
        fix = "pick a new --out, or remove them"
    with pytest.raises(UserError, match=rf"\({name}\); {fix}"):
        claim_run_dir(run, resume=False)
    claim_run_dir(run, resume=True)


def test_a_missing_empty_or_only_hidden_directory_is_claimed(tmp_path):
    claim_run_dir(tmp_path / "missing", resume=False)
    claim_run_dir(tmp_path, resume=False)
    (tmp_path / ".lock").write_text("1")
    claim_run_dir(tmp_path, resume=False)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]  # claiming writes nothing
    (tmp_path / "notes.txt").write_text("mine")  # a visible file: no longer free to claim
    with pytest.raises(UserError, match="other files"):
        claim_run_dir(tmp_path, resume=False)


def test_out_that_is_a_file_or_read_only_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare_run_dir(blocker, need_bytes=1)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_access = os.access  # root ignores mode bits: deny as a read-only mount would
    monkeypatch.setattr(
        os, "access", lambda p, m: False if Path(p) == read_only else real_access(p, m)
    )
    with pytest.raises(UserError, match="not writable; pick a writable --out"):
        prepare_run_dir(read_only, need_bytes=1)


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    with RunLock(tmp_path):
        pass
    start = time.time()
    with RunLock(tmp_path):
        assert time.time() - start < 1
    assert not (tmp_path / ".lock").exists()


def test_a_run_being_trained_is_named_as_busy_not_as_one_to_resume(tmp_path):
    # busy means the lock is held: not a live process named in the file, nor an empty file
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: cnn\n")
    holder = _python(HOLDER, run)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(UserError, match=rf"is in use by process {holder.pid}; wait for it"):
            claim_run_dir(run, resume=False)
        (run / ".lock").write_text("")  # held, its holder's pid not yet written
        with pytest.raises(UserError, match="is in use by another process; wait for it"):
            claim_run_dir(run, resume=False)
    finally:
        holder.kill()
        holder.wait()
    (run / ".lock").write_text(str(os.getppid()))  # a live process that holds no lock
    with pytest.raises(UserError, match="add --resume"):  # its holder gone: resumable again
        claim_run_dir(run, resume=False)


def _killed_while_holding_the_lock(run: Path) -> None:
    """A `train` SIGKILLed before it saved anything: `run` holds only its `.lock`."""
    code = (
        "import os, sys; from pathlib import Path; from cifarlab.rundir import RunLock\n"
        "Path(sys.argv[1]).mkdir(); RunLock(Path(sys.argv[1])).__enter__()\n"
        "os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", code, str(run)], check=False)
    assert [p.name for p in run.iterdir()] == [".lock"]


def test_a_folder_left_holding_only_a_killed_runs_lock_is_trained_into_as_new(
    synthetic_images, tmp_path
):
    from cifarlab.train import train
    from tests.conftest import make_config, write_synthetic_folder

    run = tmp_path / "run"
    _killed_while_holding_the_lock(run)
    one_class = write_synthetic_folder(tmp_path / "one", classes=("red",))
    bad = make_config(data=str(one_class), data_root=str(tmp_path / "d"), model="cnn")
    with pytest.raises(UserError, match="only one class"):
        train(bad, run, log=lambda s: None)
    assert not run.exists()  # removed as a new folder would be, not left empty
    _killed_while_holding_the_lock(run)
    config = make_config(
        data=str(synthetic_images), data_root=str(tmp_path / "d"), model="cnn", epochs=1,
        batch_size=8, val_size=6,
    )  # fmt: skip
    train(config, run, log=lambda s: None)
    assert (run / "best.pt").is_file() and not (run / ".lock").exists()


def test_json_text_writes_nan_and_inf_as_null_at_any_depth():
    import json
    import math

    from cifarlab.rundir import json_text

    value = {"a": math.nan, "b": [math.inf, 1.5, (2, -math.inf)], "c": {"d": math.nan, "e": "x"}}
    strict = json.loads(json_text(value), parse_constant=lambda word: pytest.fail(word))
    assert strict == {"a": None, "b": [None, 1.5, [2, None]], "c": {"d": None, "e": "x"}}


def test_a_rewrite_locks_a_run_unless_this_process_holds_its_lock(tmp_path):
    # a leftover lock file naming this process's pid (a killed run's, the pid recycled) is
    # not this process holding the lock: calibrate must still take it
    (tmp_path / ".lock").write_text(str(os.getpid()))
    with rewrite_lock(tmp_path), pytest.raises(UserError, match="in use by process"):
        RunLock(tmp_path).__enter__()  # a second opener, as another process would be
    with RunLock(tmp_path), rewrite_lock(tmp_path):  # train's own end-of-run calibration
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_a_lock_whose_folder_moved_is_not_held_at_the_old_name(tmp_path):
    old, new = tmp_path / "a", tmp_path / "b"
    old.mkdir()
    with RunLock(old) as lock:  # as a suite moves a run to its new name
        old.rename(new)
        lock.path = new / ".lock"
    old.mkdir()
    with rewrite_lock(old), pytest.raises(UserError, match="in use"):
        RunLock(old).__enter__()  # the old name is not this process's lock any more


def test_temporary_files_of_a_killed_writer_are_removed_by_the_next_write_in_their_folder(
    tmp_path,
):
    """Each kill mid-write left a hidden `.last.<pid>.tmp.pt` (a checkpoint's size) for good."""
    from cifarlab.rundir import STALE_TEMP_SECONDS, replaced_when_complete, temp_folder

    code = (
        "import os, sys; from pathlib import Path\n"
        "from cifarlab.rundir import replaced_when_complete, temp_folder\n"
        "run = Path(sys.argv[1]); (temp_folder(run / 'eval-val') / 'x.png').write_bytes(b'half')\n"
        "with replaced_when_complete(run / 'last.pt') as tmp:\n"
        "    tmp.write_bytes(b'half'); os.kill(os.getpid(), 9)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    left = list(tmp_path.iterdir())
    assert killed.returncode == -9 and len(left) == 2  # a file, a folder
    with replaced_when_complete(tmp_path / "last.pt") as tmp:  # just killed: might be another
        tmp.write_bytes(b"whole")  # machine's live writer, so kept until it is stale
    assert set(left) < set(tmp_path.iterdir())
    old = time.time() - STALE_TEMP_SECONDS - 1
    for path in left:
        os.utime(path, (old, old))
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        for stale in (f".last.{live.pid}.tmp.pt", ".notes.2024.tmp", ".last.999.tmp.bak"):
            (tmp_path / stale).write_bytes(b"a live writer's, or the user's")
            os.utime(tmp_path / stale, (old, old))
        with replaced_when_complete(tmp_path / "last.pt") as tmp:
            tmp.write_bytes(b"whole")
        (temp_folder(tmp_path / "eval-val") / "x.png").write_bytes(b"whole")
        live.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".eval-val.{os.getpid()}-{threading.get_native_id()}.tmp",  # this process's own
        f".last.{live.pid}.tmp.pt",
        ".last.999.tmp.bak",
        ".notes.2024.tmp",
        "last.pt",
    ]


def test_two_threads_writing_one_target_keep_temporaries_of_their_own(tmp_path):
    """Temporaries were named by the process id alone: a second thread's `temp_folder` removed
    the first's folder mid-write, and its `replaced_when_complete` the first's file (two
    `evaluate` calls of the API into one folder, from threads)."""
    from cifarlab.rundir import replaced_when_complete, temp_folder

    def other_thread(work):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()

    def write_file():
        with replaced_when_complete(tmp_path / "report.json") as tmp:
            tmp.write_text("other thread")

    part = temp_folder(tmp_path / "eval-val")
    (part / "report.json").write_text("this thread")
    other_thread(lambda: (temp_folder(tmp_path / "eval-val") / "report.json").write_text("other"))
    assert (part / "report.json").read_text() == "this thread"
    with replaced_when_complete(tmp_path / "report.json") as tmp:
        tmp.write_text("this thread")
        other_thread(write_file)
    assert (tmp_path / "report.json").read_text() == "this thread"


def test_a_reports_files_are_on_disk_before_its_last_file_names_it_complete(tmp_path, monkeypatch):
    """evaluate writes per_class.csv, predictions.csv and report.json plainly, then moves them in
    with report.json last; they were not synced, so after a power cut report.json (or a file
    beside it) could be empty though the folder read as a complete report."""
    from cifarlab.rundir import moved_in_when_complete, temp_folder

    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: events.append(os.fstat(fd).st_ino) or real_fsync(fd)
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: events.append((os.stat(a).st_ino, b)) or real_replace(a, b)
    )
    out = tmp_path / "eval-val"
    with moved_in_when_complete(temp_folder(out), out, "report.json") as part:
        for name in ("per_class.csv", "predictions.csv", "report.json"):
            (part / name).write_text(name)
    moves = [(i, e) for i, e in enumerate(events) if isinstance(e, tuple)]
    assert [Path(b).name for _, (_, b) in moves][-1] == "report.json" and len(moves) == 3
    for i, (inode, _) in moves:
        assert inode in events[:i]
