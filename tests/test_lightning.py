"""LightningWatch in real Lightning fits: steps, loggers, files, resume, accumulation, DDP.

One watched fit (TensorBoard, CSV and offline W&B loggers) and one plain fit are shared by
several tests; the kill and the DDP run each launch real processes once.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lawwatch import MeasureConfig, WatchConfig, measure, read_history
from lawwatch.integrations.lightning import LightningWatch, lightning_callback
from lawwatch.watch.schedule import planned
from tests.helpers.lightning_fit import TinyLM, fit, pl_tiny_lm
from tests.helpers.models import ragged_probe
from tests.helpers.trackers import expected_scalars, read_events
from tests.helpers.wandb_offline import history_rows, inspect_run, offline_environment
from tests.helpers.workers.launch import run, torchrun

pytestmark = pytest.mark.slow

WORKER = [sys.executable, "-m", "tests.helpers.workers.lightning_worker"]


def scheduled(every: int, last: int) -> list[int]:
    """Step 0, the steps the schedule names, and the last step."""
    schedule = planned(WatchConfig(every=every, max_overhead=None, last_step=last))
    return sorted({0, last} | {s for s in range(1, last + 1) if schedule(s)})


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    """A watched fit of 6 steps with three loggers, and the same fit without lawwatch."""
    import wandb

    root = tmp_path_factory.mktemp("lightning")
    with pytest.MonkeyPatch.context() as monkeypatch:
        runs = offline_environment(root / "wandb-home", monkeypatch)
        monkeypatch.chdir(root)  # MLflow's default artifact root is ./mlruns
        loggers = [
            pl.loggers.TensorBoardLogger(root, name="tb"),
            pl.loggers.CSVLogger(root, name="csv"),
            pl.loggers.WandbLogger(save_dir=runs),
            pl.loggers.MLFlowLogger(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"),
        ]
        watch = LightningWatch(ragged_probe(), every=2, max_overhead=None)
        watched = fit(root / "watched", [watch], loggers, max_steps=6)
        run_dir = Path(loggers[2].experiment.settings.sync_dir)
        wandb.finish()
        wandb.teardown()
    plain = fit(root / "plain", [], max_steps=6)
    return {
        "watch": watch,
        "loggers": loggers,
        "watched": watched,
        "plain": plain,
        "wandb": run_dir,
    }


def test_fit_measures_the_schedule_at_optimizer_steps(fits):
    watch = fits["watch"]
    assert watch.monitor.history.steps == scheduled(every=2, last=6)
    # <trainer.log_dir>/lawwatch: the first logger's version directory
    assert (
        watch.directory == fits["loggers"][0].log_dir + "/lawwatch"
        or str(watch.directory) == str(fits["loggers"][0].log_dir) + "/lawwatch"
    )
    on_disk = read_history(watch.directory)
    assert on_disk.records == watch.monitor.history.records
    assert (watch.directory / "law.png").is_file()
    assert (watch.directory / "probe.safetensors").is_file()


def test_training_is_bit_identical_with_and_without_the_callback(fits):
    watched, plain = fits["watched"].losses, fits["plain"].losses
    assert len(watched) == 6
    assert watched == plain  # every step's loss, to the bit (dropout on)


def test_every_logger_gets_the_law(fits):
    records = fits["watch"].monitor.history.records
    steps = [r["step"] for r in records]
    expected = expected_scalars(records)
    tensorboard, csv_logger, _, mlflow_logger = fits["loggers"]

    events = read_events(tensorboard.log_dir)
    assert "train_loss" in events.Tags()["scalars"]  # Lightning's own curves, same run
    for key, _ in expected[0].items():
        points = events.Scalars(key)
        assert [p.step for p in points] == steps
        for p in points:  # TensorBoard stores float32
            assert p.value == pytest.approx(expected[p.step][key], rel=1e-6, abs=1e-6)

    with open(f"{csv_logger.log_dir}/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("lawwatch/rho")]
    assert [int(row["step"]) for row in rows] == steps
    for row in rows:
        for key, value in expected[int(row["step"])].items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12, abs=1e-12)

    client = mlflow_logger.experiment
    held = client.get_metric_history(mlflow_logger.run_id, "lawwatch/rho")
    assert sorted(m.step for m in held) == steps  # the logger's own run
    for metric in held:
        assert metric.value == pytest.approx(expected[metric.step]["lawwatch/rho"], rel=1e-12)
    assert client.get_metric_history(mlflow_logger.run_id, "train_loss")  # Lightning's own

    rows = [r for r in history_rows(inspect_run(fits["wandb"])) if "lawwatch/rho" in r]
    assert [row["trainer/global_step"] for row in rows] == steps  # the loss's x-axis
    for row in rows:
        assert row["lawwatch/rho"] == pytest.approx(expected[row["lawwatch/step"]]["lawwatch/rho"])


def test_accumulation_and_epochs_measure_optimizer_steps_and_the_last(tmp_path):
    # 10 batches, 2 a step: 5 optimizer steps in one epoch, no max_steps
    watch = LightningWatch(ragged_probe(), every=3, max_overhead=None)
    module = fit(tmp_path, [watch], rows=40, max_epochs=1, accumulate_grad_batches=2)
    assert len(module.losses) == 10
    assert watch.monitor.watch.last_step == 5  # Lightning's estimate of the fit's steps
    assert watch.monitor.history.steps == scheduled(every=3, last=5)
    assert read_history(tmp_path / "lawwatch").steps == scheduled(every=3, last=5)


def test_a_validation_only_run_is_measured_once_at_the_models_step(tmp_path):
    from tests.helpers.lightning_fit import batches, trainer

    watch = LightningWatch(ragged_probe(), every=1, max_overhead=None)
    trainer(tmp_path, [watch]).validate(TinyLM(), batches(8))
    assert watch.monitor.history.steps == [0]
    assert read_history(tmp_path / "lawwatch").steps == [0]
    assert (tmp_path / "lawwatch" / "law.png").is_file()


def test_pytorch_lightning_import_path(tmp_path):
    import pytorch_lightning

    from lawwatch.integrations.pytorch_lightning import LightningWatch as PLWatch

    assert issubclass(PLWatch, pytorch_lightning.Callback)
    assert issubclass(LightningWatch, pl.Callback)
    assert lightning_callback("pytorch_lightning") is PLWatch
    watch = PLWatch(ragged_probe(), every=1, max_overhead=None)
    trainer = pytorch_lightning.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        max_steps=2,
        callbacks=[watch],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    from tests.helpers.lightning_fit import batches

    trainer.fit(pl_tiny_lm(), batches(16))
    assert watch.monitor.history.steps == [0, 1, 2]


class OwnBlocks(pl.LightningModule):
    """Blocks defined in the module itself, under names lawwatch cannot guess."""

    def __init__(self) -> None:
        super().__init__()
        gpt = TinyLM().model.transformer
        self.embed, self.layers, self.last = gpt.wte, gpt.h, gpt.ln_f
        self.unembed = torch.nn.Linear(16, 97, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            out = layer(x)
            x = out[0] if isinstance(out, tuple) else out
        return self.unembed(self.last(x))

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        logits = self(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_blocks_not_found_are_explained_and_training_goes_on(tmp_path, caplog):
    from tests.helpers.lightning_fit import batches, trainer

    watch = LightningWatch(ragged_probe(), every=1, max_overhead=None)
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        trainer(tmp_path, [watch], max_steps=2).fit(OwnBlocks(), batches(8))
    assert "blocks=" in caplog.text and "final_norm=" in caplog.text
    named = LightningWatch(
        ragged_probe(), every=1, max_overhead=None, blocks="layers", final_norm="last"
    )
    trainer(tmp_path / "named", [named], max_steps=2).fit(OwnBlocks(), batches(8))
    assert named.monitor.history.steps == [0, 1, 2]


def test_resume_after_a_kill_continues_one_history(tmp_path):
    run([*WORKER, str(tmp_path), "kill"], fails=True)
    killed = read_history(tmp_path / "lightning_logs" / "version_0" / "lawwatch")
    assert killed.steps == [0, 1, 2, 4, 6]  # step 6 measured after checkpoint 4, then killed
    run([*WORKER, str(tmp_path), "resume"])
    resumed = read_history(tmp_path / "lightning_logs" / "version_1" / "lawwatch")
    assert resumed.steps == scheduled(every=2, last=8)  # nothing twice, nothing lost
    assert resumed.records[:4] == killed.records[:4]  # up to the checkpoint: the same records
    # the resumed fit's TensorBoard run holds the whole history too (replayed, then measured)
    events = read_events(tmp_path / "lightning_logs" / "version_1")
    assert [p.step for p in events.Scalars("lawwatch/rho")] == resumed.steps
    # background: step 8 was pending when its checkpoint was saved, and is in it
    state = torch.load(tmp_path / "checkpoints" / "step=8.ckpt", weights_only=False)
    assert [r["step"] for r in state["callbacks"]["LightningWatch"]["history"]] == resumed.steps


def test_ddp_on_two_processes_equals_one_and_keeps_training_bit_identical(tmp_path):
    run([*torchrun(2), "-m", "tests.helpers.workers.lightning_worker", str(tmp_path), "ddp"])
    for rank in (0, 1):
        losses = json.loads((tmp_path / f"losses-{rank}.json").read_text())
        assert len(losses["watched"]) == 4
        assert losses["watched"] == losses["plain"]
    history = read_history(tmp_path / "watched" / "lawwatch")
    assert history.steps == scheduled(every=2, last=4)
    assert not list((tmp_path / "plain").glob("**/history.jsonl"))
    # the sharded probe's records equal one process measuring the same weights
    config = MeasureConfig()
    start = measure(TinyLM().model.double(), ragged_probe(), config)
    final = TinyLM().model.double()
    final.load_state_dict(torch.load(tmp_path / "final.pt"))
    end = measure(final, ragged_probe(), config)
    for record, snapshot in [(history.records[0], start), (history.records[-1], end)]:
        assert torch.allclose(
            torch.tensor(record["pr"], dtype=torch.float64),
            torch.as_tensor(snapshot.pr, dtype=torch.float64),
            rtol=0,
            atol=1e-9,
        )


# -- Lightning Fabric: the recipe's loop ----------------------------------------------------------

FABRIC = ["--n-layer", "3", "--n-embd", "16", "--n-head", "2", "--seq-len", "32"]
FABRIC += ["--batch-size", "4", "--every", "2", "--ckpt-every", "4", "--log-every", "2"]
FABRIC += ["--max-overhead", "none"]  # every scheduled step, whatever the machine's speed


def fabric_csv_steps(out: Path) -> list[int]:
    """The steps of the lawwatch rows the Fabric's CSVLogger wrote."""
    with open(out / "csv" / "version_0" / "metrics.csv") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("lawwatch/rho")]


