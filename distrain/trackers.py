"""Experiment trackers beside metrics.jsonl and TensorBoard: a CSV file, MLflow, Weights & Biases.

`MetricsLogger` (distrain.metrics) owns the story (which values, at which step); each tracker here
only knows how to put a piece of it somewhere: `params` (the resolved config), `tags` (what ran
where), `metrics` (name -> number at a step), `image` (an HWC uint8 array at a step), `artifact` (a
file) and `finish` (how the run ended).

Invariants:
- Trackers exist on the main process only (the logger is disabled elsewhere). `check_installed`
  runs on every rank at start-up, so a tracker whose library is missing fails every rank alike,
  before training, with a UserError naming the extra to install.
- A tracker that fails (a server that is down, a full disk) prints one warning and is switched off
  for the rest of the run: training goes on, and metrics.jsonl and TensorBoard keep every value.
- The MLflow / W&B run ids are kept in ``<run>/trackers.json`` (written atomically): a resumed or
  requeued run continues the same tracker run, so it stays one curve.
- MLflow and W&B go through Accelerate's tracker classes (`accelerate.tracking`, the only part of
  Accelerate used here) for starting a run, resuming a run id, params, metrics, images and
  artifacts. Those classes log through `accelerate.logging`, which needs Accelerate's state made
  first: the trainer makes its Accelerator before the MetricsLogger. Their `main_process_only`
  switch is turned off because the caller is the main process already. What they lack is done with
  the library itself: the MLflow tracking URI, tags, images by step and the final run status; W&B
  tags and files.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from distrain.errors import UserError
from distrain.fsio import atomic_write_text

IDS_FILE = "trackers.json"
CSV_FILE = "metrics.csv"
# Library to import and the extra that installs it (pip install 'distrain[EXTRA]').
LIBRARIES = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
# How each ending of a run shows in MLflow (RunStatus names) and in W&B (exit code).
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED"}
# An MLflow server that does not answer must not hold training up for minutes per call (MLflow's own
# defaults: 7 retries, 120 s timeout); set in the environment only where the user has not.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

Warn = Callable[[str], None]


def check_installed(names) -> None:
    """UserError naming the extra when a configured tracker's library cannot be imported."""
    for name in names:
        module, extra = LIBRARIES.get(name, (None, None))
        if module is None:
            continue
        try:  # looked up, not imported: importing MLflow or W&B takes seconds on every rank
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise UserError(f"config key 'log.trackers': {name} is not installed; install it with "
                            f"pip install 'distrain[{extra}]' (or remove {name} from log.trackers)")


@dataclass
class Settings:
    """Where and under which names a run is tracked (the log.* keys, defaults filled in)."""

    run_dir: Path
    experiment: str
    run_name: str
    mlflow_uri: str


def resolve_settings(log_cfg, run_dir: Path) -> Settings:
    run_dir = Path(run_dir)
    uri = log_cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = f"sqlite:///{(run_dir / 'mlruns').resolve()}/mlflow.db"
    name = log_cfg.run_name or run_dir.resolve().name
    return Settings(run_dir, log_cfg.experiment or "distrain", name, uri)


def slurm_tags() -> dict:
    """The SLURM job this process belongs to, as tags (none outside SLURM)."""
    from distrain.signals import slurm_job_ref

    tags = {"slurm_job": slurm_job_ref()}
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        tags[key.lower()] = os.environ.get(key)
    return {k: v for k, v in tags.items() if v}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + str(k)] = v
    return out


