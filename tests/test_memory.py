"""Huge pages for PyTorch's CPU allocator: asked for before torch loads, never over the user."""

import os
import subprocess
import sys

import pytest

from cifarlab.memory import ENV, THP_MODE, use_huge_pages


@pytest.fixture
def before_torch(monkeypatch):
    """As at `import cifarlab` in a fresh process: torch not loaded, the variable unset."""
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setenv(ENV, "x")  # so that the variable is restored (or removed) afterwards
    monkeypatch.delenv(ENV)


@pytest.mark.parametrize(
    ("mode", "used"),
    [("always [madvise] never\n", True), ("[always] madvise never\n", True),
     ("always madvise [never]\n", False)],
)  # fmt: skip
def test_huge_pages_follow_the_kernels_mode(before_torch, tmp_path, mode, used):
    (tmp_path / "enabled").write_text(mode)
    assert use_huge_pages(tmp_path / "enabled") is used
    assert os.environ.get(ENV) == ("1" if used else None)


def test_no_thp_in_the_kernel_leaves_the_allocator_alone(before_torch, tmp_path):
    assert use_huge_pages(tmp_path / "missing") is False and ENV not in os.environ


def test_the_users_choice_wins_and_torch_loaded_first_is_left_alone(monkeypatch, tmp_path):
    import torch  # noqa: F401 - loaded, as in a notebook that imported torch before cifarlab

    (tmp_path / "enabled").write_text("always [madvise] never\n")
    monkeypatch.setenv(ENV, "0")
    assert use_huge_pages(tmp_path / "enabled") is False and os.environ[ENV] == "0"
    monkeypatch.delenv(ENV)
    assert use_huge_pages(tmp_path / "enabled") is False and ENV not in os.environ


@pytest.mark.skipif(
    not THP_MODE.is_file() or "[never]" in THP_MODE.read_text(), reason="no THP on this kernel"
)
def test_importing_cifarlab_asks_for_huge_pages_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k != ENV}
    code = "import os, cifarlab, torch; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "1", out.stderr
