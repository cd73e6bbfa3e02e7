"""The embedded default, run tiny through the CLI; its config, data packing and W&B mode."""

import logging
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from lawwatch.cli import field_docs, main
from lawwatch.demo import DemoConfig, pack, wandb_mode
from lawwatch.history import History
from tests.wandb_offline import final_summary, history_rows, inspect_run, lawwatch_steps

TINY = {
    "source": "topics",
    "steps": 6,
    "every": 4,
    "vocab-size": 300,
    "n-layer": 3,
    "n-embd": 32,
    "n-head": 2,
    "n-positions": 64,
    "seq-len": 64,
    "batch-size": 4,
    "warmup-steps": 2,
    "probe-texts": 8,
    "probe-length": 64,
    "threads": 1,
    "wandb": "offline",
}


@pytest.mark.slow
def test_tiny_demo_through_the_cli(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ)
    for var in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp_path / var.lower())
    env["COLUMNS"] = "200"
    args = [f"--{k}={v}" for k, v in TINY.items()]
    done = subprocess.run(
        [sys.executable, "-m", "lawwatch.cli", "demo", f"--out={out}", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout

    records = History.read(out / "lawwatch").records
    assert [r["step"] for r in records] == [0, 1, 2, 4, 6]
    # the live table, then the summary: where everything is, and the verdict on the law
    for r in records:
        r_text = re.escape(f"{r['pearson_r']:+.4f}")
        assert re.search(rf"│\s+{r['step']} │.*│ {r_text} │", text), r["step"]
    assert f"history  {out / 'lawwatch' / 'history.jsonl'}" in text
    assert f"plot  {out / 'lawwatch' / 'law.png'}" in text
    assert (out / "lawwatch" / "law.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "lawwatch" / "pr.safetensors").exists()
    assert (out / "lawwatch" / "probe.safetensors").exists()
    run_dir = Path(re.search(r"browse  \S+ leet (\S+)", text).group(1))
    assert run_dir.parent == out / "wandb" and run_dir.name.startswith("offline-run-")
    assert f"step 6: r = {records[-1]['pearson_r']:+.4f}" in text

    wandb_records = inspect_run(run_dir)
    assert lawwatch_steps(history_rows(wandb_records)) == [0, 1, 2, 4, 6]
    emerged = final_summary(wandb_records)["lawwatch/emergence_step"]
    if emerged is None:
        assert "The law did not emerge" in text
    else:
        assert f"The law emerged at step {emerged}" in text


@pytest.mark.slow
def test_default_demo_shows_the_law_emerge(tmp_path):
    """The README's promise, with every default: no law at initialization (r above -0.5), the
    law at the end (r at or below -0.95). About 4.5 minutes on 2 cores."""
    from lawwatch.demo import run_demo

    result = run_demo(DemoConfig(out=str(tmp_path / "demo"), wandb="disabled"))
    first, last = result.records[0], result.records[-1]
    assert first["step"] == 0 and last["step"] == DemoConfig.steps
    assert first["pearson_r"] > -0.5, first
    assert last["pearson_r"] <= -0.95, last
    assert result.emergence_step is not None and result.report is not None


def test_every_knob_is_documented_and_on_the_command_line(capsys):
    docs = field_docs(DemoConfig)
    assert set(docs) == {f.name for f in fields(DemoConfig)}
    assert all(len(doc) > 10 for doc in docs.values())
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = capsys.readouterr().out
    for f in fields(DemoConfig):
        assert "--" + f.name.replace("_", "-") in help_text


def test_bad_config_is_refused_before_training(capsys):
    assert main(["demo", "--n-head", "3"]) == 2
    assert "n_head=3 must divide n_embd=128" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seq_len=256 exceeds n_positions=128"):
        DemoConfig(seq_len=256)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        DemoConfig(steps=0)
    with pytest.raises(SystemExit):
        main(["demo", "--wandb", "sometimes"])


def test_pack_concatenates_documents_with_eos_and_cuts_blocks():
    blocks = pack([[5, 6], [7, 8, 9], [4]], eos_id=0, seq_len=4)
    # stream 5 6 0 7 8 9 0 4 0: two blocks, the tail [0] dropped
    assert blocks.tolist() == [[5, 6, 0, 7], [8, 9, 0, 4]]
    assert blocks.dtype == torch.long
    with pytest.raises(ValueError, match="fewer than one block"):
        pack([[1, 2]], eos_id=0, seq_len=8)


def test_wandb_mode_follows_local_credentials(tmp_path, monkeypatch, caplog):
    import wandb

    wandb.teardown()  # W&B settings are read once per process: start from this environment
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode("auto") == "offline"  # no credentials anywhere
    # what `wandb login` writes
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'a1' * 20}\n")
    assert wandb_mode("auto") == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "too-short")
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        assert wandb_mode("auto") == "offline"
    assert "credentials unusable" in caplog.text
    assert wandb_mode("disabled") == "disabled" and wandb_mode("online") == "online"
    wandb.teardown()
