"""atomic_bundle: temp folders left by a killed write are removed by the next write to the same
place, never those of a writer that is still running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from arx.bundle import _owner_tag, atomic_bundle

# a writer that fills its temp folder with 1 MiB, says so, then waits to be killed
WRITER = textwrap.dedent("""
    import sys, time
    from arx.bundle import atomic_bundle

    with atomic_bundle(sys.argv[1]) as tmp:
        (tmp / "decoder.onnx.data").write_bytes(bytes(1 << 20))
        print(tmp.name, flush=True)
        time.sleep(600)
""")


def start_writer(out: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    name = proc.stdout.readline().strip()
    assert name, "the writer died before filling its temp folder"
    return proc, out.parent / name


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def write_bundle(out: Path) -> None:
    with atomic_bundle(out, overwrite=True) as tmp:
        (tmp / "arx.json").write_text("{}")


def test_next_write_removes_a_killed_writers_folder_not_a_live_one(tmp_path, capsys):
    out = tmp_path / "model.arx"
    live, live_tmp = start_writer(out)
    try:
        killed, killed_tmp = start_writer(out)  # after the live one, which would clean it up
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert killed_tmp.is_dir() and live_tmp.is_dir()  # SIGKILL ran no cleanup
        write_bundle(out)
        err = capsys.readouterr().err
        assert leftovers(out) == [live_tmp.name]
        assert (live_tmp / "decoder.onnx.data").stat().st_size == 1 << 20  # untouched
        assert (out / "arx.json").is_file()
        assert err.strip() == (f"arx: removed 1 temp folder(s) left by a killed run beside "
                               f"model.arx ({killed_tmp.name}), freeing 1.0 MB")
    finally:
        live.kill()
        live.wait()
    write_bundle(out)  # now that writer is gone too
    assert leftovers(out) == []
    assert live_tmp.name in capsys.readouterr().err


def test_a_reused_pid_is_not_the_owner(tmp_path, capsys):
    """A folder marked with this very pid but another start time (a process before a reboot,
    or before the pid wrapped around) is stale; this process's own mark is not."""
    out = tmp_path / "model.arx"
    pid, start, host = _owner_tag(os.getpid()).split("-")
    before_reboot = tmp_path / f".model.arx.{pid}-{int(start) + 1}-{host}.abcd_123.old"
    (before_reboot / "model.arx").mkdir(parents=True)
    ours = tmp_path / f".model.arx.{pid}-{start}-{host}.efgh_456.tmp"
    ours.mkdir()
    unmarked = tmp_path / ".model.arx.k2j3h4g5.tmp"  # an older arx's: no owner to ask, kept
    unmarked.mkdir()
    write_bundle(out)
    assert leftovers(out) == sorted([ours.name, unmarked.name])
    assert before_reboot.name in capsys.readouterr().err
