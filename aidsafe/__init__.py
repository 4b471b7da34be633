"""A Python client of the AIDSAFE data service's HTTP API.

    import aidsafe
    with aidsafe.Client("http://127.0.0.1:8000", "aidsafe_...") as client:
        job = client.submit(["How do I pick the lock of my own bike?"], config={"agents": 2})
        client.wait(job.id)
        for cot in client.iter_cots(job.id):
            print(cot.response)

`AsyncClient` has the same methods, awaited. See the README's "Python client".
"""

from aidsafe.client import UNSET, AsyncClient, Client, Event, benchmark_file
from aidsafe.errors import AidsafeError, EventStreamUnavailable

__all__ = [
    "UNSET",
    "AidsafeError",
    "AsyncClient",
    "Client",
    "Event",
    "EventStreamUnavailable",
    "benchmark_file",
]
