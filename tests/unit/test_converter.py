"""The converter pool: a conversion that runs out of memory, or kills its process, fails its
own call with a clear refusal, and the pool goes on with fresh processes."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator

import pytest

from jobsvc.converter import ConverterPool
from jobsvc.errors import NeedsMoreMemory

CAP_MB = 256


def allocate(megabytes: int) -> int:
    return len(bytearray(megabytes << 20))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
async def pool() -> AsyncIterator[ConverterPool]:
    converter = ConverterPool(size=1, memory_mb=CAP_MB)
    yield converter
    converter.shutdown()


async def test_growth_within_the_cap_is_allowed(pool: ConverterPool) -> None:
    # The cap counts from the process's start, not the 1.4 GB pandas and Arrow map at import.
    assert await pool.run(allocate, CAP_MB // 2) == (CAP_MB // 2) << 20


async def test_running_out_of_memory_refuses_the_call_and_replaces_the_process(
    pool: ConverterPool,
) -> None:
    before = await pool.run(os.getpid)
    with pytest.raises(NeedsMoreMemory, match=f"JOBSVC_CONVERTER_MEMORY_MB={CAP_MB}"):
        await pool.run(allocate, 2 * CAP_MB)
    assert await pool.run(os.getpid) != before
    assert await pool.run(allocate, 1) == 1 << 20


async def test_a_process_that_dies_each_time_is_a_refusal_and_the_pool_goes_on(
    pool: ConverterPool,
) -> None:
    with pytest.raises(NeedsMoreMemory, match="ended twice"):
        await pool.run(die)
    assert await pool.run(allocate, 1) == 1 << 20
