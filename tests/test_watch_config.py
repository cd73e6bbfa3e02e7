"""WatchConfig is the single source of the monitor's settings.

Each bad value is refused when the config is built, with the fix; the config round-trips
through a plain dict (the recipes' YAML); LawWatch, LawWatchCallback and AcceleratorWatch take
it, and route keyword overrides to it or to MeasureConfig by name.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lawwatch import LawWatch, MeasureConfig, ProbeSet, WatchConfig
from lawwatch.config import field_docs
from lawwatch.law import DEFAULT_EMERGENCE_THRESHOLD
from lawwatch.watch.config import DEFAULT_MAX_OVERHEAD, build_configs
from lawwatch.watch.schedule import Schedule, planned
from tests.helpers.models import VOCAB, ragged_probe, tiny_gpt2
from tests.helpers.recipes import recipe_common


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"every": 0}, ValueError, "every must be a positive number of steps"),
        ({"every": -3}, ValueError, "every must be a positive number of steps"),
        ({"every": 2.5}, TypeError, r"every must be a whole number of steps \(an int\)"),
        ({"every": 10.0}, TypeError, "every must be a whole number of steps"),
        ({"every": True}, TypeError, "every must be a whole number of steps"),
        ({"every": "100"}, TypeError, "every must be a whole number of steps"),
        ({"schedule": 100}, TypeError, r"one number: for a period use every=100"),
        ({"schedule": "0,10"}, TypeError, "schedule must be a collection of steps"),
        ({"schedule": 1.5}, TypeError, "schedule must be a collection of steps"),
        ({"schedule": [0, 2.5]}, TypeError, r"schedule's steps must be ints"),
        ({"schedule": [0, True]}, TypeError, r"schedule's steps must be ints"),
        ({"schedule": [3, -1]}, ValueError, r"schedule's steps must be >= 0, got \[-1\]"),
        ({"last_step": -1}, ValueError, "last_step is the final training step"),
        ({"last_step": 9.0}, ValueError, "last_step is the final training step"),
        ({"emergence_threshold": -1.5}, ValueError, r"Pearson r in \[-1, 1\]"),
        ({"emergence_threshold": float("nan")}, ValueError, r"Pearson r in \[-1, 1\]"),
        ({"emergence_threshold": float("-inf")}, ValueError, r"Pearson r in \[-1, 1\]"),
        ({"emergence_threshold": "-0.9"}, TypeError, "emergence_threshold is a number"),
        ({"emergence_threshold": True}, TypeError, "emergence_threshold is a number"),
        ({"max_overhead": 0.0}, ValueError, r"max_overhead is a fraction .* in \(0, 1\)"),
        ({"max_overhead": 1.0}, ValueError, "max_overhead is a fraction"),
        ({"max_overhead": 2}, ValueError, "max_overhead is a fraction"),
        ({"max_overhead": "2%"}, ValueError, "max_overhead is a fraction"),
        ({"max_overhead": float("nan")}, ValueError, "max_overhead is a fraction"),
        ({"background": "yes"}, TypeError, "background is True or False"),
        ({"background": 1}, TypeError, "background is True or False"),
        ({"background_lag": 0}, ValueError, "background_lag must be at least 1 step"),
        ({"background_lag": 2.0}, TypeError, "background_lag is a number of steps"),
        ({"background_lag": False}, TypeError, "background_lag is a number of steps"),
        ({"evry": 5}, TypeError, r"Unknown monitor settings \['evry'\].*lawwatch\.WatchConfig"),
    ],
)
def test_bad_settings_are_refused_when_built(settings, error, match):
    with pytest.raises(error, match=match):
        WatchConfig.build(**settings)
    if "evry" not in settings:
        with pytest.raises(error, match=match):
            WatchConfig(**settings)


def test_defaults_and_every_field_documented():
    watch = WatchConfig()
    assert watch.every == 100 and watch.schedule is None and watch.last_step is None
    assert watch.emergence_threshold == DEFAULT_EMERGENCE_THRESHOLD
    assert watch.max_overhead == DEFAULT_MAX_OVERHEAD
    assert watch.background is False and watch.background_lag == 4
    docs = field_docs(WatchConfig)
    assert all(len(docs.get(name, "")) > 20 for name in WatchConfig.names())


@pytest.mark.parametrize(
    "watch",
    [
        WatchConfig(),
        WatchConfig(every=7, last_step=40, emergence_threshold=-0.9, max_overhead=0.02),
        WatchConfig(schedule=[30, 0, 10, 10], background=True, background_lag=2),
        WatchConfig(schedule=()),
    ],
)
def test_round_trips_through_a_plain_dict(watch):
    plain = watch.to_dict()
    assert WatchConfig.from_dict(plain) == watch
    assert hash(WatchConfig.from_dict(plain)) == hash(watch)
    assert set(plain) == set(WatchConfig.names())


def test_schedule_is_kept_sorted_and_frozen():
    watch = WatchConfig(schedule=[30, np.int64(0), 10, 10])
    assert watch.schedule == (0, 10, 30) and all(type(s) is int for s in watch.schedule)
    assert watch.to_dict()["schedule"] == [0, 10, 30]
    assert WatchConfig(schedule=iter([5, 1])).schedule == (1, 5)
    with pytest.raises(AttributeError):
        watch.every = 3
    assert watch.replace(every=3).every == 3 and watch.every == 100
    with pytest.raises(TypeError, match=r"watch must be a lawwatch\.WatchConfig"):
        WatchConfig.build({"every": 3})


def test_callable_schedule_is_kept_and_named_in_the_dict():
    def odd(step: int) -> bool:
        return step % 2 == 1

    watch = WatchConfig(schedule=odd, last_step=10)
    assert watch.schedule is odd and watch.to_dict()["schedule"] == "<function>"
    chosen = planned(watch)
    assert [s for s in range(11) if chosen(s)] == [1, 3, 5, 7, 9, 10]  # plus the final step


def test_planned_steps():
    assert planned(WatchConfig(every=50, last_step=123)) == Schedule(50, 123)
    chosen = planned(WatchConfig(schedule=[3, 7], last_step=9))
    assert [s for s in range(12) if chosen(s)] == [3, 7, 9]


def test_options_are_routed_by_name():
    assert not set(MeasureConfig.names()) & set(WatchConfig.names())
    config, watch = build_configs(None, WatchConfig(every=3), every=5, batch_size=2)
    assert watch == WatchConfig(every=5) and config == MeasureConfig(batch_size=2)
    config, watch = build_configs(MeasureConfig(offset=2), None, background=True)
    assert config == MeasureConfig(offset=2) and watch == WatchConfig(background=True)
    with pytest.raises(TypeError, match=r"Unknown measurement options \['layer'\]") as raised:
        build_configs(None, None, layer=2)
    assert "lawwatch.MeasureConfig" in str(raised.value)
    assert "lawwatch.WatchConfig" in str(raised.value) and "background_lag" in str(raised.value)
    with pytest.raises(TypeError, match=r"config must be a lawwatch\.MeasureConfig"):
        build_configs(WatchConfig(), None)
    with pytest.raises(TypeError, match=r"watch must be a lawwatch\.WatchConfig"):
        build_configs(None, MeasureConfig())


def test_every_entry_point_takes_the_config(gpt2, probe):
    from accelerate import Accelerator

    from lawwatch.integrations.accelerate import AcceleratorWatch
    from lawwatch.integrations.hf import LawWatchCallback

    watch = WatchConfig(every=3, max_overhead=0.5, emergence_threshold=-0.8)
    monitor = LawWatch(gpt2, probe, None, watch, batch_size=2)
    assert monitor.watch == watch and monitor.config == MeasureConfig(batch_size=2)
    assert LawWatch(gpt2, probe, watch=watch, every=4).watch == watch.replace(every=4)
    callback = LawWatchCallback(probe, watch=watch, background=True)
    assert callback.watch == watch.replace(background=True)
    assert callback.watch.emergence_threshold == -0.8
    accelerate = AcceleratorWatch(Accelerator(cpu=True), gpt2, probe, None, watch)
    assert accelerate.watch == watch
    with pytest.raises(ValueError, match="every must be a positive"):
        LawWatchCallback(probe, watch=watch, every=0)
    with pytest.raises(TypeError, match=r"Unknown measurement options \['evry'\]"):
        AcceleratorWatch(Accelerator(cpu=True), gpt2, probe, evry=3)


def test_the_recipes_refuse_a_bad_section():
    common = recipe_common()
    watch, measure = common.watch_settings({"every": 5, "schedule": [0, 5]})
    assert watch == WatchConfig(every=5, schedule=(0, 5)) and measure == MeasureConfig()
    with pytest.raises(SystemExit, match="last_step"):
        common.watch_settings({"last_step": 10})
    with pytest.raises(SystemExit, match="every must be a positive number of steps"):
        common.watch_settings({"every": 0})
    with pytest.raises(SystemExit, match="not monitor settings"):
        common.watch_settings({"batch_size": 2})


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"schedule": 10}, TypeError, "one number: for a period use every=10"),
        ({"schedule": "abc"}, TypeError, "schedule must be a collection of steps"),
        ({"schedule": [0, 3, "x"]}, TypeError, "schedule's steps must be ints"),
        ({"every": 2.5}, TypeError, "every must be a whole number of steps"),
        ({"every": True}, TypeError, "every must be a whole number of steps"),
        ({"emergence_threshold": 5}, ValueError, r"Pearson r in \[-1, 1\]"),
        ({"emergence_threshold": float("nan")}, ValueError, r"Pearson r in \[-1, 1\]"),
        ({"sinks": [object()]}, TypeError, "is not a sink: a sink has write"),
        ({"sinks": "history.jsonl"}, TypeError, "sinks must be a list of sinks"),
    ],
)
def test_every_entry_point_refuses_bad_settings_when_built(gpt2, probe, settings, error, match):
    """Not at train begin or at every snapshot, while training runs unmonitored."""
    from accelerate import Accelerator

    from lawwatch.integrations.accelerate import AcceleratorWatch
    from lawwatch.integrations.hf import LawWatchCallback

    with pytest.raises(error, match=match):
        LawWatchCallback(probe, **settings)
    with pytest.raises(error, match=match):
        LawWatch(gpt2, probe, **settings)
    with pytest.raises(error, match=match):
        AcceleratorWatch(Accelerator(cpu=True), gpt2, probe, **settings)


class _NoHead(torch.nn.Module):
    """Blocks and a final norm, and no head the logit lens could read through."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))
        self.final_norm = torch.nn.LayerNorm(16)

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.final_norm(x)


