"""`lawwatch analyze`: checkpoint sweeps with the live monitor's numbers and files."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from lawwatch import LawWatch, MeasureConfig, ProbeSet, cli, measure
from lawwatch.analyze import analyze
from lawwatch.checkpoints import (
    Checkpoint,
    HashCache,
    find_checkpoints,
    step_from_name,
    weight_files,
    weights_hash,
)
from lawwatch.demo.corpus import pydoc_topics
from lawwatch.integrations.hf import LawWatchCallback
from lawwatch.output.store import read_history
from tests.helpers.gguf_files import write_gguf
from tests.helpers.models import RECORD_KEYS, char_tokenizer, ragged_probe, tiny_gpt2
from tests.helpers.trainer import make_trainer
from tests.helpers.wandb_offline import history_rows, inspect_run, lawwatch_steps

IDENTITY = {"checkpoint", "probe", "config", "weights"}


def save_model(model, directory: Path, step: int | None = None) -> Path:
    """A model directory; with ``step``, a trainer_state.json saying it."""
    model.save_pretrained(directory)
    if step is not None:
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return directory


def by_step(records):
    return {r["step"]: r for r in records}


# -- the same numbers as live -------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_of_a_trainer_output_dir_gives_the_live_numbers(tmp_path):
    probe = ragged_probe()
    out = tmp_path / "out"
    callback = LawWatchCallback(
        probe, max_overhead=None, every=2
    )  # snapshots at every save (steps 2, 4, 6)
    make_trainer(out, [callback], max_steps=6, save_steps=2).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    live = by_step(read_history(out / "lawwatch").records)
    probe_file = probe.save(tmp_path / "probe.safetensors")

    sweep = tmp_path / "sweep"
    argv = ["analyze", str(out), "--probe", str(probe_file), "--out", str(sweep)]
    assert cli.main([*argv, "--no-progress", "--no-report"]) == 0
    records = read_history(sweep).records
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        assert set(record) >= RECORD_KEYS | IDENTITY
        reference = live[record["step"]]
        assert np.abs(np.subtract(record["pr"], reference["pr"])).max() <= 1e-9
        for key in ("rho", "pearson_r", "slope", "intercept"):
            assert record[key] == pytest.approx(reference[key], abs=1e-9)
        assert record["n_tokens"] == reference["n_tokens"] == probe.num_examples()
        assert record["checkpoint"] == str((out / f"checkpoint-{record['step']}").resolve())
        assert record["probe"] == probe.content_hash()
        assert record["config"] == MeasureConfig().to_dict()
    assert len({r["weights"] for r in records}) == 3  # three different states of training
    matrix = load_file(sweep / "pr.safetensors")
    assert matrix["steps"].tolist() == [2, 4, 6]
    assert torch.equal(matrix["pr"], torch.tensor([r["pr"] for r in records], dtype=torch.float64))
    assert ProbeSet.load(sweep / "probe.safetensors").content_hash() == probe.content_hash()

    # a real process, into a fresh directory, with the report: the same numbers again
    fresh = tmp_path / "fresh"
    done = subprocess.run(
        [sys.executable, "-m", "lawwatch.cli", *argv[:-1], str(fresh)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "3 measured" in done.stdout and (fresh / "report.html").is_file()
    again = read_history(fresh).records
    for a, b in zip(again, records, strict=True):
        assert a["step"] == b["step"] and a["weights"] == b["weights"]
        assert np.abs(np.subtract(a["pr"], b["pr"])).max() <= 1e-12

    # run again over the first directory: nothing is measured twice
    before = (sweep / "history.jsonl").read_text()
    assert cli.main([*argv, "--no-progress", "--no-report"]) == 0
    assert (sweep / "history.jsonl").read_text() == before


# -- resumable and cheap ------------------------------------------------------------------------


def test_identical_weights_are_copied_and_late_checkpoints_inserted_in_order(tmp_path, capsys):
    probe = ragged_probe()
    first, second = tiny_gpt2(0), tiny_gpt2(1)
    a = save_model(first, tmp_path / "a" / "checkpoint-0")
    same = save_model(first, tmp_path / "b" / "checkpoint-20")
    other = save_model(second, tmp_path / "c" / "model", step=10)
    out = tmp_path / "sweep"

    result = analyze(find_checkpoints([str(same), str(a)]), probe, out)
    assert (result.measured, result.copied) == ([0], [20])
    records = read_history(out).records
    assert records[1]["pr"] == records[0]["pr"]
    assert records[1]["duplicate_of"] == str(a.resolve())
    assert records[1]["weights"] == records[0]["weights"]

    # a checkpoint between the recorded steps: the files are rewritten in step order
    result = analyze(find_checkpoints([str(other), str(a), str(same)]), probe, out)
    assert (result.measured, result.skipped) == ([10], [0, 20])
    records = read_history(out).records
    assert [r["step"] for r in records] == [0, 10, 20]
    assert load_file(out / "pr.safetensors")["steps"].tolist() == [0, 10, 20]
    expected = {0: measure(first, probe).pr, 10: measure(second, probe).pr}
    for step, pr in expected.items():
        assert torch.allclose(
            torch.tensor(by_step(records)[step]["pr"], dtype=torch.float64), pr, rtol=0, atol=1e-12
        )

    # the weights are hashed once: the digests are remembered by size and modification time
    digests = json.loads((out / "weights-sha256.json").read_text())
    assert len(digests) == 3  # one digest per file, each computed once
    assert all(len(v) == 3 and len(v[2]) == 64 for v in digests.values())


def test_weights_hash_is_the_content_of_the_weight_files(tmp_path):
    model = tiny_gpt2(0)
    one = save_model(model, tmp_path / "one")
    two = save_model(model, tmp_path / "two", step=3)
    (two / "optimizer.pt").write_bytes(b"not weights")  # a Trainer checkpoint's other files
    assert weights_hash(one) == weights_hash(two)
    model.transformer.h[0].ln_1.weight.data[0] += 1e-6
    save_model(model, two)
    assert weights_hash(one) != weights_hash(two)
    cache = HashCache(tmp_path / "digests.json")
    assert weights_hash(one, cache=cache) == weights_hash(one)
    assert weights_hash(one, cache=HashCache(tmp_path / "digests.json")) == weights_hash(one)
    with pytest.raises(FileNotFoundError, match="No weights"):
        weights_hash(tmp_path)


def test_steps_come_from_the_checkpoint_or_are_given(tmp_path):
    assert [step_from_name(n) for n in ("checkpoint-1000", "step1000", "global_step7")] == [
        1000,
        1000,
        7,
    ]
    assert step_from_name("stage1-step1000-tokens4B") == 1000
    assert step_from_name("main") is None and step_from_name("steps") is None
    model = tiny_gpt2(0)
    save_model(model, tmp_path / "run" / "checkpoint-30")
    save_model(model, tmp_path / "run" / "checkpoint-4", step=5)  # trainer_state wins
    plain = save_model(model, tmp_path / "final")
    found = find_checkpoints([str(tmp_path / "run")])
    assert [(Path(c.source).name, c.step) for c in found] == [
        ("checkpoint-4", 5),
        ("checkpoint-30", 30),
    ]
    with pytest.raises(ValueError, match=r"step of .*final is unknown.*--step"):
        find_checkpoints([str(plain)])
    assert find_checkpoints([str(plain)], steps=[7])[0].step == 7
    with pytest.raises(ValueError, match="--step names one step"):
        find_checkpoints([str(tmp_path / "run")], steps=[1])
    with pytest.raises(ValueError, match="one step per checkpoint"):
        find_checkpoints([str(plain), str(plain)], steps=[1])
    hub = find_checkpoints(["EleutherAI/pythia-70m@step1000", "org/model"], steps=[None, 5])
    assert [(c.source, c.revision, c.step, c.local) for c in hub] == [
        ("org/model", None, 5, False),
        ("EleutherAI/pythia-70m", "step1000", 1000, False),
    ]
    with pytest.raises(ValueError, match="neither a model directory"):
        find_checkpoints([str(tmp_path)])


def test_refusals_and_failures(tmp_path, capsys):
    probe_file = ragged_probe().save(tmp_path / "probe.safetensors")
    good = save_model(tiny_gpt2(0), tmp_path / "good", step=0)
    also = save_model(tiny_gpt2(1), tmp_path / "also", step=0)
    out = tmp_path / "sweep"
    base = ["analyze", "--probe", str(probe_file), "--out", str(out), "--no-report"]

    assert cli.main([*base, str(good), str(also)]) == 2
    assert "Two checkpoints at step 0" in capsys.readouterr().err

    # a checkpoint that cannot be loaded is reported, and the others are measured
    broken = save_model(tiny_gpt2(2), tmp_path / "broken", step=5)
    (broken / "model.safetensors").write_bytes(b"truncated")
    late = save_model(tiny_gpt2(3), tmp_path / "late", step=9)
    assert cli.main([*base, str(good), str(broken), str(late)]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and "broken" in captured.err and "(step 5)" in captured.err
    assert "2 measured" in captured.out
    assert [r["step"] for r in read_history(out).records] == [0, 9]

    # one directory holds one probe and one set of options
    assert cli.main([*base, "--target", "onehot", str(good)]) == 2
    assert "other options (they differ in ['target'])" in capsys.readouterr().err
    other_probe = ragged_probe(seed=1).save(tmp_path / "other.safetensors")
    assert cli.main(["analyze", str(good), "--probe", str(other_probe), "--out", str(out)]) == 2
    assert "another probe" in capsys.readouterr().err
    # other weights at a recorded step
    assert cli.main([*base, str(also)]) == 1
    assert "already in" in capsys.readouterr().err


# -- sources: hub revisions, GGUF, probes built on the spot -------------------------------------


def fake_hub_cache(cache: Path, repo: str, revision: str, files: Path) -> None:
    """The layout huggingface_hub's cache gives a downloaded revision (no network)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(files, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / revision).write_text(commit)


