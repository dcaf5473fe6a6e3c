"""A JIT-build lock left by a builder that died is removed at start; a live builder's is kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from torch.utils.file_baton import FileBaton

from hybrid_ppo.build_locks import remove_stale_locks


def test_a_dead_builders_lock_goes_and_a_live_builders_stays(tmp_path):
    dead, live = tmp_path / "cpu_adam" / "lock", tmp_path / "shm_comm" / "lock"
    dead.parent.mkdir()
    live.parent.mkdir()
    # The dead builder: it took the baton, as torch's cpp_extension does, and was SIGKILLed.
    code = f"from torch.utils.file_baton import FileBaton; FileBaton({str(dead)!r}).try_acquire(); import os; os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9 and dead.exists()
    builder = subprocess.Popen([sys.executable, "-c", f"from torch.utils.file_baton import FileBaton; "
                                f"assert FileBaton({str(live)!r}).try_acquire(); import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 60
        while not live.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # the file is created by the open that holds it
        assert remove_stale_locks(tmp_path) == [dead]
        assert not dead.exists() and live.exists()
        baton = FileBaton(str(dead))
        assert baton.try_acquire()  # the next build can go ahead instead of waiting for ever
        baton.release()
    finally:
        builder.kill()
        builder.wait()
    assert remove_stale_locks(tmp_path) == [live]  # its builder is gone now


def test_no_extensions_dir_is_nothing_to_do(tmp_path):
    assert remove_stale_locks(tmp_path / "missing") == []
    assert os.listdir(tmp_path) == []
