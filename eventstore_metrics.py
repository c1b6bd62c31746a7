"""eventstore's metrics: what the app and its engines count (requests, their
durations, writes, group commits, long polls, failed authentications, webhook
deliveries), shared by every process serving one database, and the /metrics
page in Prometheus' text format (0.0.4), which adds what the app reads from the
database at each scrape (the feed's head, each subscription's Behind and pending
age). Below the app, which records into a ``Metrics`` and serves
``exposition()``; imports nothing of the app's.

Across processes (serve.py --processes N, gunicorn, several servers on one
SQLite file): a memory-mapped file beside the database (``DB-metrics-v1``) is
cut into regions; each process holds one, by an OFD lock on its byte range,
and is the only one that writes it, so counting never waits for another
process. A scrape, in whichever process, reads every region: counters and
histograms are summed over all of them, a dead process's included, and a
process that starts adopts the region of one that died, values and all, so no
sum goes down when the supervisor restarts a worker. Gauges of processes
(long polls waiting) are summed over the regions whose holder lives (its lock
is held). The file starts afresh when a process finds no other holder: a new
run of the server (serve.py's supervisor holds a region the whole run).
docs/DESIGN.md, "Metrics", says why this and not prometheus_client.

For the engines: the webhook deliverer counts each delivery's outcome with
``metrics.webhook_delivery(subscription, outcome)``, outcome one of
WEBHOOK_OUTCOMES.
"""

import bisect
import contextlib
import fcntl
import logging
import mmap
import os
import struct
import threading
import time

log = logging.getLogger("eventstore")

WEBHOOK_OUTCOMES = ("ok", "http_error", "timeout", "refused")
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FILE_SUFFIX = "metrics-v1"  # storage.local_file(FILE_SUFFIX): DB-metrics-v1 beside a SQLite database


class Family:
    """A metric: its name, help, type, label names and, for a histogram, the
    buckets' upper bounds."""

    def __init__(self, name, kind, help, labels=(), buckets=()):
        self.name, self.kind, self.help, self.labels, self.buckets = name, kind, help, tuple(labels), tuple(buckets)

    def key(self, values):
        """The series' key in the table: the exposition's name and labels."""
        if not values:
            return self.name
        return self.name + "{" + ",".join(f'{label}="{escape(value)}"' for label, value in zip(self.labels, values)) + "}"


def escape(value):
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUESTS = Family("eventstore_http_requests_total", "counter",
                  "Requests answered, by route template (unmatched: no route), method and status.",
                  ("route", "method", "status"))
DURATION = Family("eventstore_http_request_duration_seconds", "histogram",
                  "Seconds from a request's arrival in the app to its answer (long polls included), by route.",
                  ("route",), DURATION_BUCKETS)
WRITES = Family("eventstore_writes_committed_total", "counter",
                "Writes committed (a PUT, a batch, a DELETE, an erasure, ...): each durable before its answer.")
GROUP_SIZE = Family("eventstore_group_commit_size", "histogram",
                    "Changes in each group commit (one transaction, one fsync).",
                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000))