def remote_connections(monkeypatch) -> list:
    """Every host a test's code looks up or connects to, but this one: recorded, and refused
    at once (a lookup is refused as a machine without network refuses it)."""
    import socket

    tried, connect, lookup = [], socket.socket.connect, socket.getaddrinfo
    local = ("127.0.0.1", "::1", "localhost")

    def connect_local(sock, address):
        if sock.family != socket.AF_UNIX and address[0] not in local:
            tried.append(address)
            raise OSError(f"the test tried to connect to {address}")
        return connect(sock, address)

    def lookup_local(host, *args, **kwargs):
        if host not in local:
            tried.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"the test tried to look up {host}")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect_local)
    monkeypatch.setattr(socket, "getaddrinfo", lookup_local)
    return tried


def test_hub_revision_is_loaded_with_from_pretrained(tmp_path, capsys, monkeypatch):
    from huggingface_hub.utils import build_hf_headers

    build_hf_headers()  # the user-agent header: huggingface_hub looks it up once per process
    tried = remote_connections(monkeypatch)  # --offline: the local hub cache, no network
    probe_file = ragged_probe().save(tmp_path / "probe.safetensors")
    model = tiny_gpt2(4)
    files = save_model(model, tmp_path / "files")
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "org/tiny", "step40", files)
    out = tmp_path / "sweep"
    argv = ["analyze", "org/tiny@step40", "--probe", str(probe_file), "--out", str(out)]
    argv += ["--cache-dir", str(cache), "--offline", "--no-report"]
    assert cli.main(argv) == 0
    (record,) = read_history(out).records
    assert (record["step"], record["checkpoint"]) == (40, "org/tiny@step40")
    assert record["weights"] == weights_hash(files)  # the same content, wherever it lies
    expected = measure(model, ProbeSet.load(probe_file)).pr
    assert torch.allclose(
        torch.tensor(record["pr"], dtype=torch.float64), expected, rtol=0, atol=1e-12
    )
    assert cli.main(argv) == 0
    assert "1 already measured" in capsys.readouterr().out
    # a revision the cache does not hold fails to load, and says so
    assert cli.main([*argv[:1], "org/tiny@step50", *argv[2:]]) == 1
    assert "org/tiny@step50" in capsys.readouterr().err
    assert tried == []


