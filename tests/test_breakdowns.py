"""Breakdowns: probe groups and target masks, the law per group, the lens per group and position.

Every number is checked against an independent float64 reference (numpy lstsq on features from
a float64 copy of the model; the logit lens by definition), and per-group PR against measuring
the group's sequences alone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import warnings

import numpy as np
import pytest
import torch

import lawwatch
from lawwatch import MeasureConfig, ProbeSet, measure
from lawwatch.history import COST_OPTIONS, History, Snapshot
from lawwatch.output.sinks import scalars
from lawwatch.stats.build import position_labels
from tests.helpers.lens_reference import lens_reference
from tests.helpers.models import char_tokenizer, ragged_probe, tiny_gpt2
from tests.helpers.reference import layer_norm, ols_pr

D = 16  # the tiny models' hidden size


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2(seed=1).double()


def grouped_probe(seed: int = 4) -> ProbeSet:
    """16 ragged rows in groups x (6 rows), y (7 rows), z (3 rows, too few examples for d=16),
    with a target mask that leaves out every fourth token and all of rows 3 and 11."""
    base = ragged_probe(seed=seed, rows=16, max_len=24)
    groups = ["x", "y"] * 6 + ["y", "z", "z", "z"]
    lengths = base.attention_mask.sum(dim=1)
    lengths[13:] = 3  # group z: 3 rows of 3 tokens
    mask = torch.arange(base.input_ids.shape[1])[None] < lengths[:, None]
    marks = mask.clone()
    marks[:, ::4] = False
    marks[[3, 11]] = False
    return ProbeSet(base.input_ids, mask, groups=groups, target_mask=marks)


def examples_of(probe: ProbeSet) -> list[tuple[int, int]]:
    """(sequence, position) of every example, by the definition written out as a loop."""
    ids, real = probe.attention_mask.numpy(), probe.target_mask
    marks = real.numpy() if real is not None else ids
    return [
        (s, j)
        for s in range(ids.shape[0])
        for j in range(ids.shape[1] - 1)
        if ids[s, j] and ids[s, j + 1] and marks[s, j + 1]
    ]


def reference_pr(model, probe: ProbeSet, rows: list[tuple[int, int]]) -> np.ndarray:
    """PR of every entry over the examples ``rows``: a float64 copy of the model, one unpadded
    sequence at a time, a fresh LayerNorm on every entry but the last, numpy lstsq."""
    m = copy.deepcopy(model).double().eval()
    by_seq: dict[int, list[int]] = {}
    for s, j in rows:
        by_seq.setdefault(s, []).append(j)
    feats, targets = None, []
    for s, js in by_seq.items():
        ids = probe.input_ids[s][probe.attention_mask[s]]
        with torch.no_grad():
            hidden = m.base_model(ids[None], output_hidden_states=True).hidden_states
        per_entry = [layer_norm(h[0].numpy()) for h in hidden[:-1]] + [hidden[-1][0].numpy()]
        feats = [[] for _ in per_entry] if feats is None else feats
        for bucket, h in zip(feats, per_entry, strict=True):
            bucket.append(h[js])
        targets.append(ids.numpy()[np.array(js) + 1])
    y = np.concatenate(targets).astype(np.float64)
    return np.array([ols_pr(np.concatenate(f), y) for f in feats])


def quiet_measure(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return measure(*args, **kwargs)


# -- the probe ---------------------------------------------------------------------------------


def test_a_probe_without_groups_keeps_its_content_hash():
    probe = ragged_probe(seed=1)
    h = hashlib.sha256()  # the hash as it always was: shape, tokens, mask
    h.update(str(tuple(probe.input_ids.shape)).encode())
    h.update(probe.input_ids.numpy().tobytes())
    h.update(probe.attention_mask.numpy().tobytes())
    assert probe.content_hash() == h.hexdigest()
    grouped = ProbeSet(probe.input_ids, probe.attention_mask, groups=["a"] * len(probe))
    relabelled = ProbeSet(probe.input_ids, probe.attention_mask, groups=["b"] * len(probe))
    masked = ProbeSet(probe.input_ids, probe.attention_mask, target_mask=probe.attention_mask)
    hashes = {p.content_hash() for p in (probe, grouped, relabelled, masked)}
    assert len(hashes) == 4  # the labels and the mask enter the hash


def test_groups_and_target_mask_survive_save_load_shard_and_select(tmp_path):
    probe = grouped_probe()
    loaded = ProbeSet.load(probe.save(tmp_path / "p.safetensors"))
    assert loaded.content_hash() == probe.content_hash()
    assert loaded.groups == probe.groups and loaded.group_names == ("x", "y", "z")
    assert torch.equal(loaded.target_mask, probe.target_mask)
    shards = [probe.shard(r, 3) for r in range(3)]
    assert all(s.group_names == probe.group_names for s in shards)  # every name, even absent
    assert shards[2].group_examples()["x"] == 0
    total = {name: sum(s.group_examples()[name] for s in shards) for name in probe.group_names}
    assert total == probe.group_examples()
    assert sum(total.values()) == probe.num_examples() == len(examples_of(probe))
    alone = probe.group("y")
    assert alone.groups == ["y"] * 7 and alone.num_examples() == total["y"]


def test_edited_group_names_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = grouped_probe().save(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata["group_names"] = json.dumps(["y", "x", "z"])  # swap two groups' names
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(ValueError, match="content hash"):
        ProbeSet.load(path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": ["a"] * 3}, "3 labels for 4 sequences"),
        ({"groups": ["a", "b", "", "a"]}, "non-empty"),
        ({"groups": ["a", "b/c", "a", "a"]}, "'/'"),
        ({"groups": ["a"] * 4, "group_names": ["b"]}, "not among group_names"),
        ({"target_mask": torch.ones(4, 6, dtype=torch.bool)}, "padding position"),
    ],
)
def test_bad_groups_and_masks_are_refused(kwargs, match):
    ids = torch.ones(4, 6, dtype=torch.long)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 4:] = False
    with pytest.raises(ValueError, match=match):
        ProbeSet(ids, mask, **kwargs)


def test_from_texts_groups_dict_pack_and_target_spans():
    tok = char_tokenizer()
    texts = {"law": ["the law of equi-learning"] * 3, "layer": ["each layer cuts"] * 2}
    probe = ProbeSet.from_texts(texts, tok, max_length=8)
    assert probe.groups == ["law"] * 3 + ["layer"] * 2
    same = ProbeSet.from_texts(
        [*texts["law"], *texts["layer"]], tok, max_length=8, groups=probe.groups
    )
    assert same.content_hash() == probe.content_hash()
    packed = ProbeSet.from_texts(texts, tok, max_length=8, pack=True)
    assert set(packed.groups) == {"law", "layer"}  # each group packed apart
    drawn = ProbeSet.from_texts(texts, tok, max_length=64, num_texts=3, seed=1)
    assert len(drawn.groups) == 3
    text = "the law of equi-learning"
    start = text.index("equi")
    spanned = ProbeSet.from_texts([text], tok, max_length=64, target_spans=[[(start, len(text))]])
    offsets = tok([text], return_offsets_mapping=True)["offset_mapping"][0]
    want = [hi > start for _, hi in offsets]
    assert spanned.target_mask[0, : len(offsets)].tolist() == want
    with pytest.raises(ValueError, match="not with pack"):
        ProbeSet.from_texts([text], tok, max_length=8, pack=True, target_spans=[[(0, 3)]])


def test_from_dataset_group_column():
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict(
        {
            "text": ["the law of equi-learning", "each layer cuts", "by the same factor"],
            "lang": ["en", "fr", "en"],
        }
    )
    probe = ProbeSet.from_dataset(data, char_tokenizer(), max_length=16, group_column="lang")
    assert probe.groups == ["en", "fr", "en"] and probe.meta["group_column"] == "lang"
    drawn = ProbeSet.from_dataset(
        data, char_tokenizer(), max_length=16, group_column="lang", num_texts=2, seed=3
    )
    assert len(drawn.groups) == 2
    with pytest.raises(ValueError, match="no column 'language'"):
        ProbeSet.from_dataset(data, char_tokenizer(), max_length=16, group_column="language")


# -- the law per group, the target mask ------------------------------------------------------


@pytest.fixture(scope="module")
def grouped(model):
    probe = grouped_probe()
    snap = quiet_measure(
        model, probe, by_group=True, lens=1.0, position_buckets=4, jackknife=None, batch_size=5
    )
    return probe, snap.to_record()


def test_target_mask_pr_equals_reference(model, grouped):
    probe, record = grouped
    rows = examples_of(probe)
    assert record["n_tokens"] == len(rows)
    np.testing.assert_allclose(record["pr"], reference_pr(model, probe, rows), rtol=0, atol=1e-8)
    # the headline is the same with and without the breakdowns
    plain = quiet_measure(model, probe, jackknife=None, batch_size=5)
    np.testing.assert_allclose(record["pr"], plain.pr.numpy(), rtol=0, atol=1e-12)


def test_group_pr_equals_reference_and_the_group_alone(model, grouped):
    probe, record = grouped
    rows = examples_of(probe)
    for name in ("x", "y"):
        group = record["groups"][name]
        mine = [(s, j) for s, j in rows if probe.groups[s] == name]
        assert group["n_tokens"] == len(mine)
        want = reference_pr(model, probe, mine)
        np.testing.assert_allclose(group["pr"], want, rtol=0, atol=1e-8)
        alone = quiet_measure(model, probe.group(name), jackknife=None, batch_size=3)
        np.testing.assert_allclose(group["pr"], alone.pr.numpy(), rtol=0, atol=1e-9)
        assert group["pearson_r"] == pytest.approx(alone.fit.pearson_r, abs=1e-9)
        assert group["rho"] == pytest.approx(alone.fit.rho, abs=1e-9)


def test_a_group_with_too_few_examples_gets_no_number_but_the_reason(grouped):
    _, record = grouped
    z = record["groups"]["z"]
    assert z["pr"] is None and "pearson_r" not in z
    assert "Too few probe examples" in z["error"] and str(D + 2) in z["error"]


def test_an_empty_group_and_a_single_group(model):
    probe = grouped_probe()
    named = ProbeSet(  # a group no sequence carries
        probe.input_ids,
        probe.attention_mask,
        groups=probe.groups,
        group_names=["x", "y", "z", "w"],
    )
    record = quiet_measure(model, named, by_group=True, jackknife=None).to_record()
    assert record["groups"]["w"] == {
        "n_tokens": 0,
        "pr": None,
        "error": "group 'w' holds no example",
    }
    one = ProbeSet(probe.input_ids, probe.attention_mask, groups=["all"] * len(probe))
    record = quiet_measure(model, one, by_group=True, jackknife=None).to_record()
    np.testing.assert_allclose(record["groups"]["all"]["pr"], record["pr"], rtol=0, atol=1e-12)


def test_lens_per_group_and_position_bucket_equal_the_reference(model, grouped):
    probe, record = grouped
    rows = examples_of(probe)
    lengths = probe.attention_mask.sum(dim=1).tolist()
    labels = position_labels(4)
    parts = {("groups", n): [r for r in rows if probe.groups[r[0]] == n] for n in "xyz"}
    for b, label in enumerate(labels):
        parts[("positions", label)] = [(s, j) for s, j in rows if j * 4 // lengths[s] == b]
    assert sum(len(parts[("positions", b)]) for b in labels) == len(rows)
    for (axis, label), mine in parts.items():
        got = record[axis][label]["lens"] if axis == "groups" else record[axis][label]
        assert got["examples"] == len(mine)
        if not mine:
            assert all(math.isnan(v) for v in got["top1"])
            continue
        ref = lens_reference(model, probe, rows=mine)
        for metric in ("top1", "ce", "kl", "entropy"):
            np.testing.assert_allclose(got[metric], ref[metric], rtol=0, atol=1e-9)
        assert got["first_correct"] == ref["first_correct"] and got["final"] == ref["final"]
        for key in ("first_correct_mean", "final_mean", "gap_mean"):
            assert (got[key] is None) == (ref[key] is None)
            if ref[key] is not None:
                assert got[key] == pytest.approx(ref[key], abs=1e-12)
    whole = lens_reference(model, probe, rows=rows)
    np.testing.assert_allclose(record["lens"]["ce"], whole["ce"], rtol=0, atol=1e-9)


def test_a_mask_that_selects_nothing_is_refused_with_the_reason(model):
    probe = ragged_probe(seed=2)
    none = ProbeSet(probe.input_ids, probe.attention_mask, target_mask=probe.attention_mask & False)
    with pytest.raises(ValueError, match="no example"):
        quiet_measure(model, none)


# -- options, refusals -------------------------------------------------------------------------


def test_options_are_checked():
    with pytest.raises(ValueError, match="split"):
        MeasureConfig(by_group=True, split=0.3)
    with pytest.raises(ValueError, match="metric"):
        MeasureConfig(by_group=True, metric="separation_fuzziness")
    with pytest.raises(ValueError, match="needs lens"):
        MeasureConfig(position_buckets=4)
    with pytest.raises(ValueError, match="positive"):
        MeasureConfig(position_buckets=0, lens=1.0)
    assert {"by_group", "max_group_bytes", "position_buckets"} <= COST_OPTIONS


def test_by_group_needs_groups_and_fits_the_budget_before_training(model):
    probe = ragged_probe(seed=2)
    with pytest.raises(ValueError, match="carries no groups"):
        lawwatch.LawWatch(model, probe, by_group=True)
    grouped = grouped_probe()
    # 3 groups x 5 entries x ((16+1)^2 + 16) x 8 bytes = 36,600 bytes
    with pytest.raises(ValueError, match=r"At most 2 groups fit"):
        lawwatch.LawWatch(model, grouped, by_group=True, max_group_bytes=30_000)
    lawwatch.LawWatch(model, grouped, by_group=True, max_group_bytes=36_600)


# -- records, history, trackers, report ---------------------------------------------------------


def test_record_round_trip_and_tracker_keys(grouped):
    _, record = grouped
    snap = Snapshot.from_record(json.loads(json.dumps(record)))
    assert snap.to_record() == json.loads(json.dumps(record))
    values = scalars(snap)
    x = record["groups"]["x"]
    assert values["lawwatch/group/x/pearson_r"] == x["pearson_r"]
    assert values["lawwatch/group/x/pr/layer_03"] == x["pr"][3]
    assert values["lawwatch/group/x/lens/examples"] == x["lens"]["examples"]
    assert values["lawwatch/group/x/lens/ce/layer_02"] == x["lens"]["ce"][2]
    assert values["lawwatch/group/z/n_tokens"] == record["groups"]["z"]["n_tokens"]
    assert "lawwatch/group/z/pearson_r" not in values
    assert values["lawwatch/position/0-25/lens/examples"] == record["positions"]["0-25"]["examples"]
    assert all(math.isfinite(v) for v in values.values())
    history = History([{**record, "step": 0}, {**record, "step": 5}])
    assert history.group_names() == ["x", "y", "z"]
    steps, r = history.group_series("x", "pearson_r")
    assert steps == [0, 5] and r == [x["pearson_r"]] * 2
    assert history.group_series("z", "pearson_r") == ([], [])
    from lawwatch.output.console import ConsoleSink

    line = ConsoleSink.line(snap)
    assert line.endswith(
        f"; r by group: x {x['pearson_r']:.3f}, y {record['groups']['y']['pearson_r']:.3f}, z —"
    )


def test_report_draws_a_figure_per_group_and_per_position(grouped, tmp_path):
    from lawwatch.output.store import LocalHistory
    from lawwatch.report import write_report

    _, record = grouped
    sink = LocalHistory(tmp_path / "run")
    for step in (0, 10):
        sink.write(Snapshot.from_record({**record, "step": step}))
    sink.close()
    report = write_report([tmp_path / "run"], tmp_path / "report", formats=("png",))
    assert {"groups", "positions"} <= set(report.figures)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Per group of the probe" in page and "position bucket" in page


def test_probe_build_groups_by_file_and_by_dataset_column(tmp_path, capsys):
    from lawwatch import cli

    tokenizer = tmp_path / "tokenizer"
    char_tokenizer().save_pretrained(tokenizer)
    (tmp_path / "code.txt").write_text("def law(x):\n    return x\n\nfor layer in range(3): pass")
    (tmp_path / "prose.txt").write_text("the law of equi-learning\n\neach layer cuts the residual")
    out = tmp_path / "probe.safetensors"
    argv = ["probe", "build", "--texts", str(tmp_path / "*.txt"), "--group-by-file"]
    argv += ["--tokenizer", str(tokenizer), "--max-length", "16", "--text-unit", "paragraph"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    probe = ProbeSet.load(out)
    assert probe.groups == ["code.txt"] * 2 + ["prose.txt"] * 2
    assert "group code.txt:" in capsys.readouterr().out
    assert cli.main(["probe", "show", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["groups"] == probe.group_examples() and shown["summary"]["groups"] == 2
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "code.txt").write_text("x = 1")
    argv[3] = str(tmp_path / "**" / "*.txt")
    assert cli.main([*argv, "--out", str(out)]) == 2  # two files named code.txt
    assert "share the file name" in capsys.readouterr().err
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"text": ["the law", "each layer"], "kind": ["a", "b"]})
    data.save_to_disk(tmp_path / "data")
    argv = ["probe", "build", "--dataset", str(tmp_path / "data"), "--group-column", "kind"]
    argv += ["--tokenizer", str(tokenizer), "--max-length", "16", "--out", str(out)]
    assert cli.main(argv) == 0 and ProbeSet.load(out).groups == ["a", "b"]


def test_groups_beside_the_jackknife_and_one_hot_targets(model):
    # the headline keeps its jackknife; each group is in-sample PR over the whole probe's classes
    probe = grouped_probe()
    record = quiet_measure(model, probe, by_group=True, target="onehot", jackknife=4).to_record()
    assert record["jackknife_groups"] == 4 and "pearson_r_se" not in record["groups"]["x"]
    alone = quiet_measure(model, probe.group("x"), target="onehot", jackknife=None)
    np.testing.assert_allclose(record["groups"]["x"]["pr"], alone.pr.numpy(), rtol=0, atol=1e-9)
