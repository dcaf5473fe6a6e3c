"""DeepSpeed's CPU all-reduce workspace must not outlive the run (role_process.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from hybrid_ppo.executor import DistInfo
    from hybrid_ppo.role_process import init_distributed

    init_distributed(DistInfo(rank=0, world_size=1, master_addr="127.0.0.1", master_port=int(sys.argv[1])))
    maps = open("/proc/self/maps").read()
    assert f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{sys.argv[1]}_0" in maps, "no shm workspace: nothing to test"
    import deepspeed.comm as ds_comm
    tensor = torch.arange(4.0)
    ds_comm.inference_all_reduce(tensor)  # DeepSpeed's shm path: the mapping outlives the name
    assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0], tensor
    print("ok")
""")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_one_rank_group_leaves_no_deepspeed_segment_in_dev_shm():
    port = _free_port()
    out = subprocess.run([sys.executable, "-c", CHILD, str(port)], capture_output=True, text=True, timeout=600,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert left == [], left
