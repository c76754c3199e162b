"""--report-to: each tracker's own files, read back with its own reader, hold the scalars and steps of
metrics.jsonl (also across a resume); W&B offline holds the config; a missing package is refused at
launch; a tracker failing mid-run costs one warning, not the run. In-process SFT on the tiny GPT-2,
nothing touches the network (W&B offline, MLflow and trackio local files)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dialogtrain.options import RunOptions
from dialogtrain.train.metrics import read_metrics
from dialogtrain.train.resume import training_options
from dialogtrain.train.trackers import RUN_IDS, TRACKERS, Trackers, open_trackers
from launcher.cli import cli
from tests.checkpoint_helpers import deterministic, rewind
from tests.sft_harness import train_in_process, write_pairs_csv, write_run_dir

# 8 pairs, global batch 2: 4 steps per epoch; checkpoints at 3 and 6, evaluations at 3 and 6.
FLAGS = dict(micro_batch=2, lr=5e-3, max_steps=6, eval_every=3, save_every=3, precision="fp32", gpus="cpu")


def needs(*packages: str):
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)} "
                                                    f"(pip install 'dialogtrain[{missing[0] if missing else ''}]')")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B without a key or a mode (our default must be offline), its caches in tmp_path."""
    for key in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")


EVAL_PAIRS = [("what is your name", "i am a bot"), ("good bye", "see you")]  # held out: not in the training pairs


def sft_flags(gpt2_dir: Path, tmp: Path, **changes) -> dict:
    return dict(FLAGS, model=str(gpt2_dir), data=str(write_pairs_csv(tmp / "pairs.csv")),
                eval_data=str(write_pairs_csv(tmp / "eval.csv", EVAL_PAIRS)), **changes)


def jsonl_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value)]} of metrics.jsonl, the deterministic metrics (no clock-based ones)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        for name, value in deterministic(record).items():
            if name != "step":
                out.setdefault(name, []).append((record["step"], value))
    return out


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} as TensorBoard's own reader gives them (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def as_float32(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard stores float32: metrics.jsonl's values as it holds them."""
    return {name: [(step, float(np.float32(value))) for step, value in pairs] for name, pairs in scalars.items()}


@pytest.fixture(scope="module")
def tracked_run(gpt2_dir, tmp_path_factory):
    """An SFT run of 6 steps reported to TensorBoard and MLflow (checkpoints at 3 and 6), and a copy of it
    killed after its checkpoint of step 3 and resumed. Returns (run folder, resumed folder)."""
    tmp = tmp_path_factory.mktemp("tracked")
    flags = sft_flags(gpt2_dir, tmp, report_to="tensorboard,mlflow", run_name="support-v1")
    with pytest.MonkeyPatch.context() as patch:
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            patch.delenv(key, raising=False)
        train_in_process(write_run_dir(tmp / "run", **flags))
        resumed = rewind(tmp / "run", tmp / "resumed", step=3)  # its event files and MLflow store hold steps 1-6
        train_in_process(write_run_dir(resumed, resume="auto", **flags))
    return tmp / "run", resumed


@needs("tensorboard", "mlflow")
def test_tensorboard_event_files_hold_the_scalars_and_steps_of_metrics_jsonl(tracked_run):
    run_dir, _ = tracked_run
    want = as_float32(jsonl_scalars(run_dir))
    assert [step for step, _ in want["loss"]] == [1, 2, 3, 4, 5, 6] and [s for s, _ in want["eval_loss"]] == [3, 6]
    got = tensorboard_scalars(run_dir / "tensorboard")
    assert {name: got[name] for name in want} == want
    assert {"tokens_per_s", "mfu", "epoch"} <= set(got)  # every finite number of a record, not only these


@needs("tensorboard", "mlflow")
def test_tensorboard_after_a_resume_holds_each_step_once_as_metrics_jsonl(tracked_run):
    """The killed run's events past step 3 are purged: steps 1-6 once each, the resumed values."""
    run_dir, resumed = tracked_run
    want = as_float32(jsonl_scalars(resumed))
    got = tensorboard_scalars(resumed / "tensorboard")
    assert {name: got[name] for name in want} == want
    assert [step for step, _ in got["loss"]] == [1, 2, 3, 4, 5, 6]
    assert want == as_float32(jsonl_scalars(run_dir))  # the resume continued exactly


@needs("tensorboard")
def test_dpo_records_reach_tensorboard_as_metrics_jsonl_holds_them(gpt2_dir, tmp_path):
    """The hook is the loop's, not a method's: DPO's rewards and logps, train and eval, arrive too."""
    from tests.test_dpo import QUESTIONS, write_preferences_jsonl

    data = write_preferences_jsonl(tmp_path / "prefs.jsonl", QUESTIONS[:8])
    held_out = write_preferences_jsonl(tmp_path / "held_out.jsonl", QUESTIONS[8:])
    run_dir = tmp_path / "run"
    train_in_process(write_run_dir(run_dir, command="dpo", model=str(gpt2_dir), data=str(data),
                                   eval_data=str(held_out), micro_batch=2, max_steps=3, lr=1e-2, precision="fp32",
                                   gpus="cpu", report_to="tensorboard"), "dpo")
    want = as_float32(jsonl_scalars(run_dir))
    assert {"rewards/margins", "logps/chosen", "eval_rewards/accuracies", "eval_loss"} <= set(want)
    got = tensorboard_scalars(run_dir / "tensorboard")
    assert {name: got[name] for name in want} == want


