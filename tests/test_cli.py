"""docs/API.md §9: the admin command line."""

import subprocess
import sys

import pytest

import eventstore
import eventstore_admin
from helpers import ROOT


def test_program_add_and_list(cli):
    cli("program", "add", "FOO", "--name", "Foo Courses")
    cli("program", "add", "BAR")
    assert cli("program", "list")[0] == "BAR\tBAR\tany-types\nFOO\tFoo Courses\tany-types\n"


def test_program_add_twice_without_name_fails_and_rename_works(cli):
    cli("program", "add", "FOO")
    assert "already exists" in cli("program", "add", "FOO", status=1)[1]
    cli("program", "add", "FOO", "--name", "New")
    assert cli("program", "list")[0] == "FOO\tNew\tany-types\n"


def test_program_add_rejects_a_bad_id(cli):
    assert "ProgramId" in cli("program", "add", "A-B", status=1)[1]


def test_user_add_prints_only_the_key_and_the_key_works(cli):
    cli("program", "add", "FOO")
    out, _ = cli("user", "add", "alice", "--write", "FOO")
    key = out.strip()
    assert out == key + "\n" and eventstore.API_KEY_RE.fullmatch(key)
    principal = cli.authenticate("alice", key)
    assert principal.grants == {"FOO": "write"} and not principal.is_system


def test_user_add_system(cli):
    key = cli("user", "add", "root", "--system")[0].strip()
    assert cli.authenticate("root", key).is_system


def test_grants_name_registered_programs_only(cli):
    assert "not a registered program: NOPE" in cli("user", "add", "alice", "--read", "NOPE", status=1)[1]
    cli("user", "add", "bob")
    assert "NOPE" in cli("user", "grant", "bob", "--write", "NOPE", status=1)[1]


def test_user_add_rejects_bad_and_duplicate_ids(cli):
    cli("user", "add", "has:colon", status=1)
    cli("user", "add", "alice")
    assert "already exists" in cli("user", "add", "alice", status=1)[1]


def test_grant_revoke_and_list(cli):
    cli("program", "add", "FOO")
    cli("program", "add", "BAR")
    cli("user", "add", "alice", "--read", "FOO")
    cli("user", "grant", "alice", "--write", "FOO", "--read", "BAR")
    cli("user", "add", "root", "--system")
    assert cli("user", "list")[0] == "alice\tread:BAR write:FOO\tactive\nroot\tSYSTEM\tactive\n"
    cli("user", "revoke", "alice", "BAR")
    assert "alice\twrite:FOO\tactive" in cli("user", "list")[0]
    assert "no grant" in cli("user", "revoke", "alice", "BAR", status=1)[1]
    cli("user", "grant", "nobody", "--read", "FOO", status=1)
    cli("user", "grant", "alice", status=1)


def test_disable_stops_every_key(cli):
    key = cli("user", "add", "alice")[0].strip()
    cli("user", "disable", "alice")
    assert "disabled" in cli("user", "list")[0]
    assert cli.authenticate("alice", key) is None
    cli("user", "disable", "ghost", status=1)


def test_a_disabled_user_takes_no_new_key_until_enabled_again(cli):
    key = cli("user", "add", "alice")[0].strip()
    revoked = cli("key", "add", "alice")[0].strip()
    cli("key", "revoke", "alice", revoked[:12])
    cli("user", "disable", "alice")
    out, err = cli("key", "add", "alice", status=1)
    assert out == "" and "disabled" in err and "user enable alice" in err
    assert len(cli("key", "list", "alice")[0].splitlines()) == 2
    cli("user", "enable", "alice")
    assert "alice\t-\tactive" in cli("user", "list")[0]
    assert cli.authenticate("alice", key) is not None
    assert cli.authenticate("alice", revoked) is None  # enabling brings back no revoked key
    assert cli.authenticate("alice", cli("key", "add", "alice")[0].strip()) is not None
    cli("user", "enable", "ghost", status=1)


def test_keys_add_list_revoke(cli):
    first = cli("user", "add", "alice")[0].strip()
    second = cli("key", "add", "alice")[0].strip()
    assert first != second
    lines = cli("key", "list", "alice")[0].splitlines()
    assert [line.split("\t")[0] for line in lines] == [first[:12], second[:12]]
    assert all("last used never" in line for line in lines)
    assert first not in "".join(lines) and first[12:] not in "".join(lines)
    cli("key", "revoke", "alice", first[:12])
    assert "revoked" in cli("key", "list", "alice")[0].splitlines()[0]
    assert cli.authenticate("alice", first) is None
    assert cli.authenticate("alice", second) is not None
    cli("key", "revoke", "alice", "esk_nonexist", status=1)
    cli("key", "add", "ghost", status=1)
    cli("key", "list", "ghost", status=1)


def test_a_file_that_is_not_a_database_is_refused_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database at all" * 200)
    assert eventstore_admin.main(["--db", str(bad), "program", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "Traceback" not in err


def test_the_db_defaults_to_eventstore_db_env(tmp_path):
    env = {"EVENTSTORE_DB": str(tmp_path / "env.db"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(ROOT / "eventstore.py"), "--create", "program", "add", "ENV"], env=env,
                   check=True, capture_output=True)
    assert (tmp_path / "env.db").exists()


def test_a_missing_database_file_is_refused_unless_asked_to_create_it(tmp_path, capsys):
    """A mistyped --db once made a new empty database and said nothing."""
    typo = tmp_path / "eventstroe.db"
    assert eventstore_admin.main(["--db", str(typo), "user", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(typo) in err and "--create" in err
    assert not typo.exists() and list(tmp_path.iterdir()) == []
    assert eventstore_admin.main(["--db", str(typo), "--create", "program", "add", "FOO"]) == 0
    assert eventstore_admin.main(["--db", str(typo), "program", "list"]) == 0
    assert capsys.readouterr().out.startswith("FOO\t")


def test_help_names_postgresql_urls():
    result = subprocess.run([sys.executable, str(ROOT / "eventstore.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "postgresql://" in result.stdout and "--create" in result.stdout


@pytest.mark.parametrize("command", [
    [], ["program"], ["program", "add"], ["program", "list"], ["user"], ["user", "add"], ["user", "grant"],
    ["user", "revoke"], ["user", "disable"], ["user", "enable"], ["user", "list"], ["key"], ["key", "add"],
    ["key", "list"], ["key", "revoke"], ["type"], ["type", "add"], ["type", "list"], ["type", "remove"],
    ["backup"], ["export"], ["import"],
])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, str(ROOT / "eventstore.py"), *command, "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("usage:")


def test_serve_says_how_to_run_it_where_waitress_is_missing():
    """`python serve.py` with a Python outside the venv (-S: no site-packages, so no waitress)."""
    result = subprocess.run([sys.executable, "-S", str(ROOT / "serve.py")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "waitress" in result.stderr and ".venv/bin/python serve.py" in result.stderr and "make run" in result.stderr


def test_serve_has_help():
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--threads" in result.stdout and "EVENTSTORE_DB" in result.stdout
