"""distrain.watchdog on real processes: two ranks in a real gloo process group, a real TCPStore, real SIGSTOP.

The store of the watchdog is hosted by the test process (as the launcher hosts it under `accelerate launch`), the
process group by rank 0. One rank is frozen with SIGSTOP while the other sits in all-reduces: the live one must
stop on its own, naming the frozen rank, its pid and host; with a stop signal pending while it is blocked in the
collective (where no Python signal handler runs) it exits 75 after the short grace instead.
The whole training run with a frozen rank is in tests/test_stop_signals.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from conftest import free_port, subprocess_env
from distrain.signals import EXIT_STOPPED
from distrain.watchdog import EXIT_PEER_LOST, Watchdog

pytestmark = pytest.mark.timeout(240)

RANK = r"""
import sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from distrain.signals import StopSignals
from distrain.watchdog import Watchdog
pg_port, wd_port, rank, timeout, grace = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{pg_port}", rank=rank, world_size=2)
client = dist.TCPStore("127.0.0.1", wd_port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=2))
stop = StopSignals().install()
Watchdog(dist.PrefixStore("wd/", client), rank, 2, timeout, stop=stop, stop_grace=grace).start()
t = torch.ones(1)
dist.all_reduce(t)
print("ready", flush=True)
while True:  # a collective now and then, as a training loop does; blocked for good once the peer is frozen
    dist.all_reduce(t)
    time.sleep(0.05)
"""


class Ranks:
    def __init__(self, timeout: float, grace: float = 15.0):
        self.server = _store_server()
        pg_port = free_port()
        self.procs = [subprocess.Popen([sys.executable, "-c", RANK, str(pg_port), str(self.server.port), str(r),
                                        str(timeout), str(grace)], env=subprocess_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, start_new_session=True)
                      for r in (0, 1)]
        for p in self.procs:
            line = p.stdout.readline().strip()
            assert line == "ready", (line, p.poll(), p.stderr.read() if p.poll() is not None else "")

    def wait(self, rank: int, hang_guard: float = 180) -> tuple[int, str]:
        p = self.procs[rank]
        try:
            rc = p.wait(hang_guard)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank {rank} still running {hang_guard:g} s after its peer froze")
        return rc, p.stderr.read()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)  # a stopped process too
            p.wait()
            p.stdout.close()
            p.stderr.close()


def _store_server():
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


@pytest.fixture
def ranks():
    made = []

    def start(*args, **kw) -> Ranks:
        made.append(Ranks(*args, **kw))
        return made[-1]

    yield start
    for r in made:
        r.close()


@pytest.mark.slow
def test_frozen_peer_is_named_and_the_live_rank_exits_1(ranks):
    r = ranks(timeout=6.0)
    frozen = r.procs[1].pid
    os.kill(frozen, signal.SIGSTOP)
    t0 = time.monotonic()
    rc, err = r.wait(0)
    took = time.monotonic() - t0
    assert rc == EXIT_PEER_LOST, err[-3000:]
    line = f"rank 1 (pid {frozen} on host {socket.gethostname()}) has not responded for"
    assert line in err and "(frozen or lost); stopping" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert took >= 6.0 - 1.0, took  # not before the timeout: the peer was alive until the SIGSTOP
    assert r.procs[1].poll() is None  # the frozen one is still there (the fixture SIGKILLs it)


@pytest.mark.slow
def test_stop_signal_while_blocked_in_a_collective_exits_75_after_the_grace(ranks):
    r = ranks(timeout=120.0, grace=3.0)
    os.kill(r.procs[1].pid, signal.SIGSTOP)
    time.sleep(0.5)  # rank 0 is now inside an all-reduce that cannot finish: its handlers cannot run
    os.kill(r.procs[0].pid, signal.SIGTERM)
    rc, err = r.wait(0, hang_guard=100)  # far below the 120 s peer timeout: the signal shortened it
    assert rc == EXIT_STOPPED, err[-3000:]
    assert "SIGTERM received, but rank 1 (pid" in err and "exiting without a stop checkpoint" in err, err[-3000:]


def test_a_rank_that_left_is_not_lost_and_a_silent_one_is():
    """Three watchdogs in this process on a real store, with a hand-driven clock: goodbye vs silence."""
    server = _store_server()
    import torch.distributed as dist

    now = [1000.0]
    exits: dict[int, list] = {0: [], 1: [], 2: []}

    def watchdog(rank: int) -> Watchdog:
        store = dist.PrefixStore("x/", dist.TCPStore("127.0.0.1", server.port, is_master=False,
                                                    wait_for_workers=False, timeout=timedelta(seconds=5)))
        # One beat at start(), then the long interval leaves the beats to the test.
        return Watchdog(store, rank, 3, timeout=10, interval=3600, exit=exits[rank].append, clock=lambda: now[0])

    a, b, c = (watchdog(r).start() for r in range(3))
    time.sleep(0.5)
    a._beat_once()
    assert a.check() is None
    b.stop()  # rank 1 finished and said so
    now[0] += 11
    a._beat_once()  # rank 2 beats no more: silent for 11 s by rank 0's clock
    code, msg = a.check()
    assert code == EXIT_PEER_LOST and f"rank 2 (pid {os.getpid()} on host {socket.gethostname()})" in msg, msg
    assert "rank 1 " not in msg and "has not responded for 11 s (frozen or lost); stopping" in msg, msg
    deadline = time.monotonic() + 30
    while not exits[0] and time.monotonic() < deadline:  # the watch thread acts on the same verdict
        time.sleep(0.05)
    assert exits[0] == [EXIT_PEER_LOST] and a.fired == msg
    a.stop(), c.stop()
