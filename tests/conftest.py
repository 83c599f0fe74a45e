"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run a test on one torch thread: its tensors are tiny, and on a busy 2-core machine torch's
    intra-op thread pool made a [16, 16] BatchNorm call take ~90 ms instead of ~0.03 ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def original():
    """The bundled digits ResNet (trained, eval mode): the original model of the calibration,
    recovery and compare tests. Tests only read it."""
    from normswap.models.digits import digits_resnet

    return digits_resnet()
