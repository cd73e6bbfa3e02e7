"""One process's share of a solve: the status buffer every kind of statistics gathers.

A solve beside training (``solve_owned`` of any :class:`~lawwatch.stats.Statistics`) must never
raise on one process while the others wait in a collective, so each process keeps what it
solved in one float64 buffer, a status first (0 solved, 1 failed), with its own error beside it;
``gather_owned`` then exchanges the buffers (or only the statuses) and every process raises, or
none does. :class:`Owned` is that buffer; :func:`place` is where this process stands in a
group (one process alone when no process group is formed, so a single process solves through
the same calls).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Owned", "place"]


def place(group: object | None = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` without a group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass(frozen=True)
class Owned:
    """One process's share of a solve (``solve_owned`` of any :class:`~lawwatch.stats.Statistics`).

    Attributes:
        buffer: ``(1 + size,)`` float64: status (0 solved, 1 failed) then the values this
            process solved, NaN-padded to ``size`` (for
            :class:`~lawwatch.stats.residual.ResidualStats`: the PRs of its own entries, padded
            to the largest share, so every process gathers the same size).
        error: The exception of a failed solve on this process, else None.
    """

    buffer: torch.Tensor
    error: BaseException | None

    @classmethod
    def solve(
        cls, size: int, device: torch.device, values: Callable[[], torch.Tensor | None]
    ) -> Owned:
        """Run ``values()`` (this process's values, or None for none) into a new buffer.

        Never raises: a failure sets the status and is kept as :attr:`error`.
        """
        buffer = torch.full((1 + size,), float("nan"), dtype=torch.float64, device=device)
        buffer[0] = 0.0  # status: 0 ok, 1 the solve failed here
        try:
            solved = values()
            if solved is not None:
                buffer[1 : 1 + solved.numel()] = solved
        except Exception as caught:  # decided collectively in gather_owned
            buffer[0] = 1.0
            return cls(buffer, caught)
        return cls(buffer, None)

    def raise_failure(self, failed: str | None) -> None:
        """Raise if the solve failed anywhere: this process's own error first.

        Args:
            failed: The other processes whose solve failed, in words (None: none did).
        """
        if self.error is not None:
            raise self.error
        if failed is not None:
            raise RuntimeError(f"lawwatch: the solve failed on {failed} of the group.")