# -- run ids --------------------------------------------------------------------------------------
def load_ids(run_dir: Path) -> dict:
    """What trackers.json holds ({} when missing or unreadable: a new tracker run then)."""
    try:
        data = json.loads((Path(run_dir) / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_id(run_dir: Path, name: str, info: dict) -> None:
    ids = load_ids(run_dir)
    ids[name] = info
    atomic_write_text(Path(run_dir) / IDS_FILE, json.dumps(ids, indent=2, sort_keys=True) + "\n")


# -- trackers -------------------------------------------------------------------------------------
class Tracker:
    """The calls MetricsLogger makes on every tracker; each is a no-op unless a tracker needs it."""

    name = "tracker"

    def params(self, config: dict) -> None:
        """The resolved config (nested dict, as Config.to_dict gives it)."""

    def tags(self, tags: dict) -> None:
        """Name -> str, set again at every start (a resumed run may run elsewhere)."""

    def metrics(self, values: dict, step: int) -> None:
        """Name -> float at optimizer step ``step``."""

    def image(self, tag: str, image, step: int) -> None:
        """An (H, W, 3) uint8 array."""

    def artifact(self, path: Path) -> None:
        """A file the run produced (the exported model)."""

    def finish(self, outcome: str) -> None:
        """``outcome``: finished, stopped, diverged or failed (distrain.metrics.outcome)."""


class CsvFile(Tracker):
    """``<run>/metrics.csv``: one row per logged group of values, fixed columns, flushed per row.

    A row holds what one call logged (a training interval, an epoch's training summary, an
    evaluation, the final metrics); the other columns stay empty. A resumed run appends under the
    header the file already has, so the columns never shift within a file.
    """

    name = "csv"
    COLUMNS = ("time_utc", "step", "train/loss", "train/lr", "train/images_per_s",
               "train/epoch_loss", "train/epoch_accuracy", "eval/loss", "eval/accuracy",
               "hparam/final_accuracy", "hparam/best_accuracy", "hparam/final_loss")

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / CSV_FILE
        text = self.path.read_text() if self.path.is_file() else ""
        if text:
            self.columns = next(csv.reader([text.splitlines()[0]]))
            if not text.endswith("\n"):  # a row torn by a crash: start the next on its own line
                self._append("\n")
        else:
            self.columns = list(self.COLUMNS)
            self._write_row({c: c for c in self.columns})

    def _append(self, text: str) -> None:
        with open(self.path, "a", newline="") as f:
            f.write(text)
            f.flush()

    def _write_row(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.columns, extrasaction="ignore", lineterminator="\n")
            w.writerow(row)
            f.flush()

    def metrics(self, values: dict, step: int) -> None:
        row = {k: v for k, v in values.items() if k in self.columns and v is not None}
        if row:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            self._write_row({"time_utc": stamp, "step": step, **row})


def _probe_http(uri: str, timeout: float = 5.0) -> None:
    """ConnectionError at once when an http(s) MLflow server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answered (a proxy without /health, say): the server is up
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", e)
        raise ConnectionError(f"cannot reach the MLflow server {uri}: {why}") from None


class MlflowRun(Tracker):
    """One MLflow run per run directory, continued on resume (same tracking URI)."""

    name = "mlflow"

    def __init__(self, s: Settings, warn: Warn):
        import mlflow
        from accelerate.tracking import MLflowTracker

        for k, v in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        _probe_http(s.mlflow_uri)
        mlflow.set_tracking_uri(s.mlflow_uri)
        local = s.mlflow_uri.startswith("sqlite:")
        if local:
            (s.run_dir / "mlruns").mkdir(parents=True, exist_ok=True)
        prev = load_ids(s.run_dir).get("mlflow") or {}
        run_id = prev.get("run_id") if prev.get("tracking_uri") == s.mlflow_uri else None
        self.warn = warn
        artifacts = str((s.run_dir / "mlruns" / "artifacts").resolve()) if local else None
        self.t = MLflowTracker(experiment_name=s.experiment, run_id=run_id, run_name=s.run_name,
                               logging_dir=artifacts)
        self.t.main_process_only = False
        self.t.start()
        self.run_id = self.t.active_run.info.run_id
        self.resumed = run_id is not None
        save_id(s.run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": s.mlflow_uri,
                                      "experiment": s.experiment})

    def params(self, config: dict) -> None:
        import mlflow

        flat = {k: str(v) for k, v in flatten(config).items()}
        # MLflow keeps a run's parameters forever: a resume with a changed key (more epochs) logs
        # only the keys the run does not have yet.
        have = mlflow.get_run(self.run_id).data.params if self.resumed else {}
        changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
        if changed:
            self.warn(f"MLflow keeps the first value of a run's parameters; changed on resume: "
                      f"{', '.join(changed)} (config.yaml has the new values)")
        new = {k: v for k, v in flat.items() if k not in have}
        if new:
            self.t.store_init_configuration(new)

    def tags(self, tags: dict) -> None:
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def metrics(self, values: dict, step: int) -> None:
        self.t.log(values, step=step)

    def image(self, tag: str, image, step: int) -> None:
        import mlflow

        mlflow.log_image(image, key=tag, step=step, synchronous=True)

    def artifact(self, path: Path) -> None:
        self.t.log_artifact(str(path))

    def finish(self, outcome: str) -> None:
        import mlflow

        mlflow.end_run(status=MLFLOW_STATUS.get(outcome, "FAILED"))


class WandbRun(Tracker):
    """One W&B run per run directory (project = the experiment), continued on resume."""

    name = "wandb"

    def __init__(self, s: Settings, warn: Warn):
        import wandb
        from accelerate.tracking import WandBTracker

        prev = load_ids(s.run_dir).get("wandb") or {}
        run_id = prev.get("run_id") if prev.get("project") == s.experiment else None
        # console off: W&B would otherwise wrap this process's stderr (the progress bar's stream).
        self.t = WandBTracker(s.experiment, name=s.run_name, id=run_id, resume="allow",
                              dir=str(s.run_dir), settings=wandb.Settings(console="off"))
        self.t.start()
        self.run = self.t.run
        save_id(s.run_dir, "wandb", {"run_id": self.run.id, "project": s.experiment})

    def params(self, config: dict) -> None:
        self.t.store_init_configuration(config)

    def tags(self, tags: dict) -> None:
        # W&B tags are plain strings: "key=value", replacing an older value of the key on resume.
        keep = [t for t in (self.run.tags or ()) if t.split("=", 1)[0] not in tags]
        self.run.tags = tuple(keep + [f"{k}={v}" for k, v in tags.items()])
        self.run.config.update({"run": dict(tags)}, allow_val_change=True)

    def metrics(self, values: dict, step: int) -> None:
        self.t.log(values, step=step)

    def image(self, tag: str, image, step: int) -> None:
        self.t.log_images({tag: [image]}, step=step)

    def artifact(self, path: Path) -> None:
        path = Path(path).resolve()
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, outcome: str) -> None:
        self.run.finish(exit_code=0 if outcome in ("finished", "stopped") else 1)


class Guarded:
    """A tracker whose first failure prints one warning and switches it off; the run goes on."""

    def __init__(self, tracker: Tracker, warn: Warn):
        self.tracker, self.warn, self.on = tracker, warn, True

    def call(self, method: str, *args: Any) -> None:
        if not self.on:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as e:  # noqa: BLE001 - a tracker must never stop training
            self.on = False
            name = self.tracker.name
            self.warn(f"{name}: {method} failed ({_reason(e)}); {name} tracking is off for the "
                      f"rest of this run (metrics.jsonl has every value)")


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def open_trackers(names, log_cfg, run_dir: Path, warn: Optional[Warn] = None) -> list[Guarded]:
    """The configured trackers besides TensorBoard, started (main process only).

    One that cannot start (server down, bad URI) is left out with one warning. ``warn`` prints a
    line (the trainer's log, which keeps a progress bar intact); stderr by default.
    """
    write = warn or _stderr

    def warn(msg: str) -> None:
        write(f"warning: {msg}")

    s = resolve_settings(log_cfg, run_dir)
    makers = {"csv": lambda: CsvFile(s.run_dir), "mlflow": lambda: MlflowRun(s, warn),
              "wandb": lambda: WandbRun(s, warn)}
    out = []
    for name in dict.fromkeys(names):
        if name not in makers:
            continue
        try:
            out.append(Guarded(makers[name](), warn))
        except Exception as e:  # noqa: BLE001 - training goes on without this tracker
            where = f" at {s.mlflow_uri}" if name == "mlflow" else ""
            warn(f"{name}: could not start the tracker run{where} ({_reason(e)}); training goes "
                 f"on without {name} (metrics.jsonl has every value)")
    return out
