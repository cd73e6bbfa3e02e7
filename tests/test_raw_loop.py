"""A raw torch loop's one-liner: ``LawWatch(directory=..., trackers=...)``, its state in a
``torch.save`` checkpoint, the first call measured, and docs/raw-loop.md's code run as is."""

from __future__ import annotations

import copy
import logging
import re
import subprocess

import numpy as np
import pytest
import torch

from lawwatch import measure
from lawwatch.output.store import LocalHistory, read_history
from lawwatch.watch.monitor import LawWatch
from tests.helpers.models import (
    EpsInCodeLayerNorm,
    NanoGPT,
    nanogpt_eps_in_code,
    plain_layernorm_copy,
    ragged_probe,
)
from tests.helpers.recipes import ROOT
from tests.helpers.reference import layer_norm, protocol_pr
from tests.helpers.trackers import expected_scalars, read_events
from tests.helpers.workers.common import poison


def loop(watch: LawWatch, steps: range) -> None:
    """The documented loop's monitor calls (the tiny model is not trained: the records are)."""
    for step in steps:
        watch.maybe_snapshot(step)


def test_directory_writes_history_and_figure(tmp_path, gpt2, probe):
    watch = LawWatch(
        gpt2, probe, every=2, last_step=5, max_overhead=None, directory=tmp_path / "lw"
    )
    loop(watch, range(1, 6))
    watch.close()
    records = read_history(tmp_path / "lw").records
    assert [r["step"] for r in records] == [1, 2, 4, 5]
    assert (tmp_path / "lw" / "pr.safetensors").exists()
    assert watch.report_path == tmp_path / "lw" / "law.png"
    assert watch.report_path.read_bytes()[:4] == b"\x89PNG"
    # the directory is free again: a new monitor may open it
    LawWatch(gpt2, probe, directory=tmp_path / "lw").close()


def test_tensorboard_tracker_by_name(tmp_path, gpt2, probe):
    watch = LawWatch(gpt2, probe, every=2, directory=tmp_path / "lw", trackers=["tensorboard"])
    loop(watch, range(1, 5))
    watch.close()
    records = read_history(tmp_path / "lw").records
    events = read_events(tmp_path / "lw" / "tensorboard")
    expected = expected_scalars(records)
    steps = [r["step"] for r in records]
    for key in expected[steps[0]]:
        points = events.Scalars(key)
        assert [p.step for p in points] == steps, key
        assert [p.value for p in points] == pytest.approx(  # TensorBoard keeps float32
            [expected[s][key] for s in steps], rel=1e-6, abs=1e-6
        )


