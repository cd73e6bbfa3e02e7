"""TensorBoard: scalars, a custom-scalars layout, the PR table as text, the report image."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lawwatch.history import Snapshot
from lawwatch.output.sinks import PREFIX, scalars
from lawwatch.output.trackers.base import (
    Tracker,
    table_rows,
)

if TYPE_CHECKING:
    from lawwatch.output.trackers.opening import TrainerRun


class TensorBoardSink(Tracker):
    """Snapshots into a TensorBoard ``SummaryWriter`` (torch's or tensorboardX's).

    Each snapshot: every :func:`~lawwatch.output.sinks.scalars` key as a scalar at the snapshot's
    step (TensorBoard stores float32), and ``lawwatch/pr_table`` as a text (a markdown table of
    layer, PR, log10 PR). On creation a custom-scalars layout puts every ``lawwatch/pr/layer_XX``
    on one chart ("lawwatch / PR by layer", the CUSTOM SCALARS tab). At train end the report PNG
    goes in as the image ``lawwatch/report``.

    Args:
        writer: The writer.
        history: Records to replay first (a resumed run).
        own: Whether :meth:`close` closes the writer (lawwatch opened it).
    """

    name = "tensorboard"
    names: ClassVar[tuple[str, ...]] = ("tensorboard",)

    @classmethod
    def current(cls, run: TrainerRun) -> TensorBoardSink:
        """On lawwatch's own writer in the Trainer's directory (:meth:`TrainerRun.tensorboard_dir`).

        TensorBoard reads every event file of a directory as one run: the Trainer's curves and
        lawwatch's share it.
        """
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from tensorboardX import SummaryWriter

        return cls(SummaryWriter(log_dir=str(run.tensorboard_dir())), own=True)

    def __init__(
        self, writer: Any, *, history: Iterable[dict[str, Any]] | None = None, own: bool = False
    ) -> None:
        super().__init__()
        self.writer, self.own = writer, own
        writer.add_custom_scalars(
            {
                "lawwatch": {
                    "PR by layer": ["Multiline", [rf"{PREFIX}pr/layer_\d+"]],
                    "Pearson r": ["Multiline", [f"{PREFIX}pearson_r"]],
                    "decay ratio rho": ["Multiline", [f"{PREFIX}rho"]],
                }
            }
        )
        self.replay(history)

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in scalars(snapshot).items():
            self.writer.add_scalar(key, value, step)
        lines = [f"step {step}", "", "| layer | PR | log10 PR |", "|---:|---:|---:|"]
        lines += [
            f"| {layer} | {pr:.6f} | {'' if lg is None else f'{lg:.6f}'} |"
            for _, layer, pr, lg in table_rows(record)
        ]
        self.writer.add_text(f"{PREFIX}pr_table", "\n".join(lines), step)
        self.writer.flush()

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """The PNG as image ``lawwatch/report`` at the latest step."""
        if image is None:
            return
        from matplotlib.image import imread

        pixels = imread(str(image))  # (H, W, 4) float32 in [0, 1] for a PNG
        self.writer.add_image(
            f"{PREFIX}report", pixels, self.history.last_step or 0, dataformats="HWC"
        )
        self.writer.flush()

    def close(self) -> None:
        """Close the writer if lawwatch opened it."""
        if self.own:
            self.writer.close()
