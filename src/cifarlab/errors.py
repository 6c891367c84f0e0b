"""The errors cifarlab reports to a person rather than as a traceback."""

import contextlib
import importlib
import signal


class UserError(Exception):
    """Bad input: a one-line message saying what is wrong, where, and how to fix it (exit 2)."""

    exit_code = 2


class ConfigChanged(UserError):
    """A resumed run asked for settings other than those it started with."""


class TooFewImages(UserError):
    """The data holds fewer images than the config asks of it: for a run's own config, a sign
    that its data changed since the run trained, said with `detail` (without the `fix` a new
    run would take)."""

    def __init__(self, detail: str, fix: str = ""):
        super().__init__(f"{detail}; {fix}" if fix else detail)
        self.detail = detail


class UnreadableFile(UserError):
    """A file where an image belongs that is none: a new run may skip such files (`hint`), a
    resumed one may not (its data would change), so it says `detail` with its own way out."""

    def __init__(self, detail: str, hint: str):
        super().__init__(f"{detail} ({hint})")
        self.detail = detail


def data_changed(where: str, detail: str, way_out: str) -> UserError:
    """A run's own data no longer gives the split it trained with (fewer images, another
    fingerprint): one wording for evaluate, calibrate and --resume."""
    return UserError(f"{where}: the data changed since the run trained ({detail}); {way_out}")


class TrainingFailed(Exception):
    """Training diverged (a non-finite or exploding loss, or non-finite weights); exit 1, nothing
    good is overwritten. A finding rather than bad input: suites record it, tune prunes it."""

    exit_code = 1


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving `last.pt` (exit 130 or 143)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def handling(handler, *signals: signal.Signals):
    """`handler` for `signals` inside the block, the previous handlers after it (only the main
    thread may set them: elsewhere signals are left alone)."""
    old = {}
    for sig in signals:
        with contextlib.suppress(ValueError):
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def import_extra(module: str, extra: str, what: str):
    """`module`, or one line saying which of cifarlab's optional extras brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the extra: pip install 'cifarlab[{extra}]'") from None


def first_line(exc: BaseException) -> str:
    """The first non-empty line of `exc`'s message, else its type name (an EOFError has none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def one_line(text: str) -> str:
    """`text` with control and other unprintable characters escaped (a newline as \\n), so a file
    name holding one cannot split a message or send codes to the terminal. Lone surrogates (bytes
    of a name that are not UTF-8) stay for the stream's own backslashreplace."""
    return "".join(
        c if c.isprintable() or "\ud800" <= c <= "\udfff" else c.encode("unicode_escape").decode()
        for c in text
    )