@needs("tensorboard", "mlflow")
def test_tensorboard_holds_the_options_as_hyper_parameters(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, _ = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["optim.lr"].number_value == 5e-3 and hparams["schedule.max_steps"].number_value == 6
    assert hparams["track.report_to"].string_value == "tensorboard,mlflow"


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "mlruns").as_uri())
    run_id = json.loads((run_dir / RUN_IDS).read_text())["mlflow"]
    return client, client.get_run(run_id)


@needs("tensorboard", "mlflow")
def test_the_mlflow_local_store_holds_the_scalars_steps_and_options(tracked_run, gpt2_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir, _ = tracked_run
    client, run = mlflow_run(run_dir)
    assert run.info.run_name == "support-v1" and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.005" and run.data.params["model.model"] == str(gpt2_dir)
    for name, pairs in jsonl_scalars(run_dir).items():
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)] == pairs, name


@needs("tensorboard", "mlflow")
def test_a_resume_continues_the_same_mlflow_run(tracked_run, monkeypatch):
    """MLflow cannot delete what the killed run logged past step 3, so steps 4-6 are there twice, with the
    same values (an exact resume); every (step, value) is one of metrics.jsonl."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir, resumed = tracked_run
    client, run = mlflow_run(resumed)
    assert run.info.run_id == mlflow_run(run_dir)[1].info.run_id and run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    for name, pairs in jsonl_scalars(resumed).items():
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(set(history)) == pairs, name
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4, 4, 5, 5, 6, 6]


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (RUN/wandb/offline-run-*/run-ID.wandb): a 7-byte header, then
    LevelDB-log blocks of 32 KiB of chunks (crc32: 4 bytes, length: 2, type: 1, data); a record is one
    FULL (1) chunk or FIRST (2), MIDDLE (3)..., LAST (4). Each record is a wandb_internal_pb2.Record."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(pending))
            pending = b""
    return records


def wandb_contents(log: Path) -> tuple[dict, dict[str, list[tuple[int, float]]]]:
    """(config, {metric: [(step, value)]}) of an offline W&B run."""
    config, history = {}, {}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({u.key: json.loads(u.value_json) for u in updates})
        if kind == "history":
            for item in record.history.item:
                name = item.key or "/".join(item.nested_key)
                if not name.startswith("_"):
                    history.setdefault(name, []).append((record.history.step.num, json.loads(item.value_json)))
    return config, history


@needs("wandb")
def test_wandb_offline_files_hold_the_config_and_the_scalars_and_a_resume_keeps_the_run(gpt2_dir, tmp_path,
                                                                                        offline):
    flags = sft_flags(gpt2_dir, tmp_path, report_to="wandb")
    train_in_process(write_run_dir(tmp_path / "run", **flags))
    run_id = json.loads((tmp_path / "run" / RUN_IDS).read_text())["wandb"]
    (log,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")  # offline: no key
    config, history = wandb_contents(log)
    assert config["optim"]["lr"] == 5e-3 and config["model"]["model"] == str(gpt2_dir)
    assert config["launch"]["output"] == str(tmp_path / "run")
    want = jsonl_scalars(tmp_path / "run")
    assert {name: history[name] for name in want} == want

    resumed = rewind(tmp_path / "run", tmp_path / "resumed", step=3)
    train_in_process(write_run_dir(resumed, resume="auto", **flags))
    assert json.loads((resumed / RUN_IDS).read_text())["wandb"] == run_id
    logs = sorted((resumed / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 2  # the first attempt's and the resume's, one W&B run id (`wandb sync` joins them)
    resumed_history = wandb_contents(logs[-1])[1]
    assert resumed_history["loss"] == [pair for pair in want["loss"] if pair[0] > 3]


TRACKIO_SCRIPT = """
import json, sys
from pathlib import Path
from dialogtrain.train.trackers import TrackedRun, TrackioTracker
from trackio.sqlite_storage import SQLiteStorage
folder = Path(sys.argv[1])
first = TrackioTracker(TrackedRun("support-v1", folder, {"optim": {"lr": 0.005}}, resumed_at=0))
for step in (1, 2, 3):
    first.log({"loss": 2.0 / step, "lr": 0.005}, step)
first.close()
again = TrackioTracker(TrackedRun("support-v1", folder, {"optim": {"lr": 0.005}}, resumed_at=3))
again.log({"loss": 0.5, "lr": 0.004}, 4)
again.close()
runs = SQLiteStorage.get_runs("dialogtrain")
logs = SQLiteStorage.get_logs("dialogtrain", "support-v1")
print("result:", json.dumps({"runs": runs, "logs": [[log["step"], log["loss"]] for log in logs],
                  "config": SQLiteStorage.get_run_config("dialogtrain", "support-v1")}))
