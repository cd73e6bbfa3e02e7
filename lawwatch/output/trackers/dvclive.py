"""DVCLive: metrics, the report image and a summary in its metrics file."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from lawwatch.history import Snapshot
from lawwatch.output.sinks import PREFIX, scalars
from lawwatch.output.trackers.base import (
    Tracker,
)

if TYPE_CHECKING:
    from lawwatch.output.trackers.opening import TrainerRun


class DVCLiveSink(Tracker):
    """Snapshots into a ``dvclive.Live``.

    DVCLive takes the step of a metric from ``live.step`` (a training loop advances it once per
    log call): for each snapshot the sink sets it to the snapshot's training step, logs every
    :func:`~lawwatch.output.sinks.scalars` key (files ``<live dir>/plots/metrics/lawwatch/
    ...tsv``), and puts the step back. The report PNG goes to
    ``<live dir>/plots/images/lawwatch/law.png`` and the latest values to the summary
    (``metrics.json``, key ``lawwatch``).

    A Live lawwatch opened itself (:meth:`open`, beside the training loop's own Live in the same
    directory) resumes the directory, so it removes nothing of the other's, and writes no
    ``dvc.yaml`` and no experiment; it never opens a DVC repository either (a plain ``Live``
    runs ``dvc init`` in the enclosing git repository and stages its files there), so lawwatch
    leaves the user's repository as it was. As the summary file is written whole by every Live
    of the directory, lawwatch merges its ``lawwatch`` key into the file on disk at
    :meth:`log_report` and :meth:`close`.

    Args:
        live: The Live.
        history: Records to replay first (a resumed run).
        own: Whether lawwatch opened ``live`` (:meth:`open`).
    """

    name = "dvclive"
    names: ClassVar[tuple[str, ...]] = ("dvclive",)

    @classmethod
    def current(cls, run: TrainerRun) -> DVCLiveSink:
        """On the Live given (``dvclive_live``: the ``DVCLiveCallback``'s), else its own."""
        if run.dvclive_live is not None:
            return cls(run.dvclive_live)
        return cls.open()

    def __init__(
        self, live: Any, *, history: Iterable[dict[str, Any]] | None = None, own: bool = False
    ) -> None:
        super().__init__()
        self.live, self.own = live, own
        self.replay(history)

    @classmethod
    def open(
        cls, directory: str | Path = "dvclive", *, history: Iterable[dict[str, Any]] | None = None
    ) -> DVCLiveSink:
        """A sink on lawwatch's own Live in ``directory`` (DVCLive's default: ``./dvclive``).

        The Live writes its files in ``directory`` and nothing else: no DVC repository is
        opened or made, no file staged, no experiment saved.
        """
        live = _files_only_live()(str(directory), resume=True, save_dvc_exp=False, dvcyaml=None)
        return cls(live, history=history, own=True)

    def _log(self, snapshot: Snapshot, record: dict[str, Any]) -> None:
        before = self.live.step
        self.live.step = record["step"]
        try:
            for key, value in scalars(snapshot).items():
                self.live.log_metric(key, value)
        finally:
            self.live.step = before

    def log_report(self, image: Path | None, files: Sequence[Path] = ()) -> None:
        """The PNG as an image; the summary written."""
        if image is not None:
            self.live.log_image(f"{PREFIX}law.png", str(image))
        self._summarize()

    def close(self) -> None:
        """Write the summary once more, if lawwatch opened the Live."""
        if self.own:
            self._summarize()

    def _summarize(self) -> None:
        if not self.own:
            self.live.make_summary()
            return
        key = PREFIX.rstrip("/")
        path = Path(self.live.metrics_file)
        summary = json.loads(path.read_text()) if path.is_file() else {}
        summary[key] = self.live.summary.get(key, {})
        path.write_text(json.dumps(summary, indent=4))


def _files_only_live() -> type:
    """``dvclive.Live`` that never opens a DVC repository (it writes its files only).

    ``Live.__init__`` calls ``_init_dvc``, which opens the enclosing DVC repository and, in a
    git repository without one, makes it (``dvc init``: ``.dvc/`` and ``.dvcignore``, staged
    in the user's index) whatever ``save_dvc_exp`` and ``dvcyaml`` say. lawwatch logs metrics
    and an image, which need no repository: the override keeps only the name of the
    ``dvc.yaml`` the Live would write (it writes none, ``dvcyaml=None``).
    """
    from dvclive import Live

    if not callable(getattr(Live, "_init_dvc", None)):  # a dvclive this was not written for
        raise RuntimeError(
            "lawwatch cannot open a DVCLive Live that leaves the git repository untouched with "
            "this dvclive version (no Live._init_dvc); pass your own Live to DVCLiveSink(live) "
            "or log to another tracker."
        )

    class FilesOnlyLive(Live):
        def _init_dvc(self) -> None:
            self._dvc_file = self._init_dvc_file()

    return FilesOnlyLive
