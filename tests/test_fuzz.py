"""Fuzzing from the contract: schemathesis, every check on, against the live
server's /openapi.json, as a SYSTEM user on SQLite (a run takes about 40 s
whatever its budget: schemathesis's phases end by themselves, so `make test`
runs one). `make fuzz` (which sets FUZZ_SEED) also fuzzes as that user on
PostgreSQL, and as a user with read on one program only. FUZZ_SECONDS sets each
run's budget (default 20), FUZZ_SEED the seed (default 1; `make fuzz` runs several)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import create_user
from server import ROOT, Server

SECONDS = int(os.environ.get("FUZZ_SECONDS", "20"))
SEED = os.environ.get("FUZZ_SEED", "1")
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@pytest.fixture
def server(db):
    # --no-webhook-delivery: a webhook the fuzzer makes must never post anywhere
    server = Server(db, "--max-auth-failures", "0", "--no-webhook-delivery")  # bad credentials on purpose
    server.register("FOO")
    server.reader_key = create_user(db, "reader", {"FOO": "read"})
    yield server
    server.stop()


def fuzz(server, user, key):
    result = subprocess.run(
        [str(SCHEMATHESIS), "run", f"http://127.0.0.1:{server.port}/openapi.json", "--auth", f"{user}:{key}",
         "--checks", "all", "--mode", "all", "--seed", SEED, "--max-time", str(SECONDS),
         "--request-timeout", "40", "--max-response-time", "35", "--no-color"],
        capture_output=True, text=True, cwd=ROOT / "tests",
        env={**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"})
    summary = re.search(r"(\d+) generated, .*", result.stdout)
    print(f"schemathesis as {user}, seed {SEED}: {summary.group(0) if summary else '?'}")
    return result


LONGER = bool(os.environ.get("FUZZ_SEED"))  # make fuzz
USERS = [pytest.param("admin", marks=[] if LONGER else [pytest.mark.sqlite_only])] + (
    [pytest.param("reader", marks=pytest.mark.sqlite_only)] if LONGER else [])


@pytest.mark.timeout(SECONDS * 2 + 180)
@pytest.mark.parametrize("user", USERS)
def test_schemathesis_finds_nothing(server, user):
    key = server.admin_key if user == "admin" else server.reader_key
    result = fuzz(server, user, key)
    report = result.stdout
    start = min((i for i in (report.find("ERRORS ="), report.find("FAILURES =")) if i >= 0), default=0)
    assert result.returncode == 0, report[start:][:8000]
    assert "Traceback" not in "".join(server.log)
