"""pip install: the repository builds into a wheel that installs in a fresh
virtual environment and serves from any folder (once, embedding needed
PYTHONPATH or copying files that no page listed)."""

import json
import os
import shlex
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

import eventstore
from server import ROOT, Server

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel `pip install .` builds (with the build backend of the test tools:
    no download)."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(folder), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=300)
    [built] = folder.glob("eventstore-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel installed (without its
    dependencies: those of the running one are lent to it by a .pth file, so the
    test downloads nothing) -> its bin folder."""
    folder = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--disable-pip-version-check", str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "lent-by-the-tests.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return folder / "bin"


def test_the_wheel_holds_every_module_the_files_they_read_and_three_commands(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.name for path in ROOT.glob("eventstore*.py")} | {"serve.py"}
    assert modules <= names, modules - names
    shipped = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    for source, target in shipped.items():
        path = ROOT / source
        expected = {target} if path.is_file() else {f"{target}/{p.relative_to(path)}" for p in path.rglob("*")
                                                     if p.is_file()}
        assert target.startswith("eventstore_data/") and expected <= names, source
    # Every file or folder the code finds with data_path() is shipped.
    import re
    named = {name for path in ROOT.glob("*.py") for name in
             re.findall(r"""data_path\(["']([^"']+)["']\)""", path.read_text(encoding="utf-8"))}
    assert named and named <= set(shipped), named - set(shipped)
    metadata = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/METADATA").decode()
    assert "Provides-Extra: postgres" in metadata and 'psycopg[binary]' in metadata
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt").decode()
    for command in ("eventstore-serve = serve:main", "eventstore-admin = eventstore_admin:main",
                    "eventstore-client = eventstore_client:main"):
        assert command in entry_points


def test_installed_it_imports_and_serves_from_any_folder(venv, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(venv / "python"), "-c", "import eventstore, eventstore_pg, serve; "
                            "print(eventstore.__file__); print(eventstore.OPENAPI_PATH)"],
                           cwd=elsewhere, check=True, capture_output=True, text=True, timeout=60).stdout.split()
    assert all(Path(path).is_relative_to(venv.parent) for path in where), where  # not the repository's
    served = Server(elsewhere / "events.db", program=(str(venv / "eventstore-serve"),), cwd=elsewhere,
                    processes=2)  # the workers run the installed serve.py too
    try:
        status, _, document = served.request("GET", "/openapi.json")
        assert status == 200 and document == json.loads((ROOT / "openapi.json").read_bytes())
        for path, name in (("/console", "index.html"), ("/console/console.js", "console.js")):  # the console ships
            status, headers, page = served.request("GET", path)
            assert status == 200 and page == (ROOT / "console" / name).read_bytes(), path
        served.register("FOO")  # the schema was applied
        # The banner's command, as printed, works from where the server runs.
        command = shlex.split(served.banner.split("More users: ", 1)[1].splitlines()[0])
        command[command.index("USER_ID")] = "reader"
        command[command.index("PROGRAM_ID")] = "FOO"
        made = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0 and eventstore.API_KEY_RE.fullmatch(made.stdout.strip()), made.stderr
        admin = subprocess.run([str(venv / "eventstore-admin"), "--db", "events.db", "user", "list"], cwd=elsewhere,
                               capture_output=True, text=True, timeout=60)
        assert admin.returncode == 0 and "reader" in admin.stdout, admin.stderr
        client = subprocess.run([str(venv / "eventstore-client"), "--url", f"http://127.0.0.1:{served.port}",
                                 "--user", "reader", "get", "FOO-1"], cwd=elsewhere, capture_output=True, text=True,
                                timeout=60, env={**os.environ, "EVENTSTORE_KEY": made.stdout.strip()})
        assert client.returncode != 0 and "404" in client.stderr, client.stdout + client.stderr
    finally:
        served.stop()