def _head(rows: int, width: int):
    """A tiny GPT-2 whose head has the wrong shape."""
    model = tiny_gpt2(0)
    model.lm_head = torch.nn.Linear(width, rows, bias=False)
    return model


_WIDTH = tiny_gpt2(0).config.n_embd
# (model, probe, options, error message): settings that fail at every snapshot, so that a
# monitor built with them would log an error per snapshot while training runs unmeasured
MODEL_REFUSALS = {
    "lens head not a module": (
        tiny_gpt2,
        ragged_probe,
        {"lens": 1.0, "lens_head": "nope"},
        "lens_head='nope' is not a module of GPT2LMHeadModel",
    ),
    "lens with no head": (
        _NoHead,
        ragged_probe,
        {"lens": 1.0, "blocks": "blocks", "final_norm": "final_norm"},
        "The logit lens needs the unembedding of _NoHead, and lawwatch found none",
    ),
    "lens head of the wrong width": (
        lambda: _head(VOCAB, _WIDTH + 3),
        ragged_probe,
        {"lens": 1.0},
        rf"shape \({VOCAB}, {_WIDTH + 3}\), which does not read a hidden state of width {_WIDTH}",
    ),
    "lens head of too few tokens": (
        lambda: _head(VOCAB - 40, _WIDTH),
        ragged_probe,
        {"lens": 1.0},
        rf"scores {VOCAB - 40} tokens, but the probe holds token id",
    ),
}
# settings refused without the model: the callback refuses them where it is built
OPTION_REFUSALS = {
    "stats_device cuda:99": (
        tiny_gpt2,
        ragged_probe,
        {"stats_device": "cuda:99"},
        r"stats_device='cuda:99', but this process has",
    ),
    "targets of one value": (
        tiny_gpt2,
        lambda: ProbeSet.from_tokens([[7] * 40, [7] * 30]),
        {},
        r"targets take a single distinct value \(token id 7 at offset=1\)",
    ),
}
if not torch.cuda.is_available():
    OPTION_REFUSALS["stats_device cuda without CUDA"] = (
        tiny_gpt2,
        ragged_probe,
        {"stats_device": "cuda"},
        r"stats_device='cuda', but this process has no CUDA device",
    )


