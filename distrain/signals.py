"""Stop requests from signals: SLURM's warning and kills, Ctrl-C, a hang-up, a dead launcher.

Standalone on purpose (no torch.distributed, no accelerate): the handlers only set flags, and the
training loop polls :attr:`StopSignals.requested` once per optimizer step, agrees with the other
ranks (any rank asked => all stop), saves a checkpoint and exits with :data:`EXIT_STOPPED`.

Who sends what (see slurm/train.sbatch):

* ``SIGUSR1`` -- SLURM's warning before the time limit (``#SBATCH --signal=USR1@120``, no ``B:``, so
  it goes to every process of the job steps on every node, not to the batch shell), or ``scancel
  --signal=USR1``. Under SLURM the job should requeue itself after saving
  (:attr:`StopSignals.requeue`, :func:`requeue_slurm_job`) so that it continues from the checkpoint;
  outside SLURM it is just a stop request. torch's elastic agent (``accelerate launch``) would die
  of SIGUSR1, so launch/slurm_node.py starts it with SIGUSR1 blocked; the workers inherit the
  blocked mask, and a warning that arrives while they import torch stays pending until
  :meth:`StopSignals.install` sets the handler and unblocks it (SLURM may send it up to 60 s early,
  so a short job can get it during start-up).
* ``SIGTERM`` -- ``scancel``, ``scontrol requeue``, preemption, the time limit itself, or ``kill``.
  SLURM sends SIGKILL ``KillWait`` seconds later (30 s by default; torch's elastic agent also kills
  its workers 30 s after forwarding a SIGTERM), so finish the current step, save and exit well
  within that. SLURM requeues or cancels the job by itself: no :func:`requeue_slurm_job` here.
* ``SIGHUP`` -- the terminal or the SSH session closed (or ``kill -HUP``): a stop like SIGTERM. The
  terminal is gone, so writes to it would fail (EIO) and break the stop path: on SIGHUP,
  stdout/stderr on a hung-up terminal are pointed at /dev/null first (other outputs, files and
  pipes, are kept). Under ``accelerate launch`` the launcher gets the hang-up (the workers run in
  sessions of their own) and forwards SIGHUP to its workers, as it does SIGTERM (torch's elastic
  agent handles SIGTERM, SIGINT, SIGHUP and SIGQUIT so, and overrides ``nohup``'s SIG_IGN: to
  outlive a logout, start the run in tmux/screen or with ``setsid``). A single process started with
  SIGHUP ignored (``nohup distrain train ...``) keeps ignoring it.
* The launcher's death -- a worker started by torch's elastic agent (``accelerate launch``,
  torchrun) asks the kernel for a SIGTERM when its launcher exits (``prctl(PR_SET_PDEATHSIG)``,
  Linux; :func:`die_with_launcher`): killing the launcher, even with SIGKILL, stops the workers
  (stop checkpoint, exit 75) instead of leaving them training as orphans. If a peer is gone as well,
  distrain.watchdog bounds the wait.
* ``SIGINT`` -- Ctrl-C. The first one asks for a clean stop; another SIGINT while a stop is pending
  raises ``KeyboardInterrupt`` at once (no checkpoint). Under ``accelerate launch`` the terminal's
  Ctrl-C goes to the launcher, which forwards one SIGINT to its workers (they run in their own
  sessions).

Exit code: :data:`EXIT_STOPPED` = 75 (``EX_TEMPFAIL`` in sysexits.h: "temporary failure, try
again"): the run did not finish but saved a checkpoint, and running the same command again resumes
it (``resume=auto``). It is not 0 so that ``distrain train ... && next-step`` does not go on with an
unfinished model, and so that a retry loop (``until distrain train ...; do :; done``) or a
restart-on-failure supervisor (k8s, systemd) runs it again; it is not 1 or 2 (errors, bad config) so
that a wrapper can tell "stopped, resumable" from "failed". Under SLURM the exit code of a stopped
run does not decide the job's fate: after SIGUSR1 the job has already requeued itself, after SIGTERM
SLURM is cancelling/requeueing/preempting it. Note that ``accelerate launch`` reports a worker's 75
as a failure (ChildFailedError, launcher exit 1), which is still non-zero.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import subprocess
import sys
import termios
import threading
from types import FrameType
from typing import Callable, Optional, Union

from distrain import slurm

EXIT_STOPPED: int = 75
"""Exit code of a run that stopped on request after saving a checkpoint (EX_TEMPFAIL)."""

_Handler = Union[Callable[[int, Optional[FrameType]], object], int, signal.Handlers, None]

STOP_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)

# The parent as early as this process can see it (this module is imported before torch): a launcher
# that dies before die_with_launcher() has set the death signal is noticed by comparing with it.
_PARENT_AT_IMPORT = os.getppid()
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def in_slurm() -> bool:
    """True inside a SLURM job (batch script, srun step or salloc shell)."""
    return slurm.in_slurm()


def slurm_job_ref() -> Optional[str]:
    """The job as ``scontrol`` names it (``"123"``, ``"123_4"``); None outside SLURM."""
    return slurm.job_ref()


def under_launcher() -> bool:
    """Started by torch's elastic agent (``accelerate launch`` with several processes, torchrun)."""
    return bool(os.environ.get("TORCHELASTIC_RUN_ID"))


