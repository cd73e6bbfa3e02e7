"""Every report_to tracker in a real Trainer, read back with the tracker's own reader.

TensorBoard event files through tensorboard's EventAccumulator, MLflow's local store through
MlflowClient, trackio's project database through its SQLiteStorage, Comet's offline archive,
DVCLive's metric files. The Trainer's own reporting callback makes each run; lawwatch must log
into that run (no second one), under the keys of ``lawwatch.output.sinks.scalars``, at the
training step.
"""

import json
import logging
import math
import uuid
import zipfile
from pathlib import Path

import pytest
from transformers import Trainer, TrainingArguments

from lawwatch.integrations.hf import LawWatchCallback
from lawwatch.output.sinks import layer_key
from lawwatch.output.store import read_history
from lawwatch.output.trackers import TRACKERS, MlflowSink, open_trackers, reported_trackers
from tests.helpers.models import ragged_probe, tiny_gpt2
from tests.helpers.trackers import STEPS, accelerate_loop, expected_scalars, read_events
from tests.helpers.trainer import PNG_MAGIC, Tokens

pytestmark = pytest.mark.slow


def train(out, report_to, callback=None, **args):
    callback = callback or LawWatchCallback(ragged_probe(), max_overhead=None, every=2)
    arguments = TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=list(report_to),
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **args,
    )
    trainer = Trainer(
        model=tiny_gpt2(0), args=arguments, train_dataset=Tokens(), callbacks=[callback]
    )
    trainer.train()
    records = read_history(out / "lawwatch").records
    assert [r["step"] for r in records] == STEPS
    return callback, records


# -- choosing trackers --------------------------------------------------------------------------


def test_report_to_names():
    from transformers.integrations import get_available_reporting_integrations

    assert reported_trackers(None) == [] and reported_trackers("none") == []
    assert reported_trackers(["none"]) == [] and reported_trackers([]) == []
    assert reported_trackers("tensorboard") == ["tensorboard"]
    assert reported_trackers(["mlflow", "wandb"]) == ["mlflow", "wandb"]
    assert reported_trackers("all") == get_available_reporting_integrations()
    assert {"tensorboard", "mlflow", "wandb"} <= set(TRACKERS)
    assert open_trackers(["codecarbon"], strict=False) == {}  # a tracker lawwatch has no sink for


# -- TensorBoard --------------------------------------------------------------------------------