@pytest.mark.parametrize("case", [*MODEL_REFUSALS, *OPTION_REFUSALS])
def test_monitors_refuse_what_would_fail_every_snapshot_when_built(case):
    """LawWatch and AcceleratorWatch refuse, as measure() does, before any snapshot."""
    from accelerate import Accelerator

    from lawwatch import measure
    from lawwatch.integrations.accelerate import AcceleratorWatch

    make, probe, options, match = {**MODEL_REFUSALS, **OPTION_REFUSALS}[case]
    with pytest.raises(ValueError, match=match):
        measure(make(), probe(), **options)
    with pytest.raises(ValueError, match=match):
        LawWatch(make(), probe(), **options)
    with pytest.raises(ValueError, match=match):
        AcceleratorWatch(Accelerator(cpu=True), make(), probe(), **options)


@pytest.mark.parametrize("case", list(OPTION_REFUSALS))
def test_the_callback_refuses_settings_it_can_check_without_the_model_when_built(case):
    from lawwatch.integrations.hf import LawWatchCallback

    _, probe, options, match = OPTION_REFUSALS[case]
    with pytest.raises(ValueError, match=match):
        LawWatchCallback(probe(), **options)


def test_the_callback_says_a_refusal_at_train_begin_in_one_line(tmp_path, caplog):
    """The model's settings are checked when the Trainer hands the model over: one ERROR line
    naming the reason (no traceback), no error per snapshot, and training completes."""
    from lawwatch.integrations.hf import LawWatchCallback
    from tests.helpers.trainer import make_trainer

    callback = LawWatchCallback(ragged_probe(), lens=1.0, lens_head="nope", every=1)
    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    with caplog.at_level(logging.ERROR, logger="lawwatch"):
        trainer.train()
    assert trainer.state.global_step == 3
    (record,) = [r for r in caplog.records if r.name == "lawwatch"]
    assert record.getMessage().startswith("lawwatch: this training is not measured: ")
    assert "lens_head='nope' is not a module of GPT2LMHeadModel" in record.getMessage()
    assert record.exc_info is None and callback.monitor is None
    assert not (tmp_path / "lawwatch" / "history.jsonl").exists()