"""


@needs("trackio")
def test_trackio_logs_locally_and_a_resume_continues_the_run_of_the_same_name(tmp_path):
    """In a process of its own: trackio reads TRACKIO_DIR once, at import."""
    done = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    (out,) = [json.loads(line[len("result:"):]) for line in done.stdout.splitlines() if line.startswith("result:")]
    assert out["runs"] == ["support-v1"]
    assert out["logs"] == [[1, 2.0], [2, 1.0], [3, 2.0 / 3], [4, 0.5]]
    assert out["config"]["optim"] == {"lr": 0.005}
    assert (tmp_path / "trackio" / "dialogtrain.db").is_file()


def test_a_missing_tracker_package_is_refused_at_launch_naming_it(monkeypatch, gpt2_dir, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setattr("launcher.cli.launch", lambda *a, **k: pytest.fail("a worker would start"))
    data = write_pairs_csv(tmp_path / "pairs.csv")
    result = CliRunner().invoke(cli, ["sft", "--model", str(gpt2_dir), "--data", str(data), "--gpus", "cpu",
                                      "--output", str(tmp_path / "run"), "--report-to", "tensorboard,wandb"])
    assert result.exit_code == 2, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert "--report-to wandb: the wandb package is not installed; pip install 'dialogtrain[wandb]'" in lines
    assert not any("tensorboard" in line for line in lines[1:])  # installed: not named
    assert not (tmp_path / "run").exists()


def test_report_to_takes_none_or_known_trackers_and_may_change_on_resume():
    def problems(**values):
        try:
            RunOptions.from_flat("sft", {"model": "m", "data": "d", "output": "o", **values})
        except Exception as err:
            return err.problems
        return []

    assert problems(report_to="none") == problems(report_to="tensorboard, wandb") == []
    assert problems(report_to="tensorbord") == ["--report-to tensorbord: give none or a comma list of "
                                                f"{', '.join(TRACKERS)} (tensorbord is not one)"]
    assert problems(report_to="none,wandb") == ["--report-to none,wandb: give none or a comma list of "
                                                f"{', '.join(TRACKERS)} (none is not one)"]
    assert problems(run_name=" ") == ["--run-name must not be empty"]
    plain = RunOptions.from_flat("sft", {"model": "m", "data": "d", "output": "o"})
    tracked = RunOptions.from_flat("sft", {"model": "m", "data": "d", "output": "o", "report_to": "wandb",
                                           "run_name": "x"})
    assert training_options(plain) == training_options(tracked)  # a resume may add or drop trackers


@needs("tensorboard")
def test_a_tracker_failing_mid_run_costs_one_warning_and_the_run_goes_on(gpt2_dir, tmp_path, monkeypatch, capfd):
    tensorboard = TRACKERS["tensorboard"]
    real_log = tensorboard.log

    def log(self, metrics, step):
        if step >= 3:
            raise OSError(28, "No space left on device")
        real_log(self, metrics, step)

    monkeypatch.setattr(tensorboard, "log", log)
    run_dir = tmp_path / "run"
    train_in_process(write_run_dir(run_dir, **sft_flags(gpt2_dir, tmp_path, report_to="tensorboard", max_steps=5,
                                                        save_every=0)))
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --report-to tensorboard failed at step 3 ([Errno 28] No space left on device); "
                        "training goes on without it, metrics.jsonl has every record"]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert [step for step, _ in tensorboard_scalars(run_dir / "tensorboard")["loss"]] == [1, 2]


def test_a_tracker_that_cannot_open_is_left_out_with_one_warning(monkeypatch, tmp_path, capfd):
    class Unreachable:
        PACKAGE = "nothing"

        def __init__(self, run):
            raise ConnectionError("server gone")

    class Recorder:
        PACKAGE, where, logged = "nothing", "memory", []

        def __init__(self, run):
            self.run_id = f"id-of-{run.name}"

        def log(self, metrics, step):
            self.logged.append((step, metrics))

        def close(self):
            pass

    monkeypatch.setitem(TRACKERS, "mlflow", Unreachable)
    monkeypatch.setitem(TRACKERS, "wandb", Recorder)
    options = RunOptions.from_flat("sft", {"model": "m", "data": "d", "output": str(tmp_path),
                                           "report_to": "mlflow,wandb"})
    trackers = open_trackers(options, tmp_path, resumed_at=0)
    assert capfd.readouterr().err.strip() == ("warning: --report-to mlflow: could not open (server gone); training "
                                              "goes on without it, metrics.jsonl has every record")
    trackers.log({"step": 4, "loss": 1.5, "grad_norm": float("inf"), "skipped": True, "epoch": 0})
    trackers.close()
    assert Recorder.logged == [(4, {"loss": 1.5, "epoch": 0})]  # finite numbers only, step apart
    assert json.loads((tmp_path / RUN_IDS).read_text()) == {"wandb": f"id-of-{tmp_path.name}"}
    assert isinstance(trackers, Trackers) and trackers.opened == {}