def test_tensorboard_holds_the_law(tmp_path):
    callback, records = train(tmp_path / "out", ["tensorboard"])
    runs = list((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 1  # the Trainer's writer, no second one
    events = read_events(runs[0])
    tags = events.Tags()
    assert "train/loss" in tags["scalars"]  # the Trainer's own curves, in the same run

    expected = expected_scalars(records)
    keys = set(expected[0])
    assert {layer_key(i, 5) for i in range(5)} | {"lawwatch/rho", "lawwatch/pearson_r"} <= keys
    assert keys <= set(tags["scalars"])
    for key in keys:
        points = events.Scalars(key)
        assert [p.step for p in points] == STEPS, key
        # TensorBoard keeps float32
        assert [p.value for p in points] == pytest.approx(
            [expected[s][key] for s in STEPS], rel=1e-6, abs=1e-6
        )

    # the PR table as text, one per snapshot
    texts = events.Tensors("lawwatch/pr_table/text_summary")
    assert [t.step for t in texts] == STEPS
    last = texts[-1].tensor_proto.string_val[0].decode()
    assert last.startswith("step 4") and last.count("\n| ") == 6  # header + 5 layers
    assert f"| 3 | {records[-1]['pr'][3]:.6f} |" in last

    # the report PNG as an image at the last step; the custom-scalars layout
    images = events.Images("lawwatch/report")
    assert [i.step for i in images] == [4] and images[0].encoded_image_string[:8] == PNG_MAGIC
    assert callback.trackers["tensorboard"].writer.file_writer is None  # closed at the end
    layout = events.Tensors("custom_scalars__config__")
    assert layout and b"lawwatch/pr/layer_" in layout[0].tensor_proto.string_val[0]


# -- MLflow -------------------------------------------------------------------------------------


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A local MLflow store (SQLite; artifacts under tmp_path), the current tracking URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the default artifact root is ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run() is not None:
        mlflow.end_run()


def test_mlflow_holds_the_law(tmp_path, mlflow_store):
    from mlflow import MlflowClient

    callback, records = train(tmp_path / "out", ["mlflow"])
    client = MlflowClient(tracking_uri=mlflow_store)
    runs = client.search_runs(experiment_ids=["0"])
    assert len(runs) == 1  # the Trainer's run, no second one
    run_id = runs[0].info.run_id
    assert callback.trackers["mlflow"].run_id == run_id
    assert client.get_metric_history(run_id, "loss")  # the Trainer's own metrics

    expected = expected_scalars(records)
    for key in expected[0]:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == STEPS, key
        for m in history:
            assert m.value == pytest.approx(expected[m.step][key], rel=1e-12), key

    local = tmp_path / "download"
    table = json.loads(
        Path(client.download_artifacts(run_id, "lawwatch/pr_table.json", str(local))).read_text()
    )
    assert table["columns"] == ["step", "layer", "pr", "log10_pr"]
    assert [tuple(row[:2]) for row in table["data"]] == [(s, e) for s in STEPS for e in range(5)]
    # the table's JSON holds 10 significant digits
    assert [row[2] for row in table["data"]] == pytest.approx(
        [p for r in records for p in r["pr"]], rel=1e-9
    )
    names = sorted(a.path for a in client.list_artifacts(run_id, "lawwatch"))
    assert names == [
        "lawwatch/history.jsonl",
        "lawwatch/law.png",
        "lawwatch/pr.safetensors",
        "lawwatch/pr_table.json",
    ]
    png = client.download_artifacts(run_id, "lawwatch/law.png", str(local))
    assert Path(png).read_bytes()[:8] == PNG_MAGIC


# -- trackio ------------------------------------------------------------------------------------


def test_trackio_holds_the_law(tmp_path):
    from trackio.sqlite_storage import SQLiteStorage

    project = f"lawwatch-{uuid.uuid4().hex[:8]}"
    _, records = train(tmp_path / "out", ["trackio"], project=project, run_name="run")
    rows = SQLiteStorage.get_logs(project, "run")
    ours = [row for row in rows if "lawwatch/rho" in row]
    assert [row["train/global_step"] for row in ours] == STEPS
    assert any("train/loss" in row for row in rows)  # the Trainer's run
    expected = expected_scalars(records)
    for row in ours:
        for key, value in expected[row["train/global_step"]].items():
            assert row[key] == pytest.approx(value, rel=1e-12), key
    table = ours[-1]["lawwatch/pr_table"]
    assert table["_type"] == "trackio.table"
    assert len(table["_value"]) == len(STEPS) * 5
    reports = [row for row in rows if "lawwatch/report" in row]
    assert len(reports) == 1 and reports[0]["train/global_step"] == 4


# -- Comet (offline) ----------------------------------------------------------------------------


def test_comet_offline_holds_the_law(tmp_path, monkeypatch):
    import comet_ml

    monkeypatch.setenv("COMET_START_ONLINE", "false")
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "comet"))
    monkeypatch.setenv("COMET_AUTO_LOG_ENV_DETAILS", "false")
    monkeypatch.setenv("COMET_AUTO_LOG_CODE", "false")
    _, records = train(tmp_path / "out", ["comet_ml"])
    experiment = comet_ml.get_running_experiment()
    experiment.end()
    (archive,) = (tmp_path / "comet").glob("*.zip")
    with zipfile.ZipFile(archive) as z:
        messages = [json.loads(line) for line in z.read("messages.json").splitlines()]
    metrics = [m["payload"]["metric"] for m in messages if m["type"] == "metric_msg"]
    expected = expected_scalars(records)
    for key in expected[0]:
        logged = [(m["step"], m["metricValue"]) for m in metrics if m["metricName"] == key]
        assert [s for s, _ in logged] == STEPS, key
        assert [float(v) for _, v in logged] == pytest.approx(
            [expected[s][key] for s in STEPS], rel=1e-12
        )
    assert any(m["metricName"] == "train/loss" for m in metrics)
    uploads = [m["payload"] for m in messages if m["type"] == "file_upload"]
    files = {
        (
            u["upload_type"],
            u["additional_params"].get("fileName") or u["additional_params"].get("figName"),
        )
        for u in uploads
        if u["additional_params"].get("step") == 4
    }
    assert files == {
        ("asset", "lawwatch_pr_table.csv"),
        ("visualization", "lawwatch/report"),
        ("asset", "lawwatch_history.jsonl"),
        ("asset", "lawwatch_pr.safetensors"),
    }


