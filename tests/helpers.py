"""Small helpers shared by tests that drive Ray actors."""
import asyncio

import ray


@ray.remote(num_cpus=0)
class Gate:
    """An actor whose ``wait()`` blocks until ``open()`` is called: holds another actor busy, or a
    fake engine's answer back, until the test lets it go (a point fixed by the test, not by a timer)."""

    def __init__(self):
        self.event = asyncio.Event()

    async def wait(self):
        await self.event.wait()

    async def open(self):
        self.event.set()