GROUP_SECONDS = Family("eventstore_group_commit_seconds", "histogram", "Seconds each group commit took.",
                       buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
FEED_HEAD = Family("eventstore_feed_head", "gauge",
                   "The feed's head: the largest Sequence it serves now (read from the database).")
SUBSCRIPTION_BEHIND = Family("eventstore_subscription_behind", "gauge",
                             "Changes waiting for each subscription after its Position, as its Behind (counted "
                             "up to 1000; read from the database).", ("subscription",))
SUBSCRIPTION_PENDING = Family("eventstore_subscription_pending_seconds", "gauge",
                              "Seconds the first change waiting for each subscription has waited since its "
                              "UpdatedUTC (0 when none waits; read from the database).", ("subscription",))
LONG_POLLS = Family("eventstore_long_polls_waiting", "gauge", "Long polls waiting now, in every process.")
WEBHOOKS = Family("eventstore_webhook_deliveries_total", "counter",
                  "Webhook deliveries by subscription and outcome (ok, http_error, timeout, refused).",
                  ("subscription", "outcome"))
AUTH_FAILURES = Family("eventstore_auth_failures_total", "counter",
                       "Failed authentications (wrong, revoked or unknown credentials; not missing ones).")
FAMILIES = (REQUESTS, DURATION, WRITES, GROUP_SIZE, GROUP_SECONDS, FEED_HEAD, LONG_POLLS, SUBSCRIPTION_BEHIND,
            SUBSCRIPTION_PENDING, WEBHOOKS, AUTH_FAILURES)
DATABASE_FAMILIES = (FEED_HEAD, SUBSCRIPTION_BEHIND, SUBSCRIPTION_PENDING)  # read at each scrape, never counted
COUNTER, GAUGE = 0, 1  # how a value adds up over processes: all of them, or the live ones
_MISSING = object()


# ============================================================================
# The shared table
# ============================================================================

class SharedTable:
    """The file of regions. A region: a header (magic, bytes of records in use,
    pid, start time) and records, each an 8-byte header (key length, and whether
    the value is a gauge), the key (UTF-8, padded to 8 bytes) and its value (a
    float64). Only the holder writes a region: a new record is written whole
    before the count of bytes in use moves past it, and each value is one aligned
    8-byte store, so a reader in another process never needs a lock.
    ``values`` is the file as float64s: a record's value is ``values[index]``."""

    MAGIC = 0x3176_5254_454d_5345  # "ESMETRv1"
    HEADER = 4096           # the file's first page: its lock serializes claims
    REGIONS = 64
    REGION = 256 * 1024     # some 2,000 series a process
    REGION_HEADER = struct.Struct("<QQQd")  # magic, bytes of records in use, pid, start time
    RECORD = struct.Struct("<II")           # key length, COUNTER or GAUGE
    FLOCK = struct.Struct("hhqqi4x")        # struct flock (l_type, l_whence, l_start, l_len, l_pid)

    def __init__(self, path):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)  # never through a link
        try:
            size = self.HEADER + self.REGIONS * self.REGION
            self._lock(0, 1, wait=True)  # one claim at a time
            try:
                if not any(self._held(region) for region in range(self.REGIONS)):
                    os.ftruncate(self._fd, 0)  # nobody holds a region: a new run starts from zero
                os.ftruncate(self._fd, size)
                self._map = mmap.mmap(self._fd, size)
                self.region = next((r for r in range(self.REGIONS) if self._lock(self._start(r), self.REGION)), None)
                if self.region is not None:
                    # The region's blocks, now: a page of a sparse file first written on a full
                    # disk would kill the process (SIGBUS), where a write would only fail.
                    os.posix_fallocate(self._fd, self._start(self.region), self.REGION)
            finally:
                self._unlock(0, 1)
        except BaseException:
            with contextlib.suppress(AttributeError):
                self._map.close()
            os.close(self._fd)
            raise
        if self.region is None:
            self._map.close()
            os.close(self._fd)
            raise OSError(f"every one of the {self.REGIONS} regions of {path} is held by a live process")
        self.values = memoryview(self._map).cast("d")
        self._used = memoryview(self._map).cast("Q")  # the header words, as integers
        self.keys = self._adopt()

    def _start(self, region):
        return self.HEADER + region * self.REGION

    def _flock(self, kind, start, length):
        return self.FLOCK.pack(kind, os.SEEK_SET, start, length, 0)

    def _lock(self, start, length, wait=False):
        """An OFD lock (it belongs to this open file, not to the process: two apps
        in one process exclude each other, and it goes when the process dies)."""
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK,
                        self._flock(fcntl.F_WRLCK, start, length))
            return True
        except OSError:
            return False

    def _unlock(self, start, length):
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, self._flock(fcntl.F_UNLCK, start, length))

    def _held(self, region):
        """Whether another open file (a live process, or another app) holds ``region``."""
        answer = fcntl.fcntl(self._fd, fcntl.F_OFD_GETLK, self._flock(fcntl.F_WRLCK, self._start(region), self.REGION))
        return self.FLOCK.unpack(answer)[0] != fcntl.F_UNLCK

    def _adopt(self):
        """Make the region this process's: a new one, or a dead process's with its
        counts kept (its gauges were that process's: zero now). -> {key: index}."""
        start = self._start(self.region)
        magic, used, _, _ = self.REGION_HEADER.unpack_from(self._map, start)
        keys = {}
        if magic != self.MAGIC:
            used = 0
        for key, index, kind in self._records(self.region, used):
            keys[key] = index
            if kind == GAUGE:
                self.values[index] = 0.0
        self.REGION_HEADER.pack_into(self._map, start, self.MAGIC, used, os.getpid(), time.time())
        return keys

    def _records(self, region, used):
        """-> (key, value index, kind) of each record of ``region`` below ``used``."""
        start = self._start(region) + self.REGION_HEADER.size
        offset, end = start, start + min(used, self.REGION - self.REGION_HEADER.size)
        while offset + self.RECORD.size <= end:
            length, kind = self.RECORD.unpack_from(self._map, offset)
            value_at = offset + self.RECORD.size + (length + 7) // 8 * 8
            if value_at + 8 > end:
                return  # never written whole: stop here
            key = bytes(self._map[offset + self.RECORD.size:offset + self.RECORD.size + length]).decode("utf-8", "replace")
            yield key, value_at // 8, kind
            offset = value_at + 8

    def add_key(self, key, kind):
        """A new record for ``key`` (the caller holds the process's lock) -> its
        value's index, or None when the region is full."""
        start = self._start(self.region)
        used = self._used[start // 8 + 1]
        encoded = key.encode("utf-8")
        offset = start + self.REGION_HEADER.size + used
        size = self.RECORD.size + (len(encoded) + 7) // 8 * 8 + 8
        if self.REGION_HEADER.size + used + size > self.REGION:
            return None
        self.RECORD.pack_into(self._map, offset, len(encoded), kind)
        self._map[offset + self.RECORD.size:offset + self.RECORD.size + len(encoded)] = encoded
        index = (offset + size - 8) // 8
        self.values[index] = 0.0
        self._used[start // 8 + 1] = used + size  # last: readers see the record whole
        return index

    def read(self):
        """-> {key: value} summed over the regions: counters over every region,
        gauges over the live ones (this process's and those whose lock is held)."""
        totals = {}
        for region in range(self.REGIONS):
            start = self._start(region)
            magic, used = self._used[start // 8], self._used[start // 8 + 1]
            if magic != self.MAGIC or not used:
                continue
            live = None
            for key, index, kind in self._records(region, used):
                if kind == GAUGE:
                    if live is None:
                        live = region == self.region or self._held(region)
                    if not live:
                        continue
                totals[key] = totals.get(key, 0.0) + self.values[index]
        return totals

    def close(self):
        self.values.release()
        self._used.release()
        self._map.close()
        os.close(self._fd)  # gives the region up (its counts stay, for the next holder)


class PrivateTable:
    """The same interface for this process alone, where no shared file can be
    had (no OFD locks on this system, or the file cannot be made)."""

    def __init__(self):
        self._values, self.keys = [], {}
        self.values = self._values

    def add_key(self, key, kind):
        self._values.append(0.0)
        return len(self._values) - 1

    def read(self):
        return {key: self._values[index] for key, index in list(self.keys.items())}

    def close(self):
        pass


class ClosedTable(PrivateTable):
    """What a closed Metrics records into: nothing (any index takes any value)."""

    class _Sink:
        def __getitem__(self, index):
            return 0.0

        def __setitem__(self, index, value):
            pass

    def __init__(self):
        super().__init__()
        self.values = self._Sink()


def open_table(path):
    if path is None or not hasattr(fcntl, "F_OFD_SETLK"):
        return PrivateTable()
    try:
        return SharedTable(path)
    except OSError as exc:
        log.warning("metrics are counted per process: %s", exc)
        return PrivateTable()


# ============================================================================
# Recording, and the exposition
# ============================================================================

class Metrics:
    """What the app and its engines record, and ``exposition(database)``.
    Thread-safe: one lock per process guards its region (a new series' record is
    written in several steps; additions are held with it too, rather than lean on
    the GIL), held for a few additions; processes never wait for each other."""

    enabled = True

    def __init__(self, path=None):
        self.path = path
        self.table = open_table(path)
        self._lock = threading.Lock()
        self._slots = {}  # (family, label values) -> value indexes, or None where the region is full
        self._full_said = False

    def after_fork(self):
        """In a forked child: a region of its own. The parent keeps its own: closing
        the child's copy of its file leaves the parent's lock held."""
        self._lock = threading.Lock()
        self._slots = {}
        self.table.close()
        self.table = open_table(self.path)

    def close(self):
        with self._lock:
            self.table.close()
            self.table = ClosedTable()  # a recording under way, or a late one, goes nowhere

    def _indexes(self, family, values):
        """The value indexes of a series (made on first use): one for a counter or
        gauge; a histogram's buckets, then its sum and count."""
        found = self._slots.get((family, values))
        if found is not None or (family, values) in self._slots:
            return found
        base = family.key(values)
        kind = GAUGE if family.kind == "gauge" else COUNTER
        names = ([f"{base}\0{n}" for n in range(len(family.buckets) + 1)] + [f"{base}\0sum", f"{base}\0count"]
                 if family.kind == "histogram" else [base])
        indexes = []
        for name in names:
            index = self.table.keys.get(name)
            if index is None:
                index = self.table.add_key(name, kind)
                if index is None:
                    if not self._full_said:
                        self._full_said = True
                        log.warning("the metrics region of this process is full: new series are not counted")
                    self._slots[(family, values)] = None
                    return None
                self.table.keys[name] = index
            indexes.append(index)
        self._slots[(family, values)] = indexes
        return indexes

    # PERF: the lock is held only for the additions, with no Python function called
    # inside (a call may hand the GIL to another thread, which then waits for the
    # lock too: 13 us of CPU a GET, where the counting itself costs about 1.3 us);
    # a series is looked up before it, and made under it the first time.
    def _series(self, family, values):
        found = self._slots.get((family, values), _MISSING)
        if found is _MISSING:
            with self._lock:
                found = self._indexes(family, values)
        return found

    def _add(self, family, values, amount=1.0):
        indexes = self._series(family, values)
        if indexes is not None:
            index = indexes[0]
            with self._lock:
                self.table.values[index] += amount

    def _observe(self, family, values, observed):
        indexes = self._series(family, values)
        if indexes is not None:
            bucket = indexes[bisect.bisect_left(family.buckets, observed)]
            with self._lock:
                table = self.table.values
                table[bucket] += 1
                table[indexes[-2]] += observed
                table[indexes[-1]] += 1

    # --- what is recorded ---------------------------------------------------------

    def request(self, route, method, status, seconds):
        """A request answered: ``route`` its template (or "unmatched")."""
        self._add(REQUESTS, (route, method if method in METHODS else "other", str(status)))
        self._observe(DURATION, (route,), seconds)

    def write_committed(self):
        self._add(WRITES, ())

    def group_commit(self, changes, seconds):
        """A GroupCommitWriter observer."""
        self._observe(GROUP_SIZE, (), changes)
        self._observe(GROUP_SECONDS, (), seconds)

    def long_polls(self, change):
        """+1 when a long poll starts waiting, -1 when it stops."""
        self._add(LONG_POLLS, (), change)

    def auth_failure(self):
        self._add(AUTH_FAILURES, ())

    def webhook_delivery(self, subscription, outcome):
        """A webhook delivery ended: ``outcome`` one of WEBHOOK_OUTCOMES."""
        if outcome not in WEBHOOK_OUTCOMES:
            raise ValueError(f"unknown webhook outcome {outcome!r}")
        self._add(WEBHOOKS, (subscription, outcome))

    # --- the exposition -------------------------------------------------------------

    def exposition(self, database):
        """The text a scrape gets (bytes): every family, summed over the
        processes, and ``database``, {family of DATABASE_FAMILIES: [(label values,
        value)]}: what the app has just read from the database."""
        totals = self.table.read()  # no lock: each value is read whole
        lines = []
        for family in FAMILIES:
            lines.append(f"# HELP {family.name} {family.help}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            if family in DATABASE_FAMILIES:
                lines.extend(f"{family.key(labels)} {number(value)}" for labels, value in database.get(family, ()))
            elif family.kind == "histogram":
                lines.extend(histogram_lines(family, totals))
            else:
                series = sorted((key, value) for key, value in totals.items()
                                if key == family.name or key.startswith(family.name + "{"))
                if not series and not family.labels:
                    series = [(family.name, 0.0)]
                lines.extend(f"{key} {number(value)}" for key, value in series)
        return ("\n".join(lines) + "\n").encode("utf-8")


def histogram_lines(family, totals):
    """A histogram's series from the table's per-bucket counts: cumulative
    buckets, +Inf, sum and count for each label set."""
    label_sets = sorted({key[:-len("\0count")] for key in totals
                         if key.endswith("\0count") and (key.startswith(family.name + "{") or
                                                         key == family.name + "\0count")})
    if not label_sets and not family.labels:
        label_sets = [family.name]
    for base in label_sets:
        labels = base[len(family.name):]  # "" or "{...}"
        inner = labels[1:-1] + "," if labels else ""
        cumulative = 0.0
        for n, bound in enumerate((*family.buckets, "+Inf")):
            cumulative += totals.get(f"{base}\0{n}", 0.0)
            le = bound if isinstance(bound, str) else number(bound)
            yield f'{family.name}_bucket{{{inner}le="{le}"}} {number(cumulative)}'
        total, count = totals.get(base + "\0sum", 0.0), totals.get(base + "\0count", 0.0)
        yield f"{family.name}_sum{labels} {number(total)}"
        yield f"{family.name}_count{labels} {number(count)}"


def number(value):
    """A sample value as Prometheus reads it: integers without a fraction."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else repr(value)


class NoMetrics:
    """Metrics switched off (make_app(metrics=False), serve.py --no-metrics):
    nothing is recorded, and /metrics is a 404."""

    enabled = False

    def __init__(self, path=None):
        pass

    def _nothing(self, *args):
        pass

    after_fork = close = request = write_committed = group_commit = long_polls = auth_failure = _nothing
    webhook_delivery = _nothing