def test_gguf_checkpoint(tmp_path):
    torch.manual_seed(5)
    # transformers' GGUF loader reads GPT-2's context length into a field GPT2Config ignores:
    # only the default 1024 positions load
    # GGUF stores the norm's epsilon as a float32: give the model one a float32 holds exactly
    eps = float(np.float32(1e-5))
    config = GPT2Config(
        vocab_size=97, n_positions=1024, n_embd=16, n_layer=4, n_head=2, layer_norm_epsilon=eps
    )
    model = GPT2LMHeadModel(config)
    assert sum(p.numel() for p in model.parameters()) < 50_000
    folder = tmp_path / "step12"
    folder.mkdir()
    path = write_gguf(model, folder / "tiny-f32.gguf")
    probe = ragged_probe()
    probe_file = probe.save(tmp_path / "probe.safetensors")
    base = ["--probe", str(probe_file), "--no-report"]
    assert cli.main(["analyze", str(path), "--out", str(tmp_path / "a"), *base]) == 0
    assert (
        cli.main(
            ["analyze", str(folder), "--gguf-file", path.name, "--out", str(tmp_path / "b"), *base]
        )
        == 0
    )
    expected = measure(model, probe).pr
    for sweep in ("a", "b"):
        (record,) = read_history(tmp_path / sweep).records
        assert record["step"] == 12 and record["checkpoint"].endswith("step12/tiny-f32.gguf")
        assert torch.allclose(
            torch.tensor(record["pr"], dtype=torch.float64), expected, rtol=0, atol=1e-12
        )


