"""eventstore's throttle on failed authentications: counts per user id and per
client address, in this process or shared by every process serving one
database (a memory-mapped table in a file beside it). Below the app, which
asks it before checking a credential and tells it of each failure.
"""

import collections
import fcntl
import hashlib
import logging
import math
import mmap
import os
import struct
import threading
import time

log = logging.getLogger("eventstore")


class SharedFailureTable:
    """Failed-authentication counts shared by every process of a server: a
    fixed-size table in a memory-mapped file beside the database, so that N
    worker processes do not give a guesser N times the guesses.

    A slot is (source hash, count, last failure time). A source's count restarts
    once it has been quiet for the window. Reads take no lock (a torn read at
    worst misjudges one attempt by one); writes hold an flock on the file. When
    the probed slots are all taken, the one whose last failure is oldest goes.
    After the slots, the time of the last failure of any source: while it is
    older than the window no source can be throttled, and a request's check is
    one read instead of two probes of the table (PERF: docs/DESIGN.md, "Measured
    choices").
    """

    SLOT = struct.Struct("<QIxxxxd")   # hash, count, padding, last failure (time.time())
    SLOTS = 16384
    PROBES = 8
    LATEST = struct.Struct("<d")       # the last failure of any source, after the slots

    def __init__(self, path):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)  # never through a link
        self._latest_at = self.SLOT.size * self.SLOTS
        size = self._latest_at + self.LATEST.size
        if os.fstat(self._fd).st_size != size:  # new, or made by a version without LATEST
            os.ftruncate(self._fd, size)
        self._map = mmap.mmap(self._fd, size)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:  # a table made before LATEST existed: its latest failure is the slots' latest
            if not self.LATEST.unpack_from(self._map, self._latest_at)[0]:
                latest = max(self.SLOT.unpack_from(self._map, n * self.SLOT.size)[2] for n in range(self.SLOTS))
                self.LATEST.pack_into(self._map, self._latest_at, latest)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self):
        self._map.close()
        os.close(self._fd)

    def quiet(self, now, window):
        """True when no source has failed within the window (nobody is throttled)."""
        return now - self.LATEST.unpack_from(self._map, self._latest_at)[0] > window

    @staticmethod
    def _hash(source):
        digest = hashlib.blake2b(repr(source).encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "little") | 1  # 0 marks an empty slot

    def _find(self, key):
        """-> (slot offset holding key or None, offset to replace)."""
        first = key % self.SLOTS
        oldest, oldest_time = None, math.inf
        for probe in range(self.PROBES):
            offset = ((first + probe) % self.SLOTS) * self.SLOT.size
            stored, _, last = self.SLOT.unpack_from(self._map, offset)
            if stored == key:
                return offset, offset
            if last < oldest_time:
                oldest, oldest_time = offset, last
        return None, oldest

    def recent(self, source, now, window):
        """-> (failures of ``source`` since it was last quiet for ``window``, last failure time)."""
        offset, _ = self._find(self._hash(source))
        if offset is None:
            return 0, None
        _, count, last = self.SLOT.unpack_from(self._map, offset)
        return (count, last) if now - last <= window else (0, None)

    def add(self, source, now, window):
        key = self._hash(source)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            found, offset = self._find(key)
            count = 0
            if found is not None:
                _, count, last = self.SLOT.unpack_from(self._map, found)
                count = count if now - last <= window else 0
            self.SLOT.pack_into(self._map, offset, key, count + 1, now)
            self.LATEST.pack_into(self._map, self._latest_at, now)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


class AuthThrottle:
    """Slows down guessing: failed authentications counted per user id and per
    client address.

    From ``threshold`` failures in ``window`` seconds on, a source is refused (429)
    for a delay that doubles with every further failure, up to ``max_delay``.
    An address is refused whatever user it names; a user id is refused only to
    addresses that have failed recently themselves, so a stranger guessing at a
    user's keys cannot lock its owner out. A success clears nothing (a guesser
    holding one good key cannot reset its count); failures age out of the window.
    A threshold of 0 switches throttling off.

    Counts live in this process (a sliding window; at most ``max_sources``
    sources, the least recently failing forgotten first) or, with ``path``, in a
    SharedFailureTable that every process serving the database shares (a count
    restarts once its source has been quiet for the window).
    """

    def __init__(self, threshold=10, window=60.0, base_delay=1.0, max_delay=900.0,
                 max_sources=10_000, clock=time.time, path=None):
        self.threshold, self.window = threshold, window
        self.base_delay, self.max_delay = base_delay, max_delay
        self.max_sources, self.clock = max_sources, clock
        self.shared = SharedFailureTable(path) if path and threshold else None
        self._failures = collections.OrderedDict()  # source -> deque of failure times
        self._lock = threading.Lock()

    def after_fork(self):
        """In a forked child: a lock of its own, and the shared table opened anew
        (an flock on the parent's file description would exclude nobody)."""
        self._lock = threading.Lock()
        if self.shared is not None:
            self.shared.close()
            self.shared = SharedFailureTable(self.shared.path)

    def retry_after(self, user_id, address):
        """Seconds to wait before trying again, or 0 when the attempt may go ahead."""
        if not self.threshold:  # throttling switched off
            return 0
        now = self.clock()
        if self.shared is not None and self.shared.quiet(now, self.window):
            return 0  # a read of the shared table: no lock needed
        with self._lock:
            by_address = self._delay(("address", address), now)
            if by_address or not self._recent(("address", address), now)[0]:
                return by_address
            return self._delay(("user", user_id), now)

    def failed(self, user_id, address):
        if not self.threshold:
            return
        with self._lock:
            now = self.clock()
            for source in (("address", address), ("user", user_id)):
                if self.shared is not None:
                    self.shared.add(source, now, self.window)
                    continue
                times = self._failures.pop(source, None) or collections.deque()
                times.append(now)
                self._failures[source] = times  # now the most recent
            while len(self._failures) > self.max_sources:
                self._failures.popitem(last=False)

    def _recent(self, source, now):
        """-> (failures within the window, the last one's time)."""
        if self.shared is not None:
            return self.shared.recent(source, now, self.window)
        times = self._failures.get(source)
        while times and now - times[0] > self.window:
            times.popleft()
        return (len(times), times[-1]) if times else (0, None)

    def _delay(self, source, now):
        count, last = self._recent(source, now)
        if count < self.threshold:
            return 0
        delay = min(self.base_delay * 2 ** (count - self.threshold), self.max_delay)
        remaining = last + delay - now
        return math.ceil(remaining) if remaining > 0 else 0


def shared_throttle(path, **options):
    """An AuthThrottle whose counts every process serving one database shares
    (the file ``path``), or one of this process alone where it cannot be made."""
    try:
        return AuthThrottle(path=path, **options)
    except OSError as exc:
        log.warning("failed authentications are counted per process: %s", exc)
        return AuthThrottle(**options)
