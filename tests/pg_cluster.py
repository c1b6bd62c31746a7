"""A throwaway PostgreSQL cluster for the tests, from the server binaries of
Debian's postgresql package (/usr/lib/postgresql/<version>/bin, or
$EVENTSTORE_PG_BIN): initdb in a private temporary folder (mode 0700), fsync
off (tests only: never for a benchmark). It listens on no TCP port, only on a
Unix socket in that folder, so that no other local user can reach it: trust
authentication there would have let any of them in as a superuser (and run
programs as the cluster's owner with COPY ... TO PROGRAM). Its port number
names the socket. initdb and postgres refuse to run as root, so as root they
run as the unprivileged user ``postgres``, which the package creates (root
reaches the folder all the same). The tests' role ``eventstore`` is a
superuser: the suite creates and drops databases and roles with it.

    cluster = Cluster.start()       # None when no binaries are found
    url = cluster.new_database()    # a fresh database with the schema applied
    cluster.stop()
"""

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path


def find_binaries():
    """The folder of initdb/pg_ctl/postgres, or None."""
    wanted = os.environ.get("EVENTSTORE_PG_BIN")
    candidates = [wanted] if wanted else sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                                key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in candidates:
        if folder and all(os.access(os.path.join(folder, tool), os.X_OK) for tool in ("initdb", "pg_ctl")):
            return folder
    return None


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Cluster:
    def __init__(self, binaries, folder, port, user):
        self.binaries, self.folder, self.port, self.user = binaries, folder, port, user
        self._names = itertools.count(1)
        self._template_ready = False
        self._free = []  # released databases, emptied, ready to be handed out again

    @classmethod
    def start(cls, fsync=False, extra=()):
        binaries = find_binaries()
        if binaries is None:
            return None
        folder = Path(tempfile.mkdtemp(prefix="eventstore-pg-"))
        user = "postgres" if os.geteuid() == 0 else None
        if user:
            entry = pwd.getpwnam(user)
            os.chown(folder, entry.pw_uid, entry.pw_gid)
        cluster = cls(binaries, folder, _free_port(), user)
        cluster._run("initdb", "-D", str(folder / "data"), "-U", "eventstore", "--auth-local=trust",
                     "--auth-host=reject", "--encoding=UTF8", "--locale=C")
        options = [f"-p {cluster.port}", f"-k {folder}", "-c listen_addresses=''", "-c unix_socket_permissions=0700",
                   "-c max_connections=400", "-c shared_buffers=64MB"]
        if not fsync:
            options += ["-c fsync=off", "-c synchronous_commit=on", "-c full_page_writes=off"]
        options += list(extra)
        cluster._run("pg_ctl", "-D", str(folder / "data"), "-l", str(folder / "log"), "-w", "-t", "60",
                     "-o", " ".join(options), "start")
        return cluster

    def _run(self, tool, *args):
        subprocess.run([os.path.join(self.binaries, tool), *args], check=True, capture_output=True,
                       user=self.user, cwd=self.folder, timeout=120)

    def url(self, dbname="postgres"):
        """The database's URL: the socket's folder as the host, percent-encoded."""
        return f"postgresql://eventstore@{urllib.parse.quote(str(self.folder), safe='')}:{self.port}/{dbname}"

    def new_database(self):
        """A new, empty database -> its URL. The first one gets the schema and
        becomes the template of the others (copying it is faster than
        applying the schema each time); a released one is handed out again
        (emptying it is faster still)."""
        import psycopg

        import eventstore_pg
        if self._free:
            return self._free.pop()
        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            if not self._template_ready:
                conn.execute("CREATE DATABASE template_eventstore")
                eventstore_pg.PostgresStorage(self.url("template_eventstore"), threads=1).close()
                self._template_ready = True
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template_eventstore")
        return self.url(name)

    def release(self, url):
        """A test is done with the database at ``url``: empty it for the next test,
        or drop it if the test left anything but rows behind (its own functions or
        triggers) or something still holds it."""
        import psycopg

        import eventstore_pg
        name = url.rsplit("/", 1)[1]
        # The failed-authentication counts of the servers of this URL: the next test starts afresh.
        try:
            os.unlink(eventstore_pg.local_file(url, "throttle"))
        except FileNotFoundError:
            pass
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                # A backend outlives its client's disconnection by a moment: give the
                # test's closed connections up to a second to go.
                deadline = time.monotonic() + 1
                while conn.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
                                   " AND pid <> pg_backend_pid()").fetchone()[0] and time.monotonic() < deadline:
                    time.sleep(0.005)
                extra = conn.execute(
                    "SELECT (SELECT COUNT(*) FROM pg_trigger WHERE NOT tgisinternal)"
                    " + (SELECT COUNT(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace)"
                    " + (SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
                    "    AND pid <> pg_backend_pid())").fetchone()[0]
                if extra == 3:  # the count trigger, its function, eventstore_take_sequences
                    conn.execute("SET lock_timeout = '2s'")
                    tables = conn.execute(  # every table but the schema's version
                        "SELECT string_agg(quote_ident(tablename), ', ') FROM pg_tables"
                        " WHERE schemaname = 'public' AND tablename <> 'eventstore_schema'").fetchone()[0]
                    conn.execute(f"TRUNCATE {tables}; ALTER SEQUENCE events_seq RESTART")
                    self._free.append(url)
                    return
        except psycopg.Error:
            pass
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self):
        try:
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