def die_with_launcher(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Have the kernel send ``sig`` to this process when its parent (the launcher) exits.

    True if set. Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere a no-op returning False. The
    signal comes when the parent *thread* that forked this process exits: torch's elastic agent
    starts its workers from its main thread, which lives as long as the launcher. A launcher that
    died before this call (the death signal is not sent retroactively) is noticed by the parent
    having changed since this module's import, or being init: then ``sig`` is sent at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != _PARENT_AT_IMPORT or _PARENT_AT_IMPORT == 1:
        os.kill(os.getpid(), sig)
    return True


def silence_hung_up_terminal() -> list[int]:
    """Point stdout/stderr at /dev/null where they are a hung-up terminal; returns those fds.

    A hung-up terminal fails every write (and tcgetattr) with EIO; a live terminal, a file or a pipe
    is kept.
    """
    done = []
    for fd in (1, 2):
        try:
            if not stat.S_ISCHR(os.fstat(fd).st_mode):
                continue
            termios.tcgetattr(fd)
        except termios.error as e:
            if e.args and e.args[0] == errno.EIO:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
                done.append(fd)
        except OSError:
            continue
    return done


def requeue_slurm_job(timeout: float = 60.0) -> None:
    """Ask SLURM to requeue this job (``scontrol requeue <ref>``); RuntimeError if it cannot.

    Call it once (global rank 0), after the checkpoint is written and every rank has passed a
    barrier: SLURM then sends SIGTERM to the whole job (and SIGKILL after KillWait), and the job
    goes back to the queue with the same job id, so the next run finds the same run directory. Needs
    a job submitted with ``--requeue`` (or a cluster with ``JobRequeue=1``).
    """
    ref = slurm_job_ref()
    if ref is None:
        raise RuntimeError("cannot requeue: not running inside a SLURM job "
                           "(SLURM_JOB_ID is not set)")
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", ref], capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise RuntimeError(f"cannot requeue SLURM job {ref}: scontrol is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"cannot requeue SLURM job {ref}: `scontrol requeue` did not answer in "
                           f"{timeout:g} s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip() or f"exit code {proc.returncode}"
        raise RuntimeError(f"`scontrol requeue {ref}` failed: {detail}")


def shield_data_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` for DataLoader workers: stop signals are for the trainer, not its workers.

    SLURM (every process of the job step), ``kill -- -PGID``, a terminal's Ctrl-C and cgroup-wide
    kills also reach the workers. torch's worker dies of a SIGTERM that its parent did not send, and
    the trainer then fails at once ("DataLoader worker ... is killed by signal: Terminated") instead
    of finishing the step and writing its stop checkpoint, which needs the workers for the rest of
    the step. So here SIGINT, SIGUSR1, SIGHUP are ignored, and SIGTERM is blocked and taken by a
    thread that knows its sender: from the parent (multiprocessing's terminate() of daemonic workers
    at exit, the DataLoader's last resort) the worker exits at once, as torch's own handler does;
    from anyone else it is ignored. Workers still leave when the trainer shuts its DataLoaders down
    or dies, and SIGKILL (SLURM's, after KillWait) ends them as always.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a hang-up reaches the trainer's process group
    signal.set_wakeup_fd(-1)  # the trainer's StopSignals pipe, inherited by fork: not ours to write
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no sender information; keep torch's handling
        return
    parent = os.getppid()
    # Blocked in this thread and in every thread it starts from now on (they inherit the mask).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def take_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=take_sigterm, name="distrain-sigterm", daemon=True).start()


class StopSignals:
    """Handlers for SIGTERM, SIGINT, SIGUSR1, SIGHUP (restored on uninstall) that only set flags.

    Usage::

        stop = StopSignals().install()
        try:
            for step in ...:
                train_one_step()
                if any_rank(stop.requested):          # e.g. an all-reduce of the flag
                    save_checkpoint()
                    if stop.requeue and is_main: requeue_slurm_job()
                    sys.exit(EXIT_STOPPED)
        finally:
            stop.uninstall()

    Also a context manager (``with StopSignals() as stop:``). Install from the main thread (Python
    runs signal handlers only there). The first signal decides :attr:`reason`; later SIGTERM/SIGUSR1
    are absorbed (SLURM sends SIGTERM after the job requeued itself; the elastic agent forwards
    SIGTERM again). A SIGUSR1 under SLURM sets :attr:`requeue` unless a SIGTERM came first (then
    SLURM is already cancelling, requeueing or preempting the job). A SIGINT while a stop is pending
    raises KeyboardInterrupt: the second Ctrl-C stops at once. SIGHUP also silences a hung-up
    terminal (:func:`silence_hung_up_terminal`). Under torch's elastic agent, install() also asks
    for a SIGTERM when the launcher dies (:func:`die_with_launcher`).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self._signals = tuple(signals)
        self._old: dict[signal.Signals, _Handler] = {}
        self._reason: Optional[str] = None
        self._requeue = False
        self._terminated = False
        self._count = 0
        self._arrived: Optional[str] = None
        self._wake: Optional[tuple[int, int]] = None  # wakeup pipe (read, write) while installed
        self._old_wakeup = -1
        self._wake_lock = threading.Lock()

    # -- installation
    # ------------------------------------------------------------------------------------------

    def install(self) -> "StopSignals":
        """Install the handlers (idempotent); returns self."""
        if self._old:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignals.install() must be called from the main thread")
        for sig in self._signals:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # started under nohup: the user asked to outlive the terminal
            self._old[sig] = signal.signal(sig, self._handle)
        # Python runs a handler only when the main thread is back in Python code; blocked in a
        # collective it never is. The interpreter's C-level handler writes the signal number to this
        # pipe at once: `arrived` reads it.
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wake = (r, w)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        # launch/slurm_node.py blocks SIGUSR1 so that SLURM's warning waits for this handler: take
        # it now (a pending one runs the handler at once).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(self._signals))
        if signal.SIGTERM in self._signals and under_launcher():
            die_with_launcher(signal.SIGTERM)  # after the handler: the launcher's death is a stop
        return self

    def uninstall(self) -> None:
        """Restore the handlers from before :meth:`install` (idempotent). The flags are kept."""
        old, self._old = self._old, {}
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        with self._wake_lock:
            wake, self._wake = self._wake, None
        if wake is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            for fd in wake:
                os.close(fd)

    @property
    def installed(self) -> bool:
        return bool(self._old)

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # -- the handler: flags only
    # -------------------------------------------------------------------------------

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT and self._reason is not None:
            raise KeyboardInterrupt(f"second interrupt while stopping on {self._reason}")
        self._count += 1
        if sig == signal.SIGHUP:
            silence_hung_up_terminal()  # before the stop path writes to the closed terminal
        if self._reason is None:
            self._reason = sig.name
        if sig == signal.SIGTERM:
            self._terminated = True
        elif sig == signal.SIGUSR1 and in_slurm() and not self._terminated:
            # After a SIGTERM SLURM is already cancelling, requeueing or preempting the job: leave
            # it to SLURM.
            self._requeue = True

    # -- what the training loop reads
    # --------------------------------------------------------------------------

    @property
    def requested(self) -> bool:
        """A stop was asked for on this process (any rank may be first: agree before acting)."""
        return self._reason is not None

    @property
    def arrived(self) -> Optional[str]:
        """The first stop signal that reached this process, even one whose handler has not run yet
        because the main thread is blocked in C code (a collective): for watcher threads
        (distrain.watchdog). None if none."""
        with self._wake_lock:
            if self._arrived is None and self._wake is not None:
                try:
                    data = os.read(self._wake[0], 4096)
                except OSError:  # nothing there (EAGAIN)
                    data = b""
                ours = {int(s) for s in self._signals}
                names = [signal.Signals(n).name for n in data if n in ours]
                self._arrived = names[0] if names else None
            return self._arrived or self._reason

    @property
    def reason(self) -> Optional[str]:
        """The first signal handled: ``"SIGTERM"``, ``"SIGINT"``, ``"SIGUSR1"``, ``"SIGHUP"``."""
        return self._reason

    @property
    def requeue(self) -> bool:
        """SIGUSR1 came inside a SLURM job: after saving, requeue it (:func:`requeue_slurm_job`)."""
        return self._requeue

    @property
    def count(self) -> int:
        """How many stop signals were absorbed (for logs)."""
        return self._count

    def describe(self) -> str:
        """A log line for the stop, e.g. ``"SIGUSR1 (SLURM time limit near): checkpoint, requeue,
        exit 75"``."""
        if self._reason is None:
            return "no stop requested"
        why = {
            "SIGUSR1": ("SLURM time limit near or scancel --signal=USR1" if in_slurm()
                        else "SIGUSR1"),
            "SIGTERM": "cancelled, requeued or preempted by SLURM" if in_slurm() else "terminated",
            "SIGHUP": "terminal or SSH session closed",
            "SIGINT": "interrupted (Ctrl-C again to stop at once)",
        }[self._reason]
        if self._reason == "SIGTERM" and os.getppid() != _PARENT_AT_IMPORT:
            why += "; the launcher is gone"
        then = "checkpoint, requeue" if self._requeue else "checkpoint"
        return f"{self._reason} ({why}): {then}, exit {EXIT_STOPPED}"