# -- DVCLive ------------------------------------------------------------------------------------


def test_dvclive_holds_the_law(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dvclive writes ./dvclive
    _, records = train(tmp_path / "out", ["dvclive"])
    metrics = tmp_path / "dvclive" / "plots" / "metrics"
    expected = expected_scalars(records)
    for key in expected[0]:
        lines = (metrics / f"{key}.tsv").read_text().splitlines()
        header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
        values = [dict(zip(header, row, strict=True)) for row in rows]
        assert [int(v["step"]) for v in values] == STEPS, key
        name = key.rsplit("/", 1)[-1]
        assert [float(v[name]) for v in values] == pytest.approx(
            [expected[s][key] for s in STEPS], rel=1e-12
        )
    assert (metrics / "train" / "loss.tsv").exists() or any(metrics.rglob("loss.tsv"))
    assert (tmp_path / "dvclive" / "plots" / "images" / "lawwatch" / "law.png").exists()
    summary = json.loads((tmp_path / "dvclive" / "metrics.json").read_text())
    assert summary["lawwatch"]["pearson_r"] == pytest.approx(records[-1]["pearson_r"], rel=1e-12)


# -- several trackers at once, one failing --------------------------------------------------------


def test_a_tracker_that_fails_to_open_costs_only_itself(
    tmp_path, mlflow_store, monkeypatch, caplog
):
    def broken(cls, run):
        raise RuntimeError("tracker server gone")

    monkeypatch.setattr(MlflowSink, "current", classmethod(broken))
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        callback, records = train(tmp_path / "out", ["mlflow", "tensorboard"])
    assert "not logging to mlflow" in caplog.text and "tracker server gone" in caplog.text
    assert sorted(callback.trackers) == ["tensorboard"]
    (run,) = (tmp_path / "out" / "runs").iterdir()
    steps = [p.step for p in read_events(run).Scalars("lawwatch/pearson_r")]
    assert steps == STEPS
    assert math.isfinite(records[-1]["pearson_r"])


# -- accelerate custom loops --------------------------------------------------------------------


def test_accelerate_loop_logs_to_every_tracker(tmp_path, mlflow_store, offline_wandb, caplog):
    import torch
    from accelerate import Accelerator
    from mlflow import MlflowClient

    from lawwatch.alerts import Alerts
    from lawwatch.integrations.accelerate import AcceleratorWatch
    from tests.helpers.wandb_offline import history_rows, inspect_run

    accelerator = Accelerator(
        cpu=True, log_with=["tensorboard", "mlflow", "wandb"], project_dir=str(tmp_path / "acc")
    )
    accelerator.init_trackers("lawwatch-accelerate")
    model = tiny_gpt2(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    # threshold 1: every r counts as emerged, so the emergence alert fires at step 0
    watch = AcceleratorWatch(
        accelerator,
        model,
        ragged_probe(),
        max_overhead=None,
        every=2,
        last_step=4,
        directory=tmp_path / "lawwatch",
        alerts=Alerts(threshold=1.0, stalled=False),
    )
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        accelerate_loop(accelerator, model, optimizer, watch)
    run_dir = accelerator.get_tracker("wandb", unwrap=True).settings.sync_dir
    accelerator.end_training()
    records = read_history(tmp_path / "lawwatch").records
    assert [r["step"] for r in records] == STEPS
    expected = expected_scalars(records)
    assert "lawwatch: the law emerged (step 0)" in caplog.text
    # the vital signs are among the keys every tracker holds (docs/dashboard.md)
    assert any(key.startswith("lawwatch/health/") for key in expected[0])

    # TensorBoard: the tracker's own directory
    events = read_events(tmp_path / "acc" / "lawwatch-accelerate")
    for key in expected[0]:
        points = events.Scalars(key)
        assert [p.step for p in points] == STEPS
        assert [p.value for p in points] == pytest.approx(
            [expected[s][key] for s in STEPS], rel=1e-6, abs=1e-6
        )
    assert [p.step for p in events.Scalars("train/loss")] == [1, 2, 3, 4]

    # MLflow: one run, the loop's loss and the law in it
    client = MlflowClient(tracking_uri=mlflow_store)
    (run,) = client.search_runs(
        experiment_ids=[e.experiment_id for e in client.search_experiments()]
    )
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    for key in expected[0]:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == STEPS
        for m in history:
            assert m.value == pytest.approx(expected[m.step][key], rel=1e-12)

    # W&B (offline): the rows at the training step, and the alert
    logged = inspect_run(run_dir)
    rows = [row for row in history_rows(logged) if "lawwatch/rho" in row]
    assert [row["_step"] for row in rows] == STEPS
    for row in rows:
        for key, value in expected[row["_step"]].items():
            assert row[key] == pytest.approx(value, rel=1e-12)
    alerts = [r["alert"] for r in logged if r["type"] == "alert"]
    assert [a["title"] for a in alerts] == ["lawwatch: the law emerged"]


# -- alerts through the callback; resumed runs --------------------------------------------------


def test_callback_alerts_reach_the_trackers_that_have_them(tmp_path, offline_wandb, caplog):
    from trackio.sqlite_storage import SQLiteStorage

    from lawwatch.alerts import Alerts
    from tests.helpers.wandb_offline import finish_run, inspect_run

    project = f"lawwatch-{uuid.uuid4().hex[:8]}"
    # threshold 1: every r counts as emerged, so the emergence alert fires at step 0
    callback = LawWatchCallback(
        ragged_probe(), max_overhead=None, every=2, alerts=Alerts(threshold=1.0, stalled=False)
    )
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        train(
            tmp_path / "out",
            ["wandb", "trackio", "tensorboard"],
            callback,
            project=project,
            run_name="run",
        )
    run_dir = finish_run()
    assert caplog.text.count("lawwatch: the law emerged (step 0)") == 1
    alerts = [r["alert"] for r in inspect_run(run_dir) if r["type"] == "alert"]
    assert [(a["title"], a["level"]) for a in alerts] == [("lawwatch: the law emerged", "INFO")]
    stored = SQLiteStorage.get_alerts(project, run_name="run")
    assert [(a["title"], a["step"]) for a in stored] == [("lawwatch: the law emerged", 0)]
    assert sorted(callback.trackers) == ["tensorboard", "trackio", "wandb"]


def test_a_reattached_mlflow_run_gets_each_step_once(tmp_path, mlflow_store):
    import mlflow
    from mlflow import MlflowClient

    from lawwatch.output.trackers import MlflowSink
    from tests.helpers.snapshots import line, snap

    snaps = [snap(step, line(noise=0.01, seed=step)) for step in (0, 1, 2, 4)]
    run_id = mlflow.start_run().info.run_id
    first = MlflowSink(run_id, tracking_uri=mlflow_store)
    for s in snaps[:3]:
        first.write(s)
    mlflow.end_run()
    # the resumed training reattaches to the run, and replays the history up to its checkpoint
    second = MlflowSink(run_id, tracking_uri=mlflow_store, history=first.records[:2])
    assert second.logged_step == 2
    second.write(snaps[3])
    history = MlflowClient(tracking_uri=mlflow_store).get_metric_history(
        run_id, "lawwatch/pearson_r"
    )
    assert sorted(m.step for m in history) == STEPS
    assert [r["step"] for r in second.records] == [0, 1, 4]


def test_a_fresh_tensorboard_writer_gets_the_history_replayed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from lawwatch.output.trackers import TensorBoardSink
    from tests.helpers.snapshots import line, snap

    records = [snap(step, line(noise=0.01, seed=step)).to_record() for step in (0, 1, 2)]
    sink = TensorBoardSink(SummaryWriter(str(tmp_path / "tb")), history=records)
    sink.write(snap(4, line()))
    sink.close()
    points = read_events(tmp_path / "tb").Scalars("lawwatch/pearson_r")
    assert [p.step for p in points] == STEPS
    assert points[0].value == pytest.approx(records[0]["pearson_r"], rel=1e-6)


# -- ClearML (offline) --------------------------------------------------------------------------


def test_clearml_offline_holds_the_law(tmp_path, monkeypatch):
    from clearml import Task

    monkeypatch.setenv("CLEARML_OFFLINE_MODE", "1")
    monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml"))
    Task.set_offline(offline_mode=True)
    # the task made before the Trainer, as ClearML's callback allows: without the repository
    # detection, which under pytest waits out its 300 s timeout when the task closes
    task = Task.init(
        project_name="lawwatch-tests",
        task_name="trackers",
        auto_connect_frameworks={"detect_repository": False},
        auto_resource_monitoring=False,
        auto_connect_streams=False,
    )
    task_id = task.id
    try:
        callback, records = train(tmp_path / "out", ["clearml"])
        assert callback.trackers["clearml"].task is task
    finally:
        task.close()  # (ClearML stays offline in this process: going online needs a server)
    (session,) = (tmp_path / "clearml").rglob(f"{task_id}/metrics.jsonl")
    events = [e for line in session.read_text().splitlines() for e in json.loads(line)]
    scalars_ = [e for e in events if e["type"] == "training_stats_scalar"]
    expected = expected_scalars(records)
    for key in expected[0]:
        title, series = key.rsplit("/", 1)
        logged = [
            (e["iter"], e["value"])
            for e in scalars_
            if (e["metric"], e["variant"]) == (title, series)
        ]
        assert [s for s, _ in logged] == STEPS, key
        assert [v for _, v in logged] == pytest.approx([expected[s][key] for s in STEPS], rel=1e-12)
    assert any(e["metric"] == "train" and e["variant"] == "loss" for e in scalars_)
    plots = [e for e in events if e["type"] == "plot" and e["metric"] == "lawwatch/pr_table"]
    assert [e["iter"] for e in plots] == STEPS
    images = [e for e in events if e["type"] == "training_debug_image"]
    assert [(e["metric"], e["iter"]) for e in images] == [("lawwatch/report", 4)]


def test_a_raw_loop_names_its_wandb_step_and_the_law_shares_the_loss_axis(offline_wandb):
    """A script's loss logged against its own step key: lawwatch's rows carry that key, and
    W&B's lawwatch charts use it as their x-axis (defined step metric), so both line up."""
    import torch
    import wandb

    from lawwatch import LawWatch
    from tests.helpers.wandb_offline import finish_run, history_rows, inspect_run

    wandb.init(project="lawwatch-tests", dir=str(offline_wandb))
    wandb.define_metric("train/step")
    wandb.define_metric("loss", step_metric="train/step")
    model = tiny_gpt2(0)
    watch = LawWatch(
        model, ragged_probe(), trackers=["wandb"], every=2, max_overhead=None, step_key="train/step"
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(1, 5):
        loss = model(torch.arange(1, 9)[None], labels=torch.arange(1, 9)[None]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        wandb.log({"train/step": step, "loss": loss.item()})
        watch.maybe_snapshot(step)
    watch.close()
    records = inspect_run(finish_run())
    rows = history_rows(records)
    law = [r for r in rows if "lawwatch/rho" in r]
    assert [r["train/step"] for r in law] == watch.history.steps == [1, 2, 4]
    assert all(r["lawwatch/step"] == r["train/step"] for r in law)
    assert not any("train/global_step" in r for r in rows)  # the Trainer's key is not invented
    # W&B was told the axis: lawwatch/* against train/step, as the script's loss
    defined = [r["metric"] for r in records if r["type"] == "metric"]
    axis = {m.get("glob_name") or m["name"]: m.get("step_metric") for m in defined}
    assert axis["lawwatch/*"] == axis["loss"] == "train/step"


def test_step_key_is_refused_when_not_a_name(gpt2, probe):
    from lawwatch import LawWatch

    with pytest.raises(TypeError, match="step_key is the name of your loop's step"):
        LawWatch(gpt2, probe, step_key="")
    with pytest.raises(TypeError, match="step_key is the name of your loop's step"):
        LawWatchCallback(probe, step_key=3)
