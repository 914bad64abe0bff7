"""Peer watchdog: each rank publishes a heartbeat; a rank that falls silent stops the others, named.

Without it a frozen peer (SIGSTOP, a hung file system, a lost node) blocks the other ranks in their
next collective until the backend's timeout (gloo: 30 minutes), and a rank blocked in a collective
cannot run its Python signal handlers, so a SIGTERM from SLURM ends in SIGKILL after KillWait, with
nothing said.

How it works (:class:`Watchdog`): two daemon threads per rank, on a key-value store shared by the
ranks (duck-typed: ``set``/``get``/``add``/``check``, as torch.distributed's TCPStore and
PrefixStore; this module imports neither torch nor accelerate, the caller passes the store in):

* the *beat* thread adds 1 to ``beat/<rank>`` every ``interval`` seconds and reads the peers'
  counters. A counter that changed is a peer that is alive; each rank judges by its own monotonic
  clock, so the hosts' clocks need not agree. It publishes ``who/<rank>`` (pid, host) once, for the
  report, and ``left/<rank>`` when the rank stops the watchdog (a finished rank is not a lost one);
* the *watch* thread never touches the store (a store call can block: its server may be the frozen
  or lost process), and decides from what the beat thread saw:

  - a peer silent for ``timeout`` seconds: ``rank R (pid P on host H) has not responded for N s
    (frozen or lost); stopping`` on stderr, exit :data:`EXIT_PEER_LOST`;
  - the store itself unreachable for ``timeout`` seconds (the launcher hosting it, or its node, is
    gone): the same, naming the store;
  - once a stop signal arrived (SIGTERM, SIGUSR1, SIGHUP, Ctrl-C; ``StopSignals.arrived`` sees it
    even while the main thread is blocked in a collective, where no Python signal handler runs): a
    peer silent for ``stop_grace`` seconds (less than SLURM's KillWait and the elastic agent's 30 s)
    then ends the process with :data:`distrain.signals.EXIT_STOPPED` and a message saying that no
    stop checkpoint could be written.

The exit is ``os._exit`` from the watch thread (the main thread may be inside a collective that
never returns): no ``finally`` blocks run, so nothing is half-written by the exit itself;
checkpoints are committed atomically, so the committed ones stay intact and loadable, and a
temporary directory of a checkpoint in progress is cleaned at the next start. Running the same
command again resumes from the last committed checkpoint.

Exit code :data:`EXIT_PEER_LOST` = 1: a failure (not a user error, 2; not a requested stop, 75). A
retry loop or a restart-on-failure supervisor runs it again; SLURM marks the job FAILED. Under
``accelerate launch`` the launcher then ends the other workers of its node, as for any failed
worker.

Cost: each rank reads every peer's counter once per interval (world x world small store calls per
interval in all): fine for tens of ranks; for hundreds, raise ``interval``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Callable, Optional

from distrain.signals import EXIT_STOPPED

EXIT_PEER_LOST: int = 1
"""Exit code when a peer (or the store) fell silent: a failure (of the environment), resumable."""

STOP_GRACE_S: float = 15.0
"""After a stop signal, how long a silent peer may block the stop (below SLURM's KillWait, 30 s)."""

# The beat thread's view is stale (the store is slow) once it is older than this many intervals: the
# watch thread then judges the store, not the peers, so that a slow store does not look like silent
# peers.
_STALE_INTERVALS = 3


def default_interval(timeout: float) -> float:
    """Heartbeat period for a timeout: a tenth of it, between 0.2 s and 5 s."""
    return max(0.2, min(5.0, timeout / 10.0))


class Watchdog:
    """Heartbeat and peer watch for one rank; see the module doc.

    ``start()`` it once the ranks share the store, ``stop()`` it on the way out (also after an
    error: a stopped watchdog says goodbye to its peers). ``stop`` is a distrain.signals.StopSignals
    (its ``arrived``), anything with ``requested`` and ``reason``, or None. ``exit`` ends the
    process (default ``os._exit``); tests pass a recorder, and ``clock`` a hand-driven one.
    """

    def __init__(self, store: Any, rank: int, world: int, timeout: float, *, stop: Any = None,
                 stop_grace: float = STOP_GRACE_S, interval: Optional[float] = None,
                 exit: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.store, self.rank, self.world, self.timeout = store, rank, world, float(timeout)
        self.interval = default_interval(self.timeout) if interval is None else float(interval)
        self.stop_grace = min(float(stop_grace), self.timeout)
        self._stop, self._exit, self._clock = stop, exit, clock
        self._peers = [r for r in range(world) if r != rank]
        self._done = threading.Event()
        # Guards the fields below: the beat thread writes them, the watch thread reads them.
        self._lock = threading.Lock()
        self._last_ok = 0.0  # when the beat thread last completed a round with the store
        self._heard: dict[int, tuple[int, float]] = {}  # peer -> (counter, when it last changed)
        self._left: set[int] = set()
        self._who: dict[int, dict] = {}
        self._store_error = ""
        self._threads: list[threading.Thread] = []
        self.fired: Optional[str] = None  # the message it exited with (tests record `exit`)

    # -- lifecycle
    # -------------------------------------------------------------------------------------------

    def start(self) -> "Watchdog":
        now = self._clock()
        self._last_ok = now
        self._heard = {p: (-1, now) for p in self._peers}
        try:
            me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
            self.store.set(self._key("who", self.rank), me)
        except Exception as e:  # noqa: BLE001 - the store is judged by the watch thread
            self._store_error = _short(e)
        loops = (("distrain-heartbeat", self._beat_loop), ("distrain-watchdog", self._watch_loop))
        for name, target in loops:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stop both threads and tell the peers this rank left on purpose (best effort; bounded)."""
        if self._done.is_set():
            return
        self._done.set()
        try:
            self.store.set(self._key("left", self.rank), "1")
        except Exception:  # noqa: BLE001 - the store may be gone already (the launcher is ending)
            pass
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=self.interval)

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- beat thread: the only one that talks to the store
    # ----------------------------------------------------

    @staticmethod
    def _key(kind: str, rank: int) -> str:
        return f"{kind}/{rank}"

    def _beat_loop(self) -> None:
        while not self._done.is_set():
            try:
                self._beat_once()
            except Exception as e:  # noqa: BLE001 - the watch thread decides when to give up
                with self._lock:
                    self._store_error = _short(e)
            self._done.wait(self.interval)

    def _beat_once(self) -> None:
        store = self.store
        store.add(self._key("beat", self.rank), 1)
        watched = [p for p in self._peers if p not in self._left]
        counts = {p: int(store.add(self._key("beat", p), 0)) for p in watched}
        left = {p for p in counts if store.check([self._key("left", p)])}
        who = {}
        for p in self._peers:
            if p not in self._who and store.check([self._key("who", p)]):
                who[p] = json.loads(store.get(self._key("who", p)))
        now = self._clock()
        with self._lock:
            for p, n in counts.items():
                if n != self._heard[p][0]:
                    self._heard[p] = (n, now)
            self._left |= left
            self._who.update(who)
            self._last_ok, self._store_error = now, ""

    # -- watch thread: decides, never blocks on the store
    # -----------------------------------------------------

    def _watch_loop(self) -> None:
        period = min(self.interval, 1.0) / 2
        last = self._clock()
        while not self._done.wait(period):
            now = self._clock()
            if now - last > period + 2 * self.interval:
                # This process itself did not run (stopped, suspended): not the peers' fault.
                self._restart_clocks(now)
            last = now
            verdict = self.check()
            if verdict is not None and not self._done.is_set():
                code, message = verdict
                self.fired = message
                _say(message)
                self._exit(code)
                return

    def _restart_clocks(self, now: float) -> None:
        with self._lock:
            self._last_ok = now
            self._heard = {p: (n, now) for p, (n, _) in self._heard.items()}

    def check(self) -> Optional[tuple[int, str]]:
        """(exit code, message) when this rank must give up now; None while everything answers."""
        now = self._clock()
        stopping = self._stop_reason()
        with self._lock:
            store_silent = now - self._last_ok
            peers = [(p, now - t) for p, (_, t) in self._heard.items() if p not in self._left]
            store_error, who = self._store_error, dict(self._who)
        if store_silent > self.timeout:
            detail = f": {store_error}" if store_error else ""
            what = (f"the rendezvous store has not answered for {store_silent:.0f} s (its host, or "
                    f"the launcher holding it, is gone?{detail})")
            return self._verdict(stopping, what)
        if store_silent > _STALE_INTERVALS * self.interval:
            return None  # this rank's own view is stale (a slow store): no verdict on the peers yet
        limit = self.stop_grace if stopping else self.timeout
        silent = [(p, s) for p, s in peers if s > limit]
        if not silent:
            return None
        peer, seconds = max(silent, key=lambda ps: ps[1])
        info = who.get(peer, {})
        where = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
        return self._verdict(stopping, f"rank {peer} ({where}) has not responded for "
                                       f"{seconds:.0f} s (frozen or lost)")

    def _stop_reason(self) -> Optional[str]:
        """The stop signal that reached this process (even if its handler cannot run), or None."""
        stop = self._stop
        if stop is None:
            return None
        if hasattr(stop, "arrived"):
            return stop.arrived
        return (getattr(stop, "reason", None) or "a stop request") if stop.requested else None

    def _verdict(self, stopping: Optional[str], what: str) -> tuple[int, str]:
        me = f"[rank {self.rank}] distrain: "
        if stopping:
            return EXIT_STOPPED, (f"{me}{stopping} received, but {what}; exiting without a stop "
                                  f"checkpoint (the last committed checkpoint is the resume point)")
        return EXIT_PEER_LOST, (f"{me}{what}; stopping (train.peer_timeout_s={self.timeout:g}; "
                                f"committed checkpoints are intact: run again to resume)")


def _short(e: BaseException, limit: int = 200) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _say(message: str) -> None:
    """One write of the line straight to fd 2 (the blocked main thread may hold stderr's lock)."""
    try:
        os.write(2, (message + "\n").encode(errors="replace"))
    except OSError:
        pass
