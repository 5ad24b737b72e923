"""The trajectory probe of `alliance bench` ((b): accepted -> trajectory visible), in a process of its own.

Why a process: every timestamp of the latency phase is taken on the bench's event loop (the 202
of each POST, the scored event read from the broker, the webhook received). The probe reads a
sampled client's trajectory every 50 ms until the session shows, up to 8 at once, and on the same
loop that polling delayed every other callback. Measured on 2026-11-27 (main 5da22a7, one run):
intake's own histogram (`alliance_http_request_seconds`, POST /v1/submissions) had every request
under 1 s and about three quarters under 50 ms, while the bench timed POST -> 202 at p50 839 ms,
p99 5.9 s (loop lag p99 189 ms); the same run without probes timed p50 19 ms, p99 88 ms, and the
bench process used 6.1 CPU-s instead of 11.6. (Not because of what it reads: a trajectory of 8
sessions is 4.4 KB and parses in 0.05 ms.) So the instrument, not intake, made those figures.
Here the probe has its own loop, and the bench's loop times what it times. The probe is defined
here, importing little (httpx only): the process the bench starts for it then costs ~0.2 CPU-s to
start instead of the ~0.7 of importing `tools.bench.system` (the Kafka, store and event modules
the bench needs), and the bench counts every CPU-second of it as its own.

Protocol (JSON lines), driven by `tools.bench.system.ProbeProcess`: on stdin, one
`{"sid", "client", "n"}` per submission to watch (EOF: stop); on stdout, `{"read": seconds,
"status": code}` per trajectory read, and `{"sid", "at": wall-clock seconds | null}` when a watch
ends (seen, or timed out). Arguments: reporting's base URL, a read key, the poll interval and the
timeout of one watch, in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable

import httpx

ReadHook = Callable[[float, int], None]
EndHook = Callable[[str, float | None], None]


class VisibilityProbe:
    """Polls the reporting trajectory of sampled submissions until their session shows up.

    `alliance bench` runs it in a process of its own (`tools.bench.system.ProbeProcess`, this module);
    in the bench's process it only answers the warm-up's one question (`visible`)."""

    def __init__(self, http: httpx.AsyncClient, key: str, interval: float, timeout: float,
                 max_in_flight: int = 8, on_read: ReadHook | None = None, on_end: EndHook | None = None) -> None:
        self.http, self.key, self.interval, self.timeout = http, key, interval, timeout
        self.max_in_flight = max_in_flight
        self.first: dict[str, float] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.statuses: Counter[int] = Counter()
        self.watched = 0
        self.skipped = 0  # samples not probed because too many probes were in flight
        self.round_trips: list[float] = []  # seconds of each trajectory read that was answered
        self._on_read, self._on_end = on_read, on_end

    async def visible(self, client_id: str, session_number: int) -> bool:
        started = time.monotonic()
        r = await self.http.get(f"/v1/clients/{client_id}/trajectory", params={"instrument": "SRS"},
                                headers={"Authorization": f"Bearer {self.key}"})
        took = time.monotonic() - started
        self.round_trips.append(took)
        self.statuses[r.status_code] += 1
        if self._on_read is not None:
            self._on_read(took, r.status_code)
        if r.status_code != 200:
            return False
        return any(s.get("session_number") == session_number for s in r.json().get("sessions", []))

    def watch(self, submission_id: str, client_id: str, session_number: int) -> None:
        # Bounded, so a slow or broken reporting service cannot turn the probe into the load
        if len(self.tasks) >= self.max_in_flight:
            self.skipped += 1
            return
        self.watched += 1

        async def poll() -> None:
            deadline = time.monotonic() + self.timeout
            seen: float | None = None
            try:
                while time.monotonic() < deadline:
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        if await self.visible(client_id, session_number):
                            seen = self.first[submission_id] = time.time()
                            return
                    await asyncio.sleep(self.interval)
            finally:
                if self._on_end is not None:
                    self._on_end(submission_id, seen)

        task = asyncio.create_task(poll())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def main(base_url: str, key: str, interval: float, timeout: float) -> None:
    out = sys.stdout

    def emit(msg: dict[str, object]) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        # The bound on watches in flight is the parent's (it decides what is skipped).
        probe = VisibilityProbe(http, key, interval, timeout, max_in_flight=sys.maxsize,
                                on_read=lambda took, status: emit({"read": took, "status": status}),
                                on_end=lambda sid, at: emit({"sid": sid, "at": at}))
        while line := await stdin.readline():
            w = json.loads(line)
            probe.watch(str(w["sid"]), str(w["client"]), int(w["n"]))
        for task in list(probe.tasks):
            task.cancel()
        await asyncio.gather(*probe.tasks, return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
