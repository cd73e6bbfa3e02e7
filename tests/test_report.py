"""The PNG of the law over training."""

import pytest
import torch

from lawwatch import fit_law
from lawwatch.report import plot_law

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def records(steps, entries=7):
    out = []
    for i, step in enumerate(steps):
        decay = 1.0 - 0.02 * i
        pr = 0.9 * decay ** torch.arange(entries, dtype=torch.float64) + 0.01 * torch.rand(entries)
        out.append({"step": step, "pr": pr.tolist(), **fit_law(pr).as_dict()})
    return out


def test_png_of_the_law(tmp_path):
    import matplotlib
    from matplotlib.image import imread

    backend = matplotlib.get_backend()
    path = plot_law(records([0, 1, 2, 4, 8, 100, 200]), tmp_path / "sub" / "law.png")
    assert path == tmp_path / "sub" / "law.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert imread(path).shape == (576, 1440, 4)  # 12 x 4.8 inches at 120 dpi, RGBA
    assert matplotlib.get_backend() == backend  # the caller's backend is left alone


def test_changing_layer_count_and_one_snapshot(tmp_path):
    mixed = records([0, 10], entries=5) + records([20], entries=7)
    assert plot_law(mixed, tmp_path / "a.png").stat().st_size > 0
    assert plot_law(records([0]), tmp_path / "b.png").stat().st_size > 0


def test_nothing_to_plot(tmp_path):
    with pytest.raises(ValueError, match="No snapshot"):
        plot_law([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="No snapshot"):
        plot_law([{"step": None, "pr": [1.0, 0.5, 0.2, 0.1]}], tmp_path / "x.png")