def git(repo, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_dvclive_by_name_leaves_the_users_git_repository_as_it_was(
    tmp_path, gpt2, probe, monkeypatch
):
    """A raw loop in a real git repository (no DVC): the Live lawwatch opens logs into
    ./dvclive and never runs ``dvc init`` (no ``.dvc/``, nothing staged, no commit, no ref)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text("dvclive/\nlw/\n")  # the run's own outputs
    (repo / "train.py").write_text("print('the user's script')\n")
    git(repo, "add", ".gitignore", "train.py")
    git(repo, "commit", "-q", "-m", "the user's work")
    before = (git(repo, "status", "--porcelain", "--ignored"), git(repo, "show-ref"))
    monkeypatch.chdir(repo)  # dvclive writes ./dvclive
    watch = LawWatch(gpt2, probe, every=2, max_overhead=None, directory="lw", trackers=["dvclive"])
    loop(watch, range(1, 5))
    watch.close()
    steps = [r["step"] for r in read_history(repo / "lw").records]
    pr = repo / "dvclive" / "plots" / "metrics" / "lawwatch" / "pearson_r.tsv"
    assert [int(line.split("\t")[0]) for line in pr.read_text().splitlines()[1:]] == steps
    assert not (repo / ".dvc").exists() and not (repo / ".dvcignore").exists()
    assert not (repo / "dvc.yaml").exists() and not (repo / "dvclive" / "dvc.yaml").exists()
    after = (git(repo, "status", "--porcelain"), git(repo, "show-ref"))
    assert after[0] == "" and git(repo, "diff", "--cached", "--name-only") == ""
    assert after[1] == before[1]  # no experiment ref, no commit
    assert git(repo, "status", "--porcelain", "--ignored") == "!! dvclive/\n!! lw/\n"
    assert before[0] == ""


def test_trackers_are_checked_when_built(tmp_path, gpt2, probe):
    with pytest.raises(ValueError, match=r"unknown tracker 'tensorbored'.*'tensorboard'"):
        LawWatch(gpt2, probe, directory=tmp_path / "lw", trackers=["tensorbored"])
    with pytest.raises(TypeError, match="neither a tracker name"):
        LawWatch(gpt2, probe, trackers=[object()])
    assert not (tmp_path / "lw").exists()  # refused before anything opened
    wandb = pytest.importorskip("wandb")
    assert wandb.run is None
    with pytest.raises(LookupError, match=r"'wandb'.*no W&B run is active.*wandb\.init"):
        LawWatch(gpt2, probe, directory=tmp_path / "lw", trackers=["wandb"])
    LocalHistory(tmp_path / "lw").close()  # the refused monitor left the directory free


def test_state_through_torch_save_and_resume(tmp_path, gpt2, probe, caplog):
    lw, ckpt_path = tmp_path / "lw", tmp_path / "ckpt.pt"
    first = LawWatch(gpt2, probe, every=2, max_overhead=None, directory=lw)
    loop(first, range(1, 5))
    torch.save({"step": 4, "lawwatch": first.state_dict()}, ckpt_path)
    loop(first, range(5, 7))  # went on past the checkpoint, then died
    first.close()
    before = read_history(lw).records
    assert [r["step"] for r in before] == [1, 2, 4, 6]

    ckpt = torch.load(ckpt_path, weights_only=True)  # plain values only
    resumed = LawWatch(gpt2, probe, every=2, max_overhead=None, directory=lw)
    resumed.load_state_dict(ckpt["lawwatch"], resume_step=ckpt["step"])
    assert [r["step"] for r in read_history(lw).records] == [1, 2, 4]  # rewound at once
    loop(resumed, range(5, 9))
    resumed.close()
    after = read_history(lw).records
    assert [r["step"] for r in after] == [1, 2, 4, 6, 8]  # one sequence, step 6 redone
    assert after[:3] == before[:3]

    # a fresh monitor in the same directory starts a new history, with the warning
    caplog.set_level(logging.WARNING, logger="lawwatch")
    fresh = LawWatch(gpt2, probe, every=2, max_overhead=None, directory=lw)
    loop(fresh, range(3, 5))
    fresh.close()
    assert [r["step"] for r in read_history(lw).records] == [3, 4]
    assert "loaded no state, so it starts a new history" in caplog.text


def test_first_call_is_measured(gpt2, probe):
    watch = LawWatch(gpt2, probe, schedule=[4, 8], max_overhead=None)
    loop(watch, range(1, 9))
    assert watch.history.steps == [1, 4, 8]  # the history starts where the loop first called
    resumed = LawWatch(gpt2, probe, schedule=[4, 8], max_overhead=None)
    resumed.load_state_dict(watch.state_dict(), resume_step=5)
    loop(resumed, range(6, 9))  # a resumed monitor keeps to its schedule
    assert resumed.history.steps == [1, 4, 8]
    assert resumed.history.records[-1] is not watch.history.records[-1]


def test_nanogpt_blocks_are_found_or_named():
    probe = ragged_probe()
    model = NanoGPT()  # nanoGPT's layout without a config: the error says what to pass
    with pytest.raises(ValueError, match=r"Pass blocks='transformer\.h'.*final_norm="):
        measure(model, probe)
    model.config = type("GPTConfig", (), {"n_layer": len(model.transformer.h)})()
    found = measure(model, probe)  # nanoGPT's GPTConfig.n_layer: the blocks, and ln_f by name
    named = measure(model, probe, blocks="transformer.h", final_norm="transformer.ln_f")
    assert found.pr.tolist() == pytest.approx(named.pr.tolist(), rel=1e-12)


def _nanogpt_entries(model):
    """Entries 0 … L of a nanoGPT-layout model, by hand on a float64 copy (no lawwatch)."""
    m = copy.deepcopy(model).double().eval()

    def stream(ids):
        with torch.no_grad():
            x = m.transformer.wte(ids[None]) + m.transformer.wpe(torch.arange(ids.numel()))
            entries = [x]
            for block in m.transformer.h:
                x = block(x)
                entries.append(x)
            entries[-1] = m.transformer.ln_f(entries[-1])
        return [e[0] for e in entries]

    return stream


def test_nanogpt_own_layernorm_is_identified_and_measured(tmp_path, caplog):
    """nanoGPT's own LayerNorm keeps its epsilon in its forward: the monitor identifies it by
    running it, measures every snapshot, writes the history, and its PRs are those of the same
    model with nn.LayerNorm(eps=1e-5), against a float64 reference written out by hand."""
    probe = ragged_probe()
    model = nanogpt_eps_in_code()
    assert isinstance(model.transformer.ln_f, EpsInCodeLayerNorm)
    assert not hasattr(model.transformer.ln_f, "eps")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    directory = tmp_path / "lw"
    watch = LawWatch(model, probe, every=2, max_overhead=None, directory=directory)
    gen = torch.Generator().manual_seed(1)
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        for step in range(1, 5):
            batch = torch.randint(1, 97, (4, 16), generator=gen)
            model(batch, batch)[1].backward()
            optimizer.step()
            optimizer.zero_grad()
            watch.maybe_snapshot(step)
        watch.close()
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert read_history(directory).steps == [1, 2, 4]
    assert (directory / "law.png").is_file()
    # the trained weights, in float64: PR as with a plain nn.LayerNorm, and as the protocol
    hidden = copy.deepcopy(model).double()
    plain = plain_layernorm_copy(hidden)
    got = measure(hidden, probe).pr.numpy()
    want = measure(plain, probe).pr.numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    reference = protocol_pr(_nanogpt_entries(plain), probe, lambda h: layer_norm(h, 1e-5))
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-9)


def test_a_run_that_measured_nothing_says_so_once_at_close(tmp_path, gpt2, probe, caplog):
    """Every snapshot fails (NaN hidden states): each failure is logged, and close() says once
    that the run has no history."""
    gpt2.transformer.h[1].register_forward_hook(poison)
    watch = LawWatch(gpt2, probe, every=1, max_overhead=None, directory=tmp_path / "lw")
    with caplog.at_level(logging.WARNING, logger="lawwatch"):
        loop(watch, range(1, 4))
        watch.close()
        watch.close()
    said = [r for r in caplog.records if "this run measured nothing" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR
    assert "last attempted at step 3" in said[0].getMessage()
    assert str(tmp_path / "lw") in said[0].getMessage()
    assert not (tmp_path / "lw" / "law.png").exists()


def test_docs_quickstart_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "raw-loop.md").read_text()
    first, resume, *_ = re.findall(r"```python\n(.*?)```", text, re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(first, "docs/raw-loop.md", "exec"), namespace)
    directory = tmp_path / "run" / "lawwatch"
    before = read_history(directory).records
    steps = [r["step"] for r in before]
    # the schedule's steps (1, 2, 4, 8, 12) less what the default overhead budget skipped; the
    # first call and the last step always
    assert steps == sorted(set(steps)) and set(steps) <= {1, 2, 4, 8, 12}
    assert steps[0] == 1 and steps[-1] == 12
    assert 8 in steps  # checkpointed (checkpoint=True): measured whatever the budget decided
    assert (directory / "law.png").read_bytes()[:4] == b"\x89PNG"
    exec(compile(resume, "docs/raw-loop.md", "exec"), namespace)  # the state idiom, as shown
    after = read_history(directory).records
    kept = [r for r in before if r["step"] <= 8]  # the checkpoint's records, unchanged
    assert after[: len(kept)] == kept and after[-1]["step"] == 12
    assert [r["step"] for r in after] == sorted({r["step"] for r in after})
    # the budget's decision rode in the checkpoint: the resumed run measured the same steps
    assert [r["step"] for r in after] == steps
