"""distrain.signals: real signals sent to a child process that uses StopSignals, plus the SLURM helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distrain.signals import EXIT_STOPPED, StopSignals, in_slurm, requeue_slurm_job, slurm_job_ref

REPO = Path(__file__).resolve().parents[1]

# The child: installs StopSignals, says "ready", waits for a stop, reports the flags as JSON and
# exits EXIT_STOPPED. With `hold`, it then sleeps (a long "checkpoint save") so that a second signal
# can arrive while stopping.
CHILD = r"""
import json, os, signal, sys, time
from distrain.signals import EXIT_STOPPED, StopSignals
hold = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
stop = StopSignals().install()
print("ready", flush=True)
try:
    deadline = time.monotonic() + 30
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)
    print(json.dumps({"requested": stop.requested, "reason": stop.reason, "requeue": stop.requeue}), flush=True)
    end = time.monotonic() + hold
    while time.monotonic() < end:
        time.sleep(0.01)
    print(json.dumps({"reason": stop.reason, "requeue": stop.requeue, "count": stop.count}), flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    sys.exit(130)
sys.exit(EXIT_STOPPED)
"""


def _env(slurm: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if slurm:
        env["SLURM_JOB_ID"] = "4242"
    return env


class Child:
    def __init__(self, code: str = CHILD, args=(), slurm: bool = False):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(slurm),
        )
        assert self.readline() == "ready", self.proc.stderr.read()

    def readline(self) -> str:
        return self.proc.stdout.readline().strip()

    def json(self) -> dict:
        line = self.readline()
        assert line.startswith("{"), (line, self.proc.stderr.read() if self.proc.poll() is not None else "")
        return json.loads(line)

    def send(self, sig) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.mark.parametrize(
    "sig,slurm,requeue",
    [
        (signal.SIGTERM, False, False),
        (signal.SIGINT, False, False),
        (signal.SIGUSR1, False, False),
        (signal.SIGTERM, True, False),
        (signal.SIGUSR1, True, True),
        (signal.SIGHUP, False, False),
        (signal.SIGHUP, True, False),
    ],
)
def test_one_signal_sets_flags_and_stops_cleanly(sig, slurm, requeue):
    with Child(slurm=slurm) as child:
        child.send(sig)
        assert child.json() == {"requested": True, "reason": sig.name, "requeue": requeue}
        assert child.json() == {"reason": sig.name, "requeue": requeue, "count": 1}
        assert child.wait() == EXIT_STOPPED


def test_second_sigint_while_stopping_raises_keyboard_interrupt():
    with Child(args=[30]) as child:
        child.send(signal.SIGINT)
        assert child.json()["reason"] == "SIGINT"
        child.send(signal.SIGINT)
        # At once, during the 30 s "save": after it the child would have printed its JSON line
        # first.
        assert child.readline() == "KeyboardInterrupt"
        assert child.wait() == 130


def test_sigint_after_sigterm_also_stops_at_once():
    with Child(args=[30]) as child:
        child.send(signal.SIGTERM)
        assert child.json()["reason"] == "SIGTERM"
        child.send(signal.SIGINT)
        assert child.readline() == "KeyboardInterrupt"
        assert child.wait() == 130


def test_repeated_sigterm_and_usr1_are_absorbed_while_stopping():
    # SLURM sends SIGTERM after the job requeued itself, and torch's elastic agent forwards it once
    # more.
    with Child(args=[1.0], slurm=True) as child:
        child.send(signal.SIGUSR1)
        assert child.json() == {"requested": True, "reason": "SIGUSR1", "requeue": True}
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1):
            child.send(sig)
            time.sleep(0.1)
        assert child.json() == {"reason": "SIGUSR1", "requeue": True, "count": 4}
        assert child.wait() == EXIT_STOPPED


def test_nohup_keeps_sighup_ignored(tmp_path):
    """`nohup distrain train ...` asked to outlive the terminal: SIGHUP stays ignored, SIGTERM still stops."""
    proc = subprocess.Popen(["nohup", sys.executable, "-c", CHILD], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert json.loads(proc.stdout.readline())["reason"] == "SIGTERM"
        assert proc.wait(timeout=60) == EXIT_STOPPED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_usr1_after_sigterm_does_not_requeue():
    # After SIGTERM SLURM is cancelling/requeueing/preempting the job itself.
    with Child(args=[1.0], slurm=True) as child:
        child.send(signal.SIGTERM)
        assert child.json()["reason"] == "SIGTERM"
        child.send(signal.SIGUSR1)
        assert child.json() == {"reason": "SIGTERM", "requeue": False, "count": 2}
        assert child.wait() == EXIT_STOPPED


RESTORE = r"""
import json, os, signal, sys, time
from distrain.signals import StopSignals
def custom(signum, frame):
    print("custom", signum, flush=True)
signal.signal(signal.SIGTERM, custom)
signal.signal(signal.SIGUSR1, signal.SIG_IGN)    # e.g. inherited from launch/slurm_node.py
before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
stop = StopSignals().install()
assert all(signal.getsignal(s) != before[s] for s in before)
stop.install()                                    # idempotent: does not record its own handler as "old"
stop.uninstall()
stop.uninstall()                                  # idempotent
assert {s: signal.getsignal(s) for s in before} == before, signal.getsignal(signal.SIGTERM)
os.kill(os.getpid(), signal.SIGUSR1)              # ignored again: no stop, no death
os.kill(os.getpid(), signal.SIGTERM)              # the custom handler again
time.sleep(0.2)
print(json.dumps({"requested": stop.requested}), flush=True)
"""


AFTER_EXEC = r"""
import json, signal, time
from distrain.signals import StopSignals
pending = signal.SIGUSR1 in signal.sigpending()
stop = StopSignals().install()
time.sleep(0.2)
print(json.dumps({"pending": pending, "reason": stop.reason, "requeue": stop.requeue}))
"""

BLOCK_THEN_EXEC = r"""
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})     # what launch/slurm_node.py does
os.kill(os.getpid(), signal.SIGUSR1)                           # the warning comes "during start-up"
os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
"""


def test_usr1_blocked_before_exec_is_acted_on_once_the_handler_is_installed():
    proc = subprocess.run([sys.executable, "-c", BLOCK_THEN_EXEC, AFTER_EXEC], capture_output=True, text=True,
                          env=_env(slurm=True), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"pending": True, "reason": "SIGUSR1", "requeue": True}


def test_uninstall_restores_previous_handlers():
    proc = subprocess.run(
        [sys.executable, "-c", RESTORE],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"custom {int(signal.SIGTERM)}", '{"requested": false}']


def test_after_uninstall_default_sigterm_kills_again():
    code = r"""
