"""Real W&B runs in offline mode, read back with `wandb leet inspect RUN_DIR --json`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def offline_environment(root: Path, monkeypatch) -> Path:
    """Set W&B's offline environment, every file of it under ``root``; returns the runs' dir.

    W&B reads its settings into a process-wide singleton on first use: it is torn down first,
    so the environment set here is the one W&B sees.
    """
    import wandb

    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "lawwatch-tests")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    for var, sub in [
        ("WANDB_DIR", "runs"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ]:
        (root / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(root / sub))
    return root / "runs"


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode, every file of it under tmp_path; never the network.

    Torn down after, too (see :func:`offline_environment`).
    """
    import wandb

    yield offline_environment(tmp_path / "wandb-home", monkeypatch)
    wandb.finish()
    wandb.teardown()


def finish_run() -> Path:
    """Finish the run the Trainer's WandbCallback left open; return its directory."""
    import wandb

    run_dir = Path(wandb.run.settings.sync_dir)
    wandb.finish()
    return run_dir


def inspect_run(run_dir: Path) -> list[dict]:
    """Every record of an offline run, as `wandb leet inspect RUN_DIR --json` prints them."""
    wandb_cli = Path(sys.executable).parent / "wandb"
    out = subprocess.run(
        [str(wandb_cli), "leet", "inspect", str(run_dir), "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def history_rows(records: list[dict]) -> list[dict]:
    return [r["history"]["item"] for r in records if r["type"] == "history"]


def final_summary(records: list[dict]) -> dict:
    summary: dict = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    return summary


def lawwatch_steps(rows: list[dict]) -> list[int]:
    return [row["train/global_step"] for row in rows if "lawwatch/rho" in row]


def table_files(run_dir: Path, key: str) -> list[Path]:
    """The files a table was logged to (``<key>_<step>_<hash>.table.json``), in logging order."""
    files = (Path(run_dir) / "files" / "media" / "table").glob(f"{key}_*.table.json")
    return sorted(files, key=lambda p: int(p.name[len(Path(key).name) + 1 :].split("_")[0]))


def table_rows(run_dir: Path, key: str) -> list[list]:
    """The rows of an incrementally logged table (every increment, in logging order)."""
    return [row for f in table_files(run_dir, key) for row in json.loads(f.read_text())["data"]]
