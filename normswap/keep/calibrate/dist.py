"""torch.distributed helpers of calibration and recovery."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ...errors import InputError


def _dist_group(dist: Any) -> tuple[bool, Any, int, int]:
    """(active, group, rank, world) from the ``dist`` argument (None = auto, False = off, a group)."""
    if dist is False:
        return False, None, 0, 1
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        if dist not in (None, True):
            raise InputError("a process group was given but torch.distributed is not initialized")
        return False, None, 0, 1
    group = None if dist in (None, True) else dist
    world = tdist.get_world_size(group)
    rank = tdist.get_rank(group)
    return world > 1, group, rank, world


def _all_reduce(t: Tensor, active: bool, group: Any) -> Tensor:
    if active:
        import torch.distributed as tdist

        tdist.all_reduce(t, group=group)
    return t


