"""eventstore's retention sweeper: erases the events whose type has a RetainDays
once their last change is older than that (docs/API.md §5b), as a member's
erasure erases them (eventstore_storage.erase_events: a tombstone with its own
Revision and Sequence, the data overwritten), so followers learn of it through
the feed.

An engine below the app (docs/DESIGN.md "Engines"): one thread per serving
process, made by the app for each process, started on its first request (or
by serve.py), stopped by ``close()``. Every ``interval`` seconds (and once soon
after it starts) it looks whether a sweep is due: any type has a RetainDays, and
no sweep finished in the last half interval (another process's, read from the
database). Then it takes the lease "retention" (one sweeper at a time across
processes and servers), erases at most BATCH events per transaction through
the group-commit writer (each transaction checks the lease is still its own),
until none are left, records the sweep for /health, and gives the lease up. A
process killed at any moment loses nothing: what was erased is committed, the
lease expires, and the next sweeper continues from the database. So an event is
erased within two intervals of its expiry. Never holds a request; imports
nothing of the app.
"""

import contextlib
import logging
import threading
import time

from eventstore_forks import FORK_GUARD
from eventstore_leases import Lease, LeaseLost
from eventstore_storage import erase_events, now_us

log = logging.getLogger("eventstore")


class RetentionSweeper:
    NAME = "retention"   # its lease, and its sweeps' record
    BATCH = 100          # events erased in one transaction: the contract says at most 1,000; fewer keep
                         # other writes' wait short (PERF: 1,000 took ~70 ms a transaction; bench/schemas.py 17)
    FIRST_SWEEP = 1.0    # seconds after start (or the interval, if shorter)

    def __init__(self, storage, writer, interval=3600, clock=now_us, lease_seconds=30):
        self.storage, self.writer, self.interval = storage, writer, interval
        self.lease = Lease(writer, self.NAME, lease_seconds)
        self.clock = clock
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()

    def start(self):
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="eventstore-retention", daemon=True)
                self._thread.start()

    def stop(self, timeout=5.0):
        """Stop after the transaction in progress (if any) and give the lease up."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self):
        wait = min(self.FIRST_SWEEP, self.interval)
        while not self._stop.wait(wait):
            started = time.monotonic()
            try:
                self.sweep_if_due()
            except Exception as exc:  # the database is away, say: the next interval tries again
                log.warning("retention sweep failed: %r; trying again in %g s", exc, self.interval)
            wait = max(0.0, self.interval - (time.monotonic() - started))

    def sweep_if_due(self):
        """Sweep unless no type has a RetainDays or another process swept lately ->
        how many events were erased (None: no sweep)."""
        # A connection of its own, briefly (none of the request threads'), and inside the
        # fork guard, as every database call of a thread the app starts.
        with FORK_GUARD.database_calls():
            session = self.storage.session()
            try:
                retained = session.retained_types()
                last = retained and session.last_sweep(self.NAME)
            finally:
                session.close()
        if not retained:
            return None
        if last is not None and self.clock() - last.finished_us < self.interval * 500_000:
            return None  # another process swept less than half an interval ago
        if not self.lease.take():
            return None  # another process is sweeping
        try:
            return self.sweep()
        except LeaseLost:
            log.warning("retention: the lease was lost mid-sweep (this process stalled?); another sweeper goes on")
            return None
        finally:
            with contextlib.suppress(Exception):
                self.lease.give_up()

    def sweep(self):
        """Erase every expired event, BATCH per transaction, under the lease; record
        the sweep -> how many. Stops early (unrecorded) when the sweeper is stopped."""
        erased = 0
        while not self._stop.is_set():
            if not self.lease.keep():
                raise LeaseLost(self.NAME)
            started = time.monotonic()
            keys = self.writer.submit(self._erase_some, touched=lambda keys: {
                (key.program_id, key.event_type) for key in keys}, seqs=self.BATCH)
            erased += len(keys)
            if len(keys) < self.BATCH:
                self.writer.submit(lambda tx: (self.lease.check(tx), tx.record_sweep(self.NAME, erased)),
                                   touched=lambda result: False, seqs=0)
                if erased:
                    log.info("retention: erased %d expired events", erased)
                break
            # As long again before the next: the writer's groups between two sweep
            # transactions commit without one, so a write waits for at most one.
            self._stop.wait(time.monotonic() - started)
        return erased

    def _erase_some(self, tx):
        self.lease.check(tx)
        keys = tx.expired_events(self.BATCH)
        erase_events(tx, [key.event_id for key in keys])
        return keys
