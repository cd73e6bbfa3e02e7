"""The PNG of the law over training, and the report: figures in three formats, one HTML page."""

import base64
from html.parser import HTMLParser
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

from lawwatch import History, fit_law
from lawwatch.law import emergence_step
from lawwatch.output import store
from lawwatch.report import FIGURES, plot_law, select_steps, write_report

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


# -- the report: figures in three formats and a self-contained HTML page ------------------------


class Cells(HTMLParser):
    """Every number cell of the page, and every attribute that could fetch something."""

    def __init__(self):
        super().__init__()
        self.rows, self.row, self.tables, self.links = [], {}, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append(attrs)
        elif tag == "tr":
            self.row = {"table": self.tables[-1], **attrs}
            self.rows.append(self.row)
        elif tag == "td" and "data-value" in attrs:
            self.row[attrs["data-field"]] = attrs["data-value"]
        for name in ("src", "href", "srcset", "action", "data"):
            if name in attrs:
                self.links.append(attrs[name])


def write_history(directory, steps, entries=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, step in enumerate(steps):
        decay = 1.0 - 0.5 * i / len(steps)
        noise = 1 + 0.05 * torch.rand(entries, generator=gen, dtype=torch.float64)
        pr = 0.9 * decay ** torch.arange(entries, dtype=torch.float64) * noise
        fit = fit_law(pr).as_dict()
        rows.append({"step": step, "pr": pr.tolist(), "layers": list(range(entries)), **fit})
        rows[-1].update(n_tokens=500, seconds=0.1)
    store.write_history(History(rows), directory)
    return rows


def test_report_files_are_valid_and_the_page_holds_the_numbers(tmp_path):
    first = write_history(tmp_path / "a" / "lawwatch", [0, 1, 2, 4, 8, 16, 100, 200])
    second = write_history(tmp_path / "b", [0, 10, 20, 30], entries=9, seed=1)
    # a Trainer output_dir is read from its lawwatch/ folder
    report = write_report(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "out", labels=["gpt <2>", "llama"]
    )
    assert report.html == tmp_path / "out" / "report.html"
    assert set(report.figures) == set(FIGURES)
    for formats in report.figures.values():
        assert formats["png"].read_bytes()[:8] == PNG_MAGIC
        assert ElementTree.parse(formats["svg"]).getroot().tag == "{http://www.w3.org/2000/svg}svg"
        assert formats["pdf"].read_bytes()[:5] == b"%PDF-"

    page = report.html.read_text()
    cells = Cells()
    cells.feed(page)
    # self-contained: nothing fetched from anywhere, only inline data and the sibling files
    assert "http" not in page.lower() and "<script" not in page and "<link" not in page
    assert all(
        link.startswith("data:image/svg+xml;base64,") or "/" not in link for link in cells.links
    )
    for link in cells.links:
        if link.startswith("data:"):
            svg = base64.b64decode(link.split(",", 1)[1])
            assert ElementTree.fromstring(svg).tag.endswith("svg")
        else:
            assert (tmp_path / "out" / link).is_file()
    assert "gpt &lt;2&gt;" in page  # labels are escaped

    # every snapshot's numbers, exactly as in the history
    for run, records in enumerate([first, second]):
        rows = [r for r in cells.rows if r["table"].get("class") == "snapshots"]
        rows = [r for r in rows if r["table"]["data-run"] == str(run) and "step" in r]
        assert [int(r["step"]) for r in rows] == [rec["step"] for rec in records]
        for row, record in zip(rows, records, strict=True):
            for key in ("rho", "pearson_r", "slope", "intercept", "r2"):
                assert float(row[key]) == record[key]
        # the latest snapshot: PR per entry and its deviation from the line (numpy reference)
        latest = [r for r in cells.rows if r["table"].get("class") == "latest"]
        latest = [r for r in latest if r["table"]["data-run"] == str(run) and "entry" in r]
        last = records[-1]
        assert [float(r["pr"]) for r in latest] == last["pr"]
        x = np.arange(1, len(last["pr"]))
        y = np.log10(last["pr"][1:])
        slope, intercept = np.polyfit(x - 1, y, 1)
        expected = 100 * (10 ** (y - (intercept + slope * (x - 1))) - 1)
        shown = [float(r["deviation_percent"]) for r in latest[1:]]
        assert shown == pytest.approx(expected, abs=1e-9)
        assert "deviation_percent" not in latest[0]  # the embeddings are not fitted
    runs = [r for r in cells.rows if r["table"].get("class") == "runs" and "step" in r]
    assert [int(r["step"]) for r in runs] == [200, 30]
    expected = [
        emergence_step([r["step"] for r in rs], [r["pearson_r"] for r in rs])
        for rs in (first, second)
    ]
    assert [r.get("emergence_step") for r in runs] == [
        None if e is None else str(e) for e in expected
    ]


def test_report_is_reproducible_and_checks_its_input(tmp_path):
    write_history(tmp_path / "a", [0, 5])
    one = write_report([tmp_path / "a"], tmp_path / "x", formats=("svg", "pdf"), steps=[0, 4])
    two = write_report([tmp_path / "a"], tmp_path / "y", formats=("svg", "pdf"), steps=[0, 4])
    for stem in FIGURES:
        for fmt in ("svg", "pdf"):
            assert one.figures[stem][fmt].read_bytes() == two.figures[stem][fmt].read_bytes()
    assert not (tmp_path / "x" / "law_layers.png").exists()
    with pytest.raises(ValueError, match="labels"):
        write_report([tmp_path / "a"], tmp_path / "z", labels=["a", "b"])
    with pytest.raises(ValueError, match="formats"):
        write_report([tmp_path / "a"], tmp_path / "z", formats=("jpg",))
    with pytest.raises(FileNotFoundError, match=r"No history\.jsonl"):
        write_report([tmp_path / "nothing"], tmp_path / "z")
    store.write_history(History([{"step": 0}]), tmp_path / "empty")
    with pytest.raises(ValueError, match="no snapshot with PRs"):
        write_report([tmp_path / "empty"], tmp_path / "z")


def test_select_steps_spreads_over_log_steps():
    assert select_steps([0, 1, 2]) == [0, 1, 2]
    picked = select_steps(list(range(0, 10001)), count=5)
    assert picked[0] == 0 and picked[-1] == 10000 and len(picked) == 5
    assert picked[1] < 100  # log-spaced: the early steps where the law forms


def test_report_command(tmp_path, capsys):
    from lawwatch import cli

    write_history(tmp_path / "a", [0, 3, 9])
    write_history(tmp_path / "b", [0, 3], seed=2)
    argv = ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "r")]
    assert cli.main([*argv, "--label", "one", "--label", "two", "--formats", "png"]) == 0
    assert str(tmp_path / "r" / "report.html") in capsys.readouterr().out
    assert sorted(p.suffix for p in (tmp_path / "r").iterdir()) == [".html"] + [".png"] * 4
    assert cli.main([*argv, "--label", "one"]) == 2
    assert "2 histories" in capsys.readouterr().err
    write_history(tmp_path / "single", [7])  # one snapshot: every figure still draws
    assert cli.main(["report", str(tmp_path / "single"), "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("*.pdf"))) == 4


def test_a_pr_of_zero_is_refused_with_the_reason(tmp_path, capsys):
    from lawwatch import cli

    pr = [0.9, 0.5, 0.0, 0.2]  # entry 2 interpolated: log10 0 is undefined
    record = {"step": 3, "pr": pr, **fit_law(torch.tensor([0.9, 0.5, 0.3, 0.2])).as_dict(),
              "n_tokens": 10, "seconds": 0.0}  # fmt: skip
    store.write_history(History([record]), tmp_path / "run")
    assert cli.main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "step 3 has PR 0.0 at entry 2" in err and "larger probe" in err
    assert "math domain error" not in err


@pytest.mark.parametrize("threshold", ["5", "nan", "-2", "inf", "strong"])
def test_report_refuses_an_emergence_threshold_that_is_not_a_pearson_r(threshold, tmp_path, capsys):
    from lawwatch import cli

    write_history(tmp_path / "a", [0, 3, 9])
    argv = ["report", str(tmp_path / "a"), "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--emergence-threshold", threshold])
    assert exited.value.code == 2 and not (tmp_path / "r").exists()
    err = capsys.readouterr().err
    assert f"--emergence-threshold: {threshold!r} is not a Pearson r" in err
    assert "in [-1, 1]" in err
    assert cli.main([*argv, "--emergence-threshold", "-0.9"]) == 0
