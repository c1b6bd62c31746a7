"""eventstore's leases: one worker at a time across processes and servers, for
the engines (the retention sweeper; the webhook deliverer, one per subscription).

A lease is a row of the database (name, holder, expires), so it holds across
processes on one SQLite file and across servers on one PostgreSQL database,
never in memory alone. A process takes it with one conditional statement in a
write transaction (docs/DESIGN.md "Leases"), renews it every third of its time,
and gives it up on a clean stop; a holder that dies loses it when it expires.
Work done under a lease checks, in the transaction that records the work, that
the lease is still its own (``check``), so a holder that stalled past its expiry
cannot write over its successor. Every write goes through the process's
group-commit writer (durable, ordered with the rest). Below the app; imports
nothing of it.
"""

import os
import secrets
import socket
import threading
import time

MAX_SECONDS = 30  # a dead holder's lease is free again within this
CLOCK_SKEW = 2    # seconds servers' clocks may differ: safe_until keeps this far from the expiry


class LeaseLost(Exception):
    """The lease is no longer this holder's: the work's transaction wrote nothing.
    The engines' own exception, no HTTP error (the group-commit writer rolls its
    group back and runs each change alone again: a rare event)."""

    def __init__(self, name):
        super().__init__(f"the lease {name!r} is no longer held by this process")


class Lease:
    """The lease ``name`` as one holder (this engine of this process) sees it."""

    def __init__(self, writer, name, seconds=MAX_SECONDS):
        if not 0 < seconds <= MAX_SECONDS:
            raise ValueError(f"a lease lasts 0-{MAX_SECONDS} s")
        self.writer, self.name, self.seconds = writer, name, seconds
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.held = False
        self._renew_at = 0.0
        self.safe_until = 0.0  # time.monotonic() before which the lease is surely still held, while held
        # take, keep and give_up one at a time (from a worker and a renewing thread): a
        # renewal answered after a release committed would leave ``held`` true. Never
        # taken by ``check``, which runs in the writer's thread those wait for.
        self._changing = threading.Lock()

    def take(self):
        """Take (or renew) the lease -> whether this holder has it now."""
        with self._changing:
            return self._take()

    def _take(self):
        started = time.monotonic()
        self.held = self.writer.submit(lambda tx: tx.take_lease(self.name, self.holder, self.seconds),
                                       touched=lambda result: False, seqs=0)
        self._renew_at = started + self.seconds / 3
        if self.held:  # it expires ``seconds`` after its transaction's time, which is after ``started``;
            # CLOCK_SKEW leaves room for servers' clocks that differ a little
            self.safe_until = started + self.seconds - CLOCK_SKEW
        return self.held

    @property
    def renew_at(self):
        """time.monotonic() from which ``keep`` renews it."""
        return self._renew_at

    def keep(self):
        """Renew the lease once a third of its time has passed -> whether it is still held."""
        with self._changing:
            if self.held and time.monotonic() >= self._renew_at:
                return self._take()
            return self.held

    def check(self, tx):
        """In the transaction of work done under the lease, before it writes:
        LeaseLost unless the lease is still this holder's (kept so until it ends)."""
        if not tx.holds_lease(self.name, self.holder):
            self.held = False
            raise LeaseLost(self.name)

    def give_up(self):
        """Release the lease if held (a clean stop, or the work is done), after any
        renewal in flight."""
        with self._changing:
            if self.held:
                self.held = False
                self.writer.submit(lambda tx: tx.release_lease(self.name, self.holder),
                                   touched=lambda result: False, seqs=0)
