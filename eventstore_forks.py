"""Fork safety for the threads eventstore starts.

A fork copies only the thread that calls it. A lock that another thread held at
that moment inside a database library (SQLite's own mutexes, its allocator's
among them) stays held in the child for good, and the child hangs on its first
query. So every thread the app starts (the group-commit writer, the commit
watcher, the engines) does its database work inside ``FORK_GUARD.database_calls()``,
opening its connection included, and a fork (``os.register_at_fork``) waits until
no such thread is inside one, and lets none start until the fork is done.
Request threads are the host's: a host forks from a master that serves nothing
(or has finished its warm-up request), so they are not covered.
Below every module that starts a thread; imports none of them.
"""

import contextlib
import os
import threading
import time


class ForkGuard:
    """Many threads may be inside database calls at once; a fork waits for all of
    them to be out (at most ``timeout`` seconds) and holds new ones back."""

    def __init__(self, timeout=10.0):
        self.timeout = timeout
        self._reset()

    def _reset(self):
        self._changed = threading.Condition(threading.Lock())
        self._inside = 0         # threads inside database_calls now
        self._forking = False
        self._depth = threading.local()  # a thread's nesting, so that it may nest

    @contextlib.contextmanager
    def database_calls(self):
        depth = getattr(self._depth, "n", 0)
        if not depth:
            with self._changed:
                while self._forking:
                    self._changed.wait()
                self._inside += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            if not depth:
                with self._changed:
                    self._inside -= 1
                    self._changed.notify_all()

    def before_fork(self):
        mine = 1 if getattr(self._depth, "n", 0) else 0  # a thread that forks from inside does not wait for itself
        deadline = time.monotonic() + self.timeout
        with self._changed:
            self._forking = True
            while self._inside > mine and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)

    def after_fork_in_parent(self):
        with self._changed:
            self._forking = False
            self._changed.notify_all()

    def after_fork_in_child(self):
        """The other threads are gone: nobody is inside but, perhaps, the thread
        that forked; and the condition's lock may have been copied held."""
        depth = getattr(self._depth, "n", 0)
        self._reset()
        self._inside, self._depth.n = (1 if depth else 0), depth


FORK_GUARD = ForkGuard()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=FORK_GUARD.before_fork, after_in_parent=FORK_GUARD.after_fork_in_parent,
                        after_in_child=FORK_GUARD.after_fork_in_child)
