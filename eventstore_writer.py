"""eventstore's group-commit writer: one thread per process that owns a storage
Session and commits, in one durable write transaction, every change queued
while the previous commit was being made durable. Below the app (which hands
it changes: functions over a Transaction); imports nothing of the app's.
"""

import copy
import itertools
import logging
import threading
import time

from eventstore_errors import Problem, service_unavailable
from eventstore_forks import FORK_GUARD
from eventstore_storage import SequencesExhausted

log = logging.getLogger("eventstore")


class GroupCommitWriter:
    """One thread that owns a storage session and commits, in a single write
    transaction, every change queued while the previous commit was being made
    durable (group commit).

    A change is a function ``change(tx) -> result`` over a Transaction (or
    a Later of its result, asked for once every change of the batch has run), with
    ``touched(result)``: what the committed change touched, as a set of
    (ProgramId, EventType or None) pairs, or True (something, unsaid), or a
    false value (nothing a feed shows); ``on_commit`` hears the union (None for
    "unsaid"), so that only long polls that can match re-read. Every function
    in ``observers`` hears ``(changes, seconds)`` after each group commit: how
    many changes the group held and how long its transactions took. One that
    raises a Problem (a 404, a 412) must do so before it writes: it fails alone
    and the others commit. One that raises anything else, or after writing, makes
    the batch roll back and rerun one change per transaction, so that it fails
    alone too. ``submit`` returns only after the COMMIT (durable) or raises the
    change's own error.

    If the thread dies (its session cannot be opened, or anything unexpected
    escapes), every change it held or had queued fails with a 503, ``failure``
    says why until a new thread has connected, and the next change starts one.

    A submitter waits at most ``timeout`` seconds: then a change still queued is
    withdrawn (503, nothing written), one being written gets a 503 that says its
    outcome is unknown. Waiting writes must not take every request thread of the
    host from reads and /health: while a transaction has run longer than
    ``slow_after`` seconds, at most ``max_waiting`` changes wait in the queue
    (the later ones are withdrawn, 503, nothing written), and once it has run
    longer than ``timeout`` the writer is ``stuck()`` and changes are refused at once.
    """

    def __init__(self, open_session, clock, on_commit=lambda touched: None, max_batch=1000, timeout=10.0,
                 max_waiting=4, slow_after=1.0):
        self.open_session, self.clock, self.on_commit = open_session, clock, on_commit
        self.observers = []  # f(changes, seconds) after each group commit
        self.max_batch = max_batch
        self.timeout = timeout
        self.max_waiting, self.slow_after = max_waiting, min(slow_after, timeout / 2)
        self.failure = None  # why the last writer thread died, until another connects
        self.failing = None  # the database error of the last transaction, until one commits
        self._busy_since = None  # time.monotonic() when the transaction in progress began
        self._queue = []
        self._wake = threading.Condition()
        self._thread = None
        self._stopping = False

    def submit(self, change, touched=lambda result: True, seqs=1):
        """Queue ``change`` and wait for its outcome: its result, or its error.
        ``seqs``: how many Sequences it will probably take (a hint for PostgreSQL,
        which takes them when the transaction begins)."""
        with self._wake:
            if self.stuck() or (self._slow() and len(self._queue) >= self.max_waiting):
                raise self.unavailable()
            item = self._post(change, touched, seqs)
        deadline = time.monotonic() + self.timeout
        # Bounded waits: a writer that died without answering, a deadline, a slow
        # transaction are all noticed.
        while not item.done.wait(min(0.5, max(deadline - time.monotonic(), 0))):
            with self._wake:
                if item.done.is_set():
                    break
                if item.writer is None:
                    if item not in self._queue:
                        continue  # a writer that died took it: its answer (503) comes at once
                    if time.monotonic() >= deadline or (
                            self._slow() and self._queue.index(item) >= self.max_waiting):
                        self._queue.remove(item)  # no writer has it: nothing of it is written, ever
                        raise self.unavailable()
                    if not self._thread.is_alive():  # still queued: hand it to a new writer
                        self._start()
                    continue
                if time.monotonic() >= deadline:
                    raise service_unavailable(
                        f"The database did not confirm this write within {self.timeout:g} s; it may or may "
                        "not have been written. Read it back, or send it again (PUT and POST /events are "
                        "idempotent).", retry_after=5)
                if item.writer.is_alive():
                    continue
            raise self.unavailable()
        if item.error is not None:
            raise item.error
        return item.result

    def post(self, change, touched=lambda result: True, seqs=0):
        """Queue ``change`` without waiting for it (best-effort bookkeeping)."""
        with self._wake:
            return self._post(change, touched, seqs)

    def _post(self, change, touched, seqs):
        """(Under the lock.) Queue a change -> its _Pending."""
        if self._stopping:
            raise RuntimeError("the writer is stopped")
        item = _Pending(change, touched, seqs)
        self._start()
        self._queue.append(item)
        self._wake.notify()
        return item

    def start(self):
        """Start a writer thread unless one is running (health checks call this,
        so that a writer that died is brought back even while nobody writes)."""
        with self._wake:
            if not self._stopping:
                self._start()

    def _start(self):
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="eventstore-writer", daemon=True)
            self._thread.start()

    @property
    def waiting(self):
        """How many changes are queued, not yet taken by the writer thread."""
        return len(self._queue)

    def unavailable(self):
        return service_unavailable("The database cannot take writes at the moment; nothing was written. "
                                   "Try again shortly.", retry_after=5 if self.stuck() else 1)

    def stuck(self):
        """Seconds the transaction in progress has run, when that is past the timeout."""
        running = self._running()
        return running if running > self.timeout else 0

    def _slow(self):
        """Whether the transaction in progress has run past ``slow_after``."""
        return self._running() > self.slow_after

    def _running(self):
        since = self._busy_since
        return 0 if since is None else time.monotonic() - since

    def stop(self):
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            # Bounded: a transaction held by the database (a lock another session keeps)
            # must not hang the app's close(); the thread is a daemon.
            self._thread.join(self.timeout + 5)
            if self._thread.is_alive():
                log.warning("the database writer did not finish its transaction within %g s; stopping without it",
                            self.timeout + 5)

    def _run(self):
        batch = []
        try:
            with FORK_GUARD.database_calls():  # a fork waits for the opening too
                session = self.open_session()
        except Exception as exc:
            return self._died(exc, batch)
        self.failure = None
        try:
            while True:
                with self._wake:
                    while not self._queue and not self._stopping:
                        self._wake.wait()
                    if not self._queue:
                        return
                    batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                    for item in batch:
                        item.writer = threading.current_thread()
                with FORK_GUARD.database_calls():
                    self._busy_since = time.monotonic()
                    try:
                        self._commit(session, batch)
                    finally:
                        self._busy_since = None
                batch = []
        except BaseException as exc:
            self._died(exc, batch)
        finally:
            with FORK_GUARD.database_calls():
                session.close()

    def _died(self, exc, batch):
        """Fail every change this thread held or that is queued, and say why."""
        log.error("the database writer stopped: %r; the next write starts another", exc)
        self.failure = exc
        with self._wake:
            batch, self._queue = batch + self._queue, []
        for item in batch:
            if not item.done.is_set():
                item.error, item.result = self.unavailable(), None
                item.done.set()

    def _commit(self, session, batch):
        started = time.monotonic()
        try:
            self._transaction(session, batch)
        except _ChangeFailed:
            for item in batch:  # isolate the failing change: one transaction each
                try:
                    self._transaction(session, [item])
                except _ChangeFailed as failed:
                    item.error, item.result = failed.__cause__, None
                except Exception as exc:
                    item.error, item.result = exc, None
        except Exception as exc:  # BEGIN or COMMIT failed: nothing of the batch is written
            self.failing = exc
            for item in batch:  # each its own copy: an exception is raised in one thread only
                item.error, item.result = copy.copy(exc).with_traceback(None), None
        else:
            self.failing = None
        touched, unsaid = set(), False
        for item in batch:
            where = item.error is None and item.touched(item.result)
            if where is True:
                unsaid = True  # changed, without saying where
            elif where:
                touched |= where
        if unsaid or touched:
            self.on_commit(None if unsaid else touched)
        for observe in self.observers:  # before any submitter hears of its outcome
            observe(len(batch), time.monotonic() - started)
        for item in batch:
            item.done.set()

    def _transaction(self, session, batch):
        seqs = sum(item.seqs for item in batch)
        for attempt in itertools.count(1):
            try:
                return self._run_changes(session, batch, seqs)
            except SequencesExhausted as exc:
                if attempt >= 20:
                    raise
                seqs = exc.needed
            except _ChangeFailed:
                raise
            except Exception as exc:  # a deadlock or serialization failure may pass the next time
                if attempt >= 3 or not session.storage.retryable(exc):
                    raise

    def _run_changes(self, session, batch, seqs):
        with session.transaction(self.clock(), seqs) as tx:
            for item in batch:
                changes_before = tx.changes()
                try:
                    item.result, item.error = item.change(tx), None
                except SequencesExhausted:
                    raise
                except Problem as problem:
                    if tx.changes() != changes_before:
                        raise _ChangeFailed() from problem
                    item.result, item.error = None, problem
                except Exception as exc:
                    raise _ChangeFailed() from exc
            for item in batch:
                if isinstance(item.result, Later):
                    try:
                        item.result = item.result.get()
                    except Exception as exc:  # after its change wrote: one transaction each, again
                        raise _ChangeFailed() from exc