@pytest.fixture(scope="module")
def fabric_one(tmp_path_factory):
    """The Fabric recipe on one process: 6 steps, then resumed from its checkpoint to 10."""
    from tests.helpers.recipes import recipe

    main = recipe("pretrain_fabric").main
    out = tmp_path_factory.mktemp("fabric") / "out"
    main(["--out", str(out), "--steps", "6", *FABRIC])
    first = read_history(out / "lawwatch").records
    first_csv = fabric_csv_steps(out)
    main(["--out", str(out), "--steps", "10", "--resume", *FABRIC])
    return out, first, first_csv


def test_fabric_recipe_records_and_resumes_one_history(fabric_one):
    out, first, first_csv = fabric_one
    assert [r["step"] for r in first] == scheduled(every=2, last=6)
    assert first_csv == [r["step"] for r in first]  # fabric.loggers got every snapshot
    history = read_history(out / "lawwatch")
    assert history.steps == scheduled(every=2, last=10)  # fabric.load restored the watch
    assert history.records[: len(first)] == first
    # the resumed run's CSV file is new: the restored history is replayed into it
    assert fabric_csv_steps(out) == history.steps
    assert (out / "lawwatch" / "law.png").is_file()
    state = torch.load(out / "ckpt.pt", weights_only=False)
    assert [r["step"] for r in state["lawwatch"]["history"]] == history.steps


def test_fabric_recipe_on_two_processes(fabric_one, tmp_path):
    out = tmp_path / "out"
    recipe = ["recipes/pretrain_fabric.py", "--out", str(out), "--devices", "2"]
    run([*torchrun(2), *recipe, "--steps", "4", *FABRIC])
    history = read_history(out / "lawwatch")
    assert history.steps == scheduled(every=2, last=4)
    assert fabric_csv_steps(out) == history.steps  # one writer: rank 0's loggers
    # step 0: the same initial weights as one process, the probe sharded over two; the model
    # is float32, whose batch shapes alone move PR by a few 1e-9
    one = fabric_one[1][0]
    assert history.records[0]["pr"] == pytest.approx(one["pr"], rel=0, abs=1e-7)
