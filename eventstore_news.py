"""eventstore's commit news: who is told that a commit may concern them.

Long polls and the webhook deliverer wait for a commit that may match what
they read. ``CommitNews`` tells them: the commits of this process at once (the
group-commit writer calls ``committed``), other processes' and other servers'
through one watcher thread on the storage's CommitWatch, which runs while
anyone waits (one cheap check every ``poll_interval``, not one query per
waiting request) or watches (the deliverer, while there are webhooks). A
commit wakes only the listeners whose programs and types it may match; the
others are not even woken. Below the app; imports nothing of it.
"""

import contextlib
import logging
import threading

from eventstore_forks import FORK_GUARD

log = logging.getLogger("eventstore")

WATCH_LIMIT = 10_000  # changes read per look; past that a look wakes every listener


class CommitNews:
    """The listeners of one process, and the watcher of other processes' commits."""

    def __init__(self, storage, poll_interval=0.025):
        self.storage, self.poll_interval = storage, poll_interval
        self._lock = threading.Lock()
        self._listeners = set()
        self._waiting = 0        # listeners inside waiting() now
        self._watching = 0       # keep_watching() not yet undone (the webhook deliverer)
        self._watcher = None     # the watcher thread, while anyone waits or watches
        self._closed = threading.Event()

    @property
    def waiting(self):
        """How many listeners are waiting now (``/health``'s longPolls)."""
        return self._waiting

    def listen(self, programs=None, event_types=(), on_news=None):
        """A Listener for commits that may touch ``programs`` (None: every one) and
        ``event_types`` (empty: every one); ``with news.listen(...) as listener:``
        it hears from its start (before a first read, so that a commit landing
        right after that read still counts) until the block ends (or ``close()``).
        ``on_news()``, if given, is called at each such commit too (from the
        committing or watching thread: it must only take note, and be quick)."""
        listener = Listener(self, None if programs is None else frozenset(programs), frozenset(event_types),
                            on_news)
        with self._lock:
            self._listeners.add(listener)
        return listener

    def committed(self, touched=None):
        """A commit happened; ``touched``: the (program, type or None) pairs it
        changed, or None when that is not known (every listener hears of it)."""
        with self._lock:
            heard = [listener for listener in self._listeners if touched is None or listener.may_match(touched)]
        for listener in heard:
            listener.news.set()
            if listener.on_news is not None:
                listener.on_news()

    def keep_watching(self):
        """Watch other processes' commits from now on, though nobody waits (the
        webhook deliverer's listeners hear them while it has webhooks); undone by
        ``stop_watching``. Not counted as a long poll."""
        with self._lock:
            self._watching += 1
            self._start_watcher()

    def stop_watching(self):
        with self._lock:
            self._watching -= 1

    def close(self):
        """Wake every listener now and stop watching (a server that is stopping)."""
        self._closed.set()
        self.committed()

    @property
    def closed(self):
        return self._closed.is_set()

    def _forget(self, listener):
        with self._lock:
            self._listeners.discard(listener)

    @contextlib.contextmanager
    def _waiting_listener(self):
        with self._lock:
            self._waiting += 1
            self._start_watcher()
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1

    def _start_watcher(self):
        """(Under the lock.) Start the watcher thread unless it runs."""
        if self._watcher is None and not self._closed.is_set():
            self._watcher = threading.Thread(target=self._watch_other_processes, daemon=True,
                                             name="eventstore-commit-watcher")
            self._watcher.start()

    def _watch_other_processes(self):
        """While anyone waits: other processes' commits, from the storage's
        CommitWatch. The rows changed since the last look say which programs and
        types were touched, so only the listeners that can match re-read."""
        watch, seen = None, None  # seen: the last Sequence reported, kept across a lost connection
        try:
            while not self._closed.is_set():
                with self._lock:
                    if not self._waiting and not self._watching:
                        self._watcher = None
                        return
                try:
                    with FORK_GUARD.database_calls():
                        if watch is None:
                            watch = self.storage.watch_commits(after=seen)
                            if seen is None:
                                # Another process may have committed before this first look:
                                # every listener reads again.
                                self.committed()
                        changed = watch.changes(self.poll_interval, self._closed, limit=WATCH_LIMIT)
                        seen = watch.last_seq
                except self.storage.errors as exc:  # the connection was lost: a new one, after a pause,
                    # which reports what was committed meanwhile
                    log.warning("the commit watcher lost the database (%r); connecting again", exc)
                    if watch is not None:
                        seen = watch.last_seq
                        with contextlib.suppress(Exception), FORK_GUARD.database_calls():
                            watch.close()
                    watch = None
                    self._closed.wait(1.0)
                    continue
                if changed:
                    self.committed(None if len(changed) == WATCH_LIMIT else
                                   {(change.program_id, change.event_type) for change in changed})
        finally:
            with self._lock:
                if self._watcher is threading.current_thread():
                    self._watcher = None
            if watch is not None:
                with FORK_GUARD.database_calls():
                    watch.close()


class Listener:
    """One waiter's ear: ``news`` (a threading.Event) is set when a commit that may
    match its programs and types lands. ``waiting()`` marks the time it waits,
    so that other processes' commits are watched for meanwhile."""

    __slots__ = ("source", "programs", "event_types", "news", "on_news")

    def __init__(self, source, programs, event_types, on_news=None):
        self.source = source
        self.programs, self.event_types = programs, event_types  # None / empty: all
        self.news = threading.Event()
        self.on_news = on_news

    def may_match(self, touched):
        return any((self.programs is None or program in self.programs)
                   and (not self.event_types or event_type is None or event_type in self.event_types)
                   for program, event_type in touched)

    def waiting(self):
        return self.source._waiting_listener()

    def __enter__(self):
        return self

    def close(self):
        """Hear no more."""
        self.source._forget(self)

    def __exit__(self, *exc_info):
        self.close()
        return False