import signal, time
from distrain.signals import StopSignals
StopSignals().install().uninstall()
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
print("ready", flush=True)
time.sleep(30)
"""
    with Child(code=code) as child:
        child.send(signal.SIGTERM)
        assert child.wait() == -signal.SIGTERM


def test_context_manager_and_flags_without_signals():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert stop.installed
        assert not stop.requested and stop.reason is None and not stop.requeue
        assert stop.describe() == "no stop requested"
    assert not stop.installed
    assert signal.getsignal(signal.SIGTERM) == before


def test_in_process_handler_sets_flags(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    stop = StopSignals().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.reason == "SIGUSR1" and stop.requeue
        assert "requeue" in stop.describe() and str(EXIT_STOPPED) in stop.describe()
    finally:
        stop.uninstall()


def test_install_outside_main_thread_is_an_error():
    errors = []

    def run():
        try:
            StopSignals().install()
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


def test_exit_code_is_documented_tempfail():
    assert EXIT_STOPPED == 75
    assert EXIT_STOPPED not in (0, 1, 2, 130, 143)


# --- SLURM environment helpers
# ---------------------------------------------------------------------------------


def _clear_slurm(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)


def test_in_slurm_and_job_ref(monkeypatch):
    _clear_slurm(monkeypatch)
    assert not in_slurm() and slurm_job_ref() is None
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert in_slurm() and slurm_job_ref() == "123"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert slurm_job_ref() == "120_4"


def _fake_scontrol(tmp_path: Path, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return bin_dir


def test_requeue_runs_scontrol_with_array_ref(tmp_path, monkeypatch):
    _clear_slurm(monkeypatch)
    log = tmp_path / "calls"
    bin_dir = _fake_scontrol(tmp_path, 'echo "$@" >> ' + str(log) + "\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "125")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    requeue_slurm_job()
    assert log.read_text() == "requeue 120_5\n"


def test_requeue_failure_raises_with_stderr(tmp_path, monkeypatch):
    _clear_slurm(monkeypatch)
    body = 'echo "scontrol: error: Requeue of JobId=9 not allowed" >&2\nexit 1\n'
    monkeypatch.setenv("PATH", f"{_fake_scontrol(tmp_path, body)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    with pytest.raises(RuntimeError, match="Requeue of JobId=9 not allowed"):
        requeue_slurm_job()


def test_requeue_outside_slurm_or_without_scontrol(tmp_path, monkeypatch):
    _clear_slurm(monkeypatch)
    with pytest.raises(RuntimeError, match="not running inside a SLURM job"):
        requeue_slurm_job()
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="scontrol is not on PATH"):
        requeue_slurm_job()


def test_module_has_no_distributed_imports():
    code = "import sys, distrain.signals; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'accelerate')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- the launcher's death (PR_SET_PDEATHSIG)
# -------------------------------------------------------------------

# A stand-in launcher: starts one worker with the elastic agent's environment and waits (the test
# SIGKILLs it).
LAUNCHER = r"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True)
time.sleep(120)
"""
# The worker: StopSignals as distrain train installs it; records what stopped it. argv: out file,
# "late" or not.
WORKER = r"""
import json, os, sys, time
from distrain import signals
out, late = sys.argv[1], sys.argv[2] == "late"
if late:  # the launcher dies while this worker still imports torch: before the death signal is set
    with open(out + ".imported", "w") as f:
        f.write(str(os.getpid()))
    while os.getppid() == signals._PARENT_AT_IMPORT:
        time.sleep(0.01)
stop = signals.StopSignals().install()
with open(out + ".ready", "w") as f:
    f.write(str(os.getpid()))
deadline = time.monotonic() + 60
while not stop.requested and time.monotonic() < deadline:
    time.sleep(0.01)
with open(out, "w") as f:
    json.dump({"reason": stop.reason, "describe": stop.describe()}, f)
sys.exit(signals.EXIT_STOPPED)
"""