def test_probe_built_with_the_checkpoints_own_tokenizer(tmp_path):
    tokenizer = char_tokenizer()
    torch.manual_seed(6)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=4, n_head=2)
    model = GPT2LMHeadModel(config)
    assert sum(p.numel() for p in model.parameters()) < 50_000
    ckpt = save_model(model, tmp_path / "checkpoint-8")
    tokenizer.save_pretrained(ckpt)
    docs = tmp_path / "docs"
    docs.mkdir()
    topics = pydoc_topics()  # real English text every CPython ships
    (docs / "a.txt").write_text("\n".join(topics[:10]))
    (docs / "b.txt").write_text("\n".join(topics[10:20]))
    lines = [line for text in topics[:20] for line in text.splitlines() if line.strip()]
    out = tmp_path / "sweep"
    argv = ["analyze", str(ckpt), "--out", str(out), "--no-report", "--texts", str(docs / "*.txt")]
    argv += ["--text-unit", "line", "--max-length", "24", "--num-texts", "60", "--probe-seed", "3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few examples per dimension: PR is noisy, not wrong
        assert cli.main(argv) == 0
    expected_probe = ProbeSet.from_texts(lines, tokenizer, max_length=24, num_texts=60, seed=3)
    saved = ProbeSet.load(out / "probe.safetensors")
    assert saved.content_hash() == expected_probe.content_hash()
    assert saved.meta["spec"]["text_unit"] == "line"
    (record,) = read_history(out).records
    assert record["probe"] == expected_probe.content_hash()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = measure(model, expected_probe).pr
    assert torch.allclose(
        torch.tensor(record["pr"], dtype=torch.float64), expected, rtol=0, atol=1e-12
    )
    # run again without probe options: the sweep's own probe file is used
    assert cli.main(argv[:5]) == 0


def test_device_map_and_dtype(tmp_path):
    pytest.importorskip("accelerate")
    probe = ragged_probe()
    model = tiny_gpt2(7)
    ckpt = save_model(model, tmp_path / "m", step=1)
    probe_file = probe.save(tmp_path / "probe.safetensors")
    base = ["analyze", str(ckpt), "--probe", str(probe_file), "--no-report"]
    assert cli.main([*base, "--out", str(tmp_path / "a"), "--device-map", "auto"]) == 0
    (record,) = read_history(tmp_path / "a").records
    expected = measure(model, probe).pr
    assert torch.allclose(
        torch.tensor(record["pr"], dtype=torch.float64), expected, rtol=0, atol=1e-12
    )
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--dtype", "bfloat16"]) == 0
    (low,) = read_history(tmp_path / "b").records
    assert low["pr"] != record["pr"]  # bf16 weights are other weights
    assert torch.allclose(torch.tensor(low["pr"], dtype=torch.float64), expected, rtol=0.05)


@pytest.mark.slow
def test_wandb_run_of_the_sweep(tmp_path, offline_wandb):
    probe_file = ragged_probe().save(tmp_path / "probe.safetensors")
    for step, seed in ((0, 0), (3, 1), (9, 2)):
        save_model(tiny_gpt2(seed), tmp_path / "run" / f"checkpoint-{step}")
    out = tmp_path / "sweep"
    argv = ["analyze", str(tmp_path / "run"), "--probe", str(probe_file), "--out", str(out)]
    argv += ["--wandb-project", "sweeps", "--wandb-mode", "offline"]
    assert cli.main(argv) == 0
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = read_history(out).records
    rows = history_rows(inspect_run(run_dir))
    assert lawwatch_steps(rows) == [r["step"] for r in records] == [0, 3, 9]
    law_rows = [row for row in rows if "lawwatch/rho" in row]
    for row, record in zip(law_rows, records, strict=True):
        assert row["lawwatch/rho"] == pytest.approx(record["rho"], rel=1e-12)
        assert [row[f"lawwatch/pr/layer_{i:02d}"] for i in range(5)] == pytest.approx(
            record["pr"], rel=1e-12
        )
    assert any(row.get("lawwatch/report._type") == "image-file" for row in rows)
    assert os.path.isfile(out / "report.html")


def test_checkpoint_names():
    assert Checkpoint("/a/b", 3).name == "/a/b"
    assert Checkpoint("org/m", 3, revision="step3", local=False).name == "org/m@step3"
    assert Checkpoint("/a", 3, gguf_file="m.gguf").name == "/a/m.gguf"


def test_no_loading_bars_when_not_on_a_terminal(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    probe_file = ragged_probe().save(tmp_path / "probe.safetensors")
    for step in (1,):
        save_model(tiny_gpt2(step), tmp_path / "run" / f"checkpoint-{step}")
    argv = ["analyze", str(tmp_path / "run"), "--probe", str(probe_file), "--no-report"]
    assert hf_logging.is_progress_bar_enabled()
    assert cli.main([*argv, "--out", str(tmp_path / "quiet")]) == 0  # stderr is no terminal
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err and "1 measured" in captured.out
    assert hf_logging.is_progress_bar_enabled()  # restored after the sweep
    # asked for, they are shown
    assert cli.main([*argv, "--progress", "--out", str(tmp_path / "shown")]) == 0
    assert "Loading weights" in capsys.readouterr().err


# -- a sweep beside a running training: checkpoints being written, the sweep's own files ------


def test_a_checkpoint_being_written_is_left_for_the_next_sweep(tmp_path, capsys):
    """A real partial write (the first half of model.safetensors) is not measured nor recorded;
    once the write completes, the next sweep measures it, with the digest of what it measured."""
    probe_file = ragged_probe().save(tmp_path / "probe.safetensors")
    run = tmp_path / "run"
    save_model(tiny_gpt2(0), run / "checkpoint-10", step=10)
    model = tiny_gpt2(1)
    complete = save_model(model, tmp_path / "complete", step=30)
    writing = run / "checkpoint-30"
    shutil.copytree(complete, writing)
    data = (complete / "model.safetensors").read_bytes()
    (writing / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "sweep"
    argv = ["analyze", str(run), "--probe", str(probe_file), "--out", str(out), "--no-report"]

    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "checkpoint-30 (step 30) looks still being written" in err
    assert "model.safetensors is" in err and "run again once it is saved" in err
    assert [r["step"] for r in read_history(out).records] == [10]

    with (writing / "model.safetensors").open("ab") as f:  # the writer finishes
        f.write(data[len(data) // 2 :])
    assert cli.main(argv) == 0
    assert "1 measured, 1 already measured" in capsys.readouterr().out
    record = by_step(read_history(out).records)[30]
    assert record["weights"] == weights_hash(complete)
    expected = measure(model, ProbeSet.load(probe_file)).pr
    torch.testing.assert_close(torch.tensor(record["pr"], dtype=torch.float64), expected)
    assert cli.main(argv) == 0  # and the sweep after that has nothing to redo
    assert "2 already measured" in capsys.readouterr().out


def test_a_trainer_checkpoint_without_its_state_yet_is_left_for_the_next_sweep(tmp_path, capsys):
    probe_file = ragged_probe().save(tmp_path / "probe.safetensors")
    ckpt = save_model(tiny_gpt2(0), tmp_path / "run" / "checkpoint-40")
    (ckpt / "training_args.bin").write_bytes(b"written by the Trainer before its state")
    out = tmp_path / "sweep"
    argv = ["analyze", str(ckpt), "--probe", str(probe_file), "--out", str(out), "--no-report"]
    assert cli.main(argv) == 0
    assert "not yet written its trainer_state.json" in capsys.readouterr().err
    assert not (out / "history.jsonl").exists() or not read_history(out).records
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    assert cli.main(argv) == 0
    assert [r["step"] for r in read_history(out).records] == [40]


def test_weights_rewritten_while_loaded_are_not_recorded_under_the_old_digest(
    tmp_path, monkeypatch
):
    """The writer replaces the file between the hash and the load: the sweep records nothing
    (the digest would not be that of the weights measured); the next sweep measures the new."""
    import lawwatch.analyze as sweep_module

    probe = ragged_probe()
    old, new = tiny_gpt2(0), tiny_gpt2(1)
    ckpt = save_model(old, tmp_path / "run" / "checkpoint-30", step=30)
    replacement = save_model(new, tmp_path / "new")
    real_load = sweep_module.load_model

    def load_while_written(checkpoint, options):
        shutil.copyfile(replacement / "model.safetensors", ckpt / "model.safetensors")
        return real_load(checkpoint, options)

    monkeypatch.setattr(sweep_module, "load_model", load_while_written)
    out = tmp_path / "sweep"
    result = analyze(find_checkpoints([str(ckpt)]), probe, out)
    assert [(c.step, why) for c, why in result.unfinished] == [
        (30, "its weight files changed while they were loaded")
    ]
    assert not result.measured and not read_history(out).records
    monkeypatch.setattr(sweep_module, "load_model", real_load)
    result = analyze(find_checkpoints([str(ckpt)]), probe, out)
    assert result.measured == [30]
    (record,) = read_history(out).records
    assert record["weights"] == weights_hash(replacement)
    torch.testing.assert_close(
        torch.tensor(record["pr"], dtype=torch.float64), measure(new, probe).pr
    )


def test_a_sweep_into_the_run_folder_runs_again(tmp_path, capsys):
    """The final model has no checkpoint at its step, so it is measured from the folder the
    sweep writes into: its pr.safetensors and probe.safetensors are not the model's weights."""
    probe_file = ragged_probe().save(tmp_path / "probe.safetensors")
    run = tmp_path / "run"
    save_model(tiny_gpt2(0), run / "checkpoint-2", step=2)
    save_model(tiny_gpt2(1), run, step=5)  # trainer.save_model() + save_state() at step 5
    argv = ["analyze", str(run), "--probe", str(probe_file), "--out", str(run), "--no-report"]
    assert cli.main(argv) == 0
    assert (run / "pr.safetensors").is_file() and (run / "probe.safetensors").is_file()
    before = (run / "history.jsonl").read_text()
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "2 already measured" in captured.out and "already in" not in captured.err
    assert (run / "history.jsonl").read_text() == before
    assert [p.name for p in weight_files(run)] == ["model.safetensors"]


# -- measured as the live run was ---------------------------------------------------------------


def test_a_sweep_measures_as_the_live_run_did_and_a_given_option_wins(tmp_path, capsys):
    """The live run measured with the logit lens and no jackknife: a sweep without options
    measures so too (and says so), so both agree, emergence step included; an option given on
    the command line wins, and ``--jackknife none`` means none."""
    probe = ragged_probe(seed=2, rows=20)  # 16+ sequences: 'auto' would keep 8 groups
    run = tmp_path / "run"
    model = tiny_gpt2(0)
    watch = LawWatch(
        model, probe, directory=run / "lawwatch", lens=0.5, jackknife=None, max_overhead=None
    )
    for step in (1, 2, 3):
        model.load_state_dict(tiny_gpt2(step).state_dict())
        save_model(model, run / f"checkpoint-{step}", step=step)
        watch.snapshot(step)
    watch.close()
    live = read_history(run / "lawwatch")
    assert all("pearson_r_se" not in r and "lens" in r for r in live)

    base = ["analyze", str(run), "--no-report", "--out"]
    assert cli.main([*base, str(tmp_path / "same")]) == 0
    said = capsys.readouterr().out
    assert "measuring as the run's live history was" in said
    assert "lens=0.5" in said and "jackknife=None" in said
    swept = read_history(tmp_path / "same")
    assert swept.steps == live.steps == [1, 2, 3]
    for got, want in zip(swept, live, strict=True):
        assert got["config"] == want["config"]
        assert "pearson_r_se" not in got
        assert np.abs(np.subtract(got["pr"], want["pr"])).max() <= 1e-9
        for metric in ("top1", "ce", "kl", "entropy"):
            np.testing.assert_allclose(got["lens"][metric], want["lens"][metric], atol=1e-9)
    for threshold in (-0.999, -0.9, -0.5):
        assert swept.emergence_step(threshold) == live.emergence_step(threshold)

    assert cli.main([*base, str(tmp_path / "given"), "--jackknife", "4", "--lens", "none"]) == 0
    said = capsys.readouterr().out
    assert "lens=" not in said and "jackknife=" not in said
    for record in read_history(tmp_path / "given"):
        assert record["config"]["jackknife"] == 4 and record["config"]["lens"] is None
        assert record["jackknife_groups"] == 4 and "pearson_r_se" in record
        assert "lens" not in record

    # run again without options: that sweep continues with its own options, not the run's
    assert cli.main([*base, str(tmp_path / "given")]) == 0
    said = capsys.readouterr().out
    assert "measuring as the earlier sweep in" in said and "jackknife=4" in said
    assert "3 already measured" in said

    # --jackknife none given: none is measured, as each record's config says (a sweep used to
    # measure 8 groups whatever its config said, and record their standard errors)
    assert cli.main([*base, str(tmp_path / "none"), "--jackknife", "none"]) == 0
    for record in read_history(tmp_path / "none"):
        assert record["config"]["jackknife"] is None
        assert "pearson_r_se" not in record and "jackknife_groups" not in record
