"""osstune/atomic.py: a crash never leaves a half-written file or directory, nor removes the last
complete copy, and the temporaries of a killed process are removed by the next writer."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from osstune import atomic


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(p.stdout)


def _leftover(target, pid, kind=".partial-"):
    """The name a process `pid` of this host gives its temporary of `target`."""
    return target.parent / f".{target.name}{kind}{pid}-{atomic._host()}-0123abcd"


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    atomic.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_directory_replace_and_refuse(tmp_path):
    target = tmp_path / "d"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError):
        with atomic.atomic_dir(target) as tmp:
            (tmp / "a").write_text("2")
    with atomic.atomic_dir(target, replace=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_leftovers_of_a_dead_process_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "model"
    dead = _leftover(target, _dead_pid())
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 100)
    live = _leftover(target, os.getppid())  # a live process (pytest's parent) is writing this one
    live.write_bytes(b"y")
    other_host = target.parent / f".{target.name}.partial-{_dead_pid()}-ffffffff-0123abcd"
    other_host.write_bytes(b"z")
    with atomic.atomic_dir(target.parent / "another-export") as tmp:  # the next run, whatever it writes there
        (tmp / "config.json").write_text("{}")
    assert not dead.exists()
    assert live.exists() and other_host.exists()


def test_a_directory_moved_aside_by_a_killed_replace_comes_back(tmp_path):
    # Killed between moving the old copy aside and renaming the new one in: the old copy is restored.
    target = tmp_path / "step-0000002"
    aside = _leftover(target, _dead_pid(), kind=".aside-")
    aside.mkdir()
    (aside / "state.json").write_text("{}")
    atomic.clean_leftovers(tmp_path)
    assert (target / "state.json").is_file() and not aside.exists()


def test_a_writer_killed_with_sigkill_leaves_nothing_after_the_next_write(tmp_path):
    code = (
        "import os, signal, sys; from pathlib import Path; from osstune.atomic import atomic_dir\n"
        "with atomic_dir(Path(sys.argv[1]) / 'export') as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 4096)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env)
    assert p.returncode == -9
    assert [q.name.startswith(".export.partial-") for q in tmp_path.iterdir()] == [True]  # what SIGKILL leaves
    atomic.write_bytes(tmp_path / "another.json", b"{}")  # the next run writes anything there
    assert sorted(q.name for q in tmp_path.iterdir()) == ["another.json"]
