"""The robust-cert command's exit skips the interpreter's last garbage collection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_exit_freezes_the_heap_once_after_the_other_exit_handlers() -> None:
    # a handler registered before the command's runs after it (atexit is last in, first out)
    code = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "from robust_cert import cli\n"
        "print('frozen before:', gc.get_freeze_count() > 0)\n"
        "before = atexit._ncallbacks()\n"
        "cli.skip_final_collection(); cli.skip_final_collection()\n"
        "print('new handlers:', atexit._ncallbacks() - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split("\n")
    assert out[:3] == ["frozen before: False", "new handlers: 1", "frozen at exit: True"], out


def test_the_command_exits_normally_with_the_hook() -> None:
    done = subprocess.run([sys.executable, "-m", "robust_cert", "policy",
                           str(REPO / "examples" / "policies" / "digits.yaml")],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    assert "digits-production" in done.stdout