class Later:
    """A change's result, asked for (``get()``) only once every change of its
    group has run: PostgreSQL sends a group's upserts together, in one round
    trip, and has the answers at the first question (SQLite has them already)."""

    __slots__ = ("get",)

    def __init__(self, get):
        self.get = get


class _ChangeFailed(Exception):
    """A change failed in a way that only rolling back its transaction undoes."""


class _Pending:
    __slots__ = ("change", "touched", "seqs", "done", "result", "error", "writer")

    def __init__(self, change, touched, seqs):
        self.change, self.touched, self.seqs = change, touched, seqs
        self.done = _Done()
        self.result = self.error = None
        self.writer = None  # the writer thread that took it


class _Done:
    """What threading.Event gives a change's one submitter (set, is_set, wait),
    on a bare lock held until the change is answered, as eventstore_pg.py's reads
    do. PERF: an Event is a Condition in Python code, whose woken waiter must
    take the Condition's lock again: under 16 connections PUT cost about 7 % more
    CPU with it (docs/DESIGN.md, "Measured choices"). Only the writer's thread sets it."""

    __slots__ = ("_set", "_lock")

    def __init__(self):
        self._set = False
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self):
        if not self._set:
            self._set = True
            self._lock.release()

    def is_set(self):
        return self._set

    def wait(self, timeout):
        if not self._set and self._lock.acquire(timeout=timeout):
            self._lock.release()  # open for good: a later wait passes too
        return self._set
