"""Experiment trackers (`--report-to`): every record of RUN/metrics.jsonl also goes to TensorBoard, W&B,
MLflow or trackio, from rank 0, offline unless asked otherwise; a tracker that fails is dropped with one
warning and training goes on (metrics.jsonl stays the record of truth).

TRACKERS is the one list of `--report-to` names: options.py validates against it and the launcher checks
each package is installed from it (`importlib.util.find_spec`). Nothing here imports a tracker's package,
or torch, before that tracker opens in the worker, so the launcher reads this module for free.

Where each one writes, and what a resume (`--resume`, a torchrun restart) continues:

    tensorboard  RUN/tensorboard/ event files; a resume purges the events a killed run wrote past its
                 checkpoint (TensorBoard's purge_step), so each step is in the curves once, as in metrics.jsonl
    wandb        RUN/wandb/, offline unless WANDB_MODE says otherwise or WANDB_API_KEY is set (never waits on
                 the network unasked; `wandb sync RUN/wandb/offline-run-*` uploads later); the run id is kept
                 in RUN/trackers.json and a resume continues that run
    mlflow       MLFLOW_TRACKING_URI, else a local `file:` store RUN/mlruns; the run id in RUN/trackers.json,
                 a resume continues that run
    trackio      trackio's local store (TRACKIO_DIR, by default ~/.cache/huggingface/trackio), project
                 dialogtrain; a resume continues the run of the same name

Each gets the run's resolved options (run.json) as its config / hyper-parameters and the run name
(`--run-name`, by default the run folder's name); a metric of a record is each finite number but `step`,
logged at that step under its metrics.jsonl name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dialogtrain.errors import first_line

if TYPE_CHECKING:
    from dialogtrain.options import RunOptions

RUN_IDS = "trackers.json"  # {tracker name: its run id}, what a resume continues
PROJECT = "dialogtrain"  # W&B project (unless WANDB_PROJECT), MLflow experiment (unless MLFLOW_EXPERIMENT_NAME)


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker opens with."""

    name: str  # --run-name, or the run folder's name
    folder: Path  # RUN
    config: dict[str, Any]  # run.json: every resolved option, by section
    resumed_at: int  # the step a resume continues after; 0 for a fresh start
    run_id: str | None = None  # this tracker's id of the run, stored at an earlier start (resume only)


class Tracker(Protocol):
    """One tracker, open on one run. `run_id`: what to store in RUN/trackers.json for a resume, or None."""

    PACKAGE: str  # what `pip install` and `import` call it
    run_id: str | None
    where: str  # where it writes, for the start-up line

    def __init__(self, run: TrackedRun) -> None: ...

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """run.json as one level: {"optim": {"lr": 5e-5}} -> {"optim.lr": 5e-5} (hyper-parameter tables)."""
    return {f"{section}.{name}": value for section, values in config.items() if isinstance(values, dict)
            for name, value in values.items()} | {k: v for k, v in config.items() if not isinstance(v, dict)}