def _wait_file(path: Path, hang_guard: float = 60) -> str:
    deadline = time.monotonic() + hang_guard
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)
    time.sleep(0.05)
    return path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("when", ["running", "late"])
def test_worker_of_a_killed_launcher_gets_a_stop_request(tmp_path, when):
    out = tmp_path / "stopped.json"
    env = _env()
    env["TORCHELASTIC_RUN_ID"] = "test"  # what torch's elastic agent sets for its workers
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER, str(out), when], env=env)
    try:
        marker = tmp_path / ("stopped.json.imported" if when == "late" else "stopped.json.ready")
        worker = int(_wait_file(marker))
        launcher.kill()  # SIGKILL: no forwarding, no clean-up by the launcher
        launcher.wait()
        got = json.loads(_wait_file(out))
        assert got["reason"] == "SIGTERM", got
        assert "the launcher is gone" in got["describe"], got
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    deadline = time.monotonic() + 60
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not Path(f"/proc/{worker}").exists()


def test_without_a_launcher_no_death_signal_is_asked_for():
    """A plain `distrain train` (no elastic agent) outlives the shell that started it, as under nohup."""
    code = "import ctypes, signal; from distrain.signals import StopSignals; StopSignals().install(); " \
           "v = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(v), 0, 0, 0); print(v.value)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr


def test_hung_up_terminal_is_silenced_live_outputs_are_kept(tmp_path):
    """After the terminal closed (pty master gone), SIGHUP points stdout/stderr at /dev/null; a file stays."""
    import pty

    code = r"""
import fcntl, os, sys, termios, time
from distrain.signals import StopSignals
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
log = open(sys.argv[1], "w", buffering=1)
stop = StopSignals().install()
os.write(1, b"ready\n")
while not stop.requested:
    time.sleep(0.01)
print("to the closed terminal", flush=True)          # would raise OSError (EIO) without the redirect
print("still here", file=sys.stderr, flush=True)
log.write(f"{stop.reason} {os.path.realpath('/proc/self/fd/1')} {os.path.realpath('/proc/self/fd/2')}\n")
sys.exit(75)
"""
    master, slave = pty.openpty()
    logf = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-c", code, str(logf)], stdin=slave, stdout=slave, stderr=slave,
                            env=_env(), start_new_session=True)
    os.close(slave)
    try:
        buf = b""
        while b"ready" not in buf:
            buf += os.read(master, 100)
    finally:
        os.close(master)  # the terminal closes: the kernel hangs it up and sends SIGHUP to the session leader
    assert proc.wait(timeout=60) == EXIT_STOPPED
    assert logf.read_text() == "SIGHUP /dev/null /dev/null\n"
