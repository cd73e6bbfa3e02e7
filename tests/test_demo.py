"""The demo application, run tiny through the CLI; its config, W&B mode and isolation."""

import logging
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from lawwatch.cli import main
from lawwatch.config import field_docs
from lawwatch.demo import DemoConfig
from lawwatch.demo.credentials import local_credentials, wandb_mode
from lawwatch.demo.view import lens_summary
from lawwatch.output.store import read_history
from tests.helpers.wandb_offline import final_summary, history_rows, inspect_run, lawwatch_steps

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
    "max-overhead": 0,  # every scheduled step, however long a snapshot takes here
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

    records = read_history(out / "lawwatch").records
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
    # the logit lens, on by default: per snapshot in the table, when layers predict at the end
    assert all(r["lens"]["examples"] > 0 for r in records)
    lens = lens_summary(records)
    assert [step for step, _ in lens.depth] == [0, 1, 2, 4, 6]
    for line in lens.lines():
        assert line in text, line
    assert "┃ first-correct layer ┃" in text  # the table's column: each snapshot's mean
    for r in records:
        depth = r["lens"]["first_correct_mean"]
        depth = "—" if depth is None else re.escape(f"{depth:.2f}")
        assert re.search(rf"│\s+{r['step']} │.*│\s+{depth} │", text), r["step"]
    report = out / "report"
    assert f"report  {report / 'report.html'}" in text
    assert (report / "lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'id="lens"' in (report / "report.html").read_text()

    wandb_records = inspect_run(run_dir)
    assert lawwatch_steps(history_rows(wandb_records)) == [0, 1, 2, 4, 6]
    emerged = final_summary(wandb_records)["lawwatch/emergence_step"]
    if emerged is None:
        assert "The law did not emerge" in text
    else:
        assert f"The law emerged at step {emerged}" in text


@pytest.mark.slow
def test_default_demo_shows_the_law_emerge(default_demo):
    """The README's promise, with every default: no law at initialization (r above -0.5), the
    law at the end (r at or below -0.95). About 6 minutes of one core: the run trains in a
    process of its own beside the other tests (tests/helpers/default_demo.py), and this test,
    the last, reads its result."""
    records = default_demo["records"]
    first, last = records[0], records[-1]
    assert first["step"] == 0 and last["step"] == DemoConfig.steps
    assert first["pearson_r"] > -0.5, first
    assert last["pearson_r"] <= -0.95, last
    assert default_demo["emergence_step"] is not None and default_demo["report"] is not None


def lens_record(step: int, top1: list[float], depth: float | None, layers=(0, 1, 2, 3)) -> dict:
    """A hand-made snapshot record with the logit lens's fields the summary reads."""
    lens = {"examples": 123, "top1": top1, "first_correct_mean": depth}
    return {"step": step, "layers": list(layers), "pr": [0.9] * len(layers), "lens": lens}


def test_lens_summary_says_when_each_layer_starts_to_predict():
    records = [
        lens_record(0, [0.3, 0.01, 0.02, 0.02], None),  # entry 0 above the bar, not for good
        {"step": 1, "layers": [0, 1, 2, 3], "pr": [0.9] * 4},  # measured without the lens
        lens_record(5, [0.9, 0.9, 0.9], 1.0, layers=(0, 2, 3)),  # other entries: not this series
        lens_record(10, [0.0, 0.05, 0.2, 0.3], 2.25),
        lens_record(20, [0.01, 0.21, 0.35, 0.4], 1.5),
    ]
    lens = lens_summary(records)
    # the bar: half the last entry's top-1 at the last step, 0.5 · 0.4; 0.2 itself is not above
    assert lens.level == pytest.approx(0.2, abs=1e-15)
    assert lens.first_steps == [(0, None), (1, 20), (2, 20), (3, 10)]
    assert lens.depth == [(0, None), (10, 2.25), (20, 1.5)]
    assert lens.lines() == [
        "The logit lens (123 examples a snapshot): the step from which each layer's top-1 "
        "stayed above 0.200 (0.5 × the last layer's at step 20):",
        "  layer 0 never, layer 1 step 20, layer 2 step 20, layer 3 step 10",
        "  mean first-correct layer: — at step 0 → 1.50 at step 20",
    ]
    assert lens_summary(records, bar=0.04).first_steps == [(0, None), (1, 10), (2, 0), (3, 0)]
    assert lens_summary([records[1]]) is None and lens_summary([]) is None


def test_the_verdict_says_why_an_r_below_the_threshold_is_no_emergence(tmp_path):
    from rich.console import Console

    from lawwatch.demo.app import DemoResult
    from lawwatch.demo.view import print_summary

    record = {"step": 9, "pearson_r": -0.9721, "pearson_r_se": 0.0125, "rho": 0.99, "seconds": 1}
    result = DemoResult([record], tmp_path, None, None, None, None, "disabled", None, 3.0)
    console = Console(record=True, width=200)
    print_summary(result, DemoConfig(), console)
    text = console.export_text()
    assert "the final r -0.9721 ± 0.0125 is below -0.95, but no snapshot since r" in text
    assert "by more than its standard error." in text
    assert "is above" not in text


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
    with pytest.raises(ValueError, match=r"lens must lie in \[0, 1\]"):
        DemoConfig(lens=1.5)
    with pytest.raises(SystemExit):
        main(["demo", "--wandb", "sometimes"])


def test_wandb_mode_follows_local_credentials(tmp_path, monkeypatch, caplog):
    import socket

    import wandb

    connect = socket.socket.connect

    def local_only(sock, address):  # W&B's own service process listens on a local socket
        if sock.family != socket.AF_UNIX and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"the credential lookup contacted {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    wandb.teardown()  # W&B settings are read once per process: start from this environment
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no workspace settings file (./wandb/settings) of this checkout
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_mode("auto") == "offline"  # no credentials anywhere
    # what `wandb login` writes
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'a1' * 20}\n")
    assert wandb_mode("auto") == "online"
    assert local_credentials() == str(netrc)
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "too-short")
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        assert wandb_mode("auto") == "offline"
    assert "credentials unusable" in caplog.text
    assert wandb_mode("disabled") == "disabled" and wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_API_KEY", "b2" * 20)
    assert wandb_mode("auto") == "online" and local_credentials() == "WANDB_API_KEY"
    monkeypatch.delenv("WANDB_API_KEY")
    wandb.teardown()
    settings_file = wandb_settings(tmp_path, "https://wandb.example.com", api_key="c3" * 20)
    assert wandb_mode("auto") == "online" and local_credentials() == "settings file"
    # a self-hosted server: the .netrc entry must name it, not W&B's cloud
    wandb.teardown()
    settings_file.write_text("[default]\nbase_url = https://wandb.example.com\n")
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'a1' * 20}\n")
    assert wandb_mode("auto") == "offline"
    netrc.write_text(f"machine wandb.example.com\n  login user\n  password {'a1' * 20}\n")
    assert wandb_mode("auto") == "online"
    netrc.unlink()
    token = tmp_path / "token.jwt"
    monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(token))
    wandb.teardown()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        assert wandb_mode("auto") == "offline"
    assert "does not exist" in caplog.text
    token.write_text("header.payload.signature")
    assert wandb_mode("auto") == "online" and local_credentials() == "WANDB_IDENTITY_TOKEN_FILE"
    wandb.teardown()


def wandb_settings(tmp_path: Path, base_url: str, api_key: str) -> Path:
    """A W&B system settings file (as `wandb login --host` leaves it) under WANDB_CONFIG_DIR."""
    path = tmp_path / "config" / "settings"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[default]\nbase_url = {base_url}\napi_key = {api_key}\n")
    return path


def test_the_library_never_imports_the_demo():
    """The demo is an application of lawwatch: importing the library and its integrations
    (and the CLI module, which imports the demo only when it runs it) leaves it unloaded."""
    code = (
        "import sys, lawwatch, lawwatch.cli, lawwatch.integrations.hf, "
        "lawwatch.integrations.accelerate, lawwatch.report\n"
        "print(sorted(m for m in sys.modules if m.startswith('lawwatch.demo')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