class TensorBoardTracker:
    PACKAGE = "tensorboard"

    def __init__(self, run: TrackedRun):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: TensorBoard's reader drops every event of a step >= it written earlier in this folder,
        # i.e. what a killed run logged past the checkpoint this one resumes from (or a whole earlier
        # attempt, on a fresh start), which this run logs again.
        self.writer = SummaryWriter(str(run.folder / "tensorboard"), purge_step=run.resumed_at + 1)
        if not run.resumed_at:
            for summary in hparams(flat_config(run.config), {"loss": 0, "eval_loss": 0}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("run.json", "    " + json.dumps(run.config, indent=2).replace("\n", "\n    "))
        self.run_id, self.where = None, str(run.folder / "tensorboard")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """offline unless WANDB_MODE says otherwise or WANDB_API_KEY is set: a run never waits on the network
    (or a login prompt) it was not asked to use."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


class WandbTracker:
    PACKAGE = "wandb"

    def __init__(self, run: TrackedRun):
        import wandb

        mode = wandb_mode()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run.name, config=run.config,
                              dir=str(run.folder), mode=mode, id=run.run_id,
                              resume="allow" if run.run_id else None)
        self.run_id, self.where = self.run.id, f"{run.folder / 'wandb'} ({mode})"

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    PACKAGE = "mlflow"

    def __init__(self, run: TrackedRun):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run.folder / "mlruns").absolute().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store (its offline store, no database needed) behind this opt-in.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        if run.run_id:
            self.run_id = run.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        # A parameter cannot change in MLflow: a resume adds the ones it lacks (run.json has the rest).
        logged = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)) for k, v in flat_config(run.config).items() if k not in logged]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        self.where = uri

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    PACKAGE = "trackio"

    def __init__(self, run: TrackedRun):
        import trackio

        # System metrics off: the tracker gets what metrics.jsonl gets, nothing of its own.
        self.run = trackio.init(project=PROJECT, name=run.name, config=run.config, embed=False,
                                resume="allow" if run.resumed_at else "never", auto_log_cpu=False,
                                auto_log_gpu=False)
        self.run_id, self.where = None, f"trackio project {PROJECT}, run {run.name}"

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MLflowTracker,
    "trackio": TrackioTracker,
}


def requested_trackers(report_to: str) -> list[str]:
    """--report-to as names, each once: "tensorboard, wandb" -> ["tensorboard", "wandb"]; "none" -> []."""
    names = list(dict.fromkeys(name.strip() for name in report_to.split(",") if name.strip()))
    return [] if names == ["none"] else names


def missing_tracker_problems(report_to: Any) -> list[str]:
    """For the launcher, before any worker starts: one line per requested tracker whose package is not
    installed here, naming what to install. Finds packages without importing them."""
    if not isinstance(report_to, str):
        return []  # options name the bad type
    return [f"--report-to {name}: the {TRACKERS[name].PACKAGE} package is not installed; "
            f"pip install 'dialogtrain[{name}]'"
            for name in requested_trackers(report_to)
            if name in TRACKERS and importlib.util.find_spec(TRACKERS[name].PACKAGE) is None]


def warn(message: str) -> None:
    """One line on stderr that keeps the progress bar whole."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


class Trackers:
    """The trackers open on a run: each record goes to each; one that raises is closed and dropped, with
    one warning, and the run goes on."""

    def __init__(self, opened: dict[str, Tracker]):
        self.opened = opened

    def log(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl record: its finite numbers but `step`, at `step`."""
        if not self.opened:
            return
        metrics = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        for name, tracker in list(self.opened.items()):
            try:
                tracker.log(metrics, record["step"])
            except Exception as err:  # disk full, server gone: the tracker goes, training stays
                self.drop(name, f"at step {record['step']}", err)

    def close(self) -> None:
        for name, tracker in list(self.opened.items()):
            try:
                tracker.close()
            except Exception as err:
                warn(f"--report-to {name}: closing it failed ({first_line(err)}); metrics.jsonl has every record")
        self.opened = {}

    def drop(self, name: str, when: str, err: Exception) -> None:
        tracker = self.opened.pop(name)
        warn(f"--report-to {name} failed {when} ({first_line(err)}); training goes on without it, "
             f"metrics.jsonl has every record")
        with contextlib.suppress(Exception):
            tracker.close()


def open_trackers(options: RunOptions, run_dir: Path, resumed_at: int) -> Trackers:
    """The trackers --report-to asks for, open on this run (rank 0 only). `resumed_at`: the step the run
    continues after (0: a fresh start). One that cannot open is left out with a warning."""
    names = requested_trackers(options.track.report_to)
    if not names:
        return Trackers({})
    ids_file = run_dir / RUN_IDS
    stored = json.loads(ids_file.read_text()) if resumed_at and ids_file.is_file() else {}
    run = TrackedRun(options.track.run_name or run_dir.resolve().name, run_dir, options.to_dict(), resumed_at)
    opened: dict[str, Tracker] = {}
    for name in names:
        try:
            opened[name] = TRACKERS[name](replace(run, run_id=stored.get(name)))
        except Exception as err:
            warn(f"--report-to {name}: could not open ({first_line(err)}); training goes on without it, "
                 f"metrics.jsonl has every record")
    ids = {**stored, **{name: tracker.run_id for name, tracker in opened.items() if tracker.run_id}}
    if ids:
        ids_file.write_text(json.dumps(ids, indent=2) + "\n")
    if opened:
        print(f"report-to: {'; '.join(f'{name} -> {t.where}' for name, t in opened.items())}", flush=True)
    return Trackers(opened)
