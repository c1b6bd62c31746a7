"""The WSGI hosts the README names, each started on a loopback port around
make_app as the README runs it: for tests/test_hosts.py and bench/hosts.py."""

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's: gunicorn, and the pyuwsgi wheel's uwsgi

# The hosts as the README runs them (it shows these command lines, and a test
# checks that it still does), then Werkzeug's threaded server and serve.py with
# their defaults. ``app:application`` is the embedding module of the README.
GUNICORN_SYNC = "gunicorn -w 3 -c gunicorn.conf.py app:application"
GUNICORN_GTHREAD = "gunicorn -k gthread -w 2 --threads 8 -c gunicorn.conf.py app:application"
UWSGI = ("uwsgi --http-socket :8080 --module app:application --master --processes 2 --threads 4 "
         "--die-on-term --lazy-apps")
WERKZEUG = ("{python} -c from werkzeug.serving import run_simple; import app; "
            "run_simple('127.0.0.1', {port}, app.application, threaded=True)")
SERVE_PY = "{python} {code}/serve.py --port {port} --db {db}"
WSGIREF = ("{python} -c import app; from wsgiref.simple_server import make_server; "
           "make_server('127.0.0.1', {port}, app.application).serve_forever()")  # the README's example
# name -> (command line, make_app options)
HOSTS = {
    "gunicorn sync": (GUNICORN_SYNC, {}),
    "gunicorn gthread": (GUNICORN_GTHREAD, {"max_waiting": 4}),
    "uWSGI": (UWSGI, {}),
    "Werkzeug": (WERKZEUG, {}),
    "serve.py": (SERVE_PY, {}),
    "wsgiref": (WSGIREF, {}),
}


def readme_gunicorn_conf(readme):
    """The gunicorn.conf.py a README shows, as pasted from it."""
    found = re.search(r"```python\n((?:(?!```).)*?def post_worker_init.*?)```", readme, re.S)
    assert found, "the README shows a gunicorn.conf.py"
    return textwrap.dedent(found.group(1))


def argv_of(command):
    """A command line as the README shows it -> argv here: on {port}, with this
    venv's tools ({python}, {bin}), the app from the module ``app``."""
    if command.startswith("{python} -c "):
        return ["{python}", "-c", command.removeprefix("{python} -c ")]
    argv = command.replace(":8080", "127.0.0.1:{port}").split()
    if argv[0] == "gunicorn":
        argv[0:1] = ["{python}", "-m", "gunicorn", "-b", "127.0.0.1:{port}"]
    elif argv[0] == "uwsgi":
        argv[0] = "{bin}/uwsgi"
    return argv


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def basic(user_id, key):
    return {"Authorization": "Basic " + base64.b64encode(f"{user_id}:{key}".encode()).decode()}


class Host:
    """``command`` (a HOSTS command line) serving make_app(db, **options), from
    the module app.py it writes in ``folder`` (beside the README's
    gunicorn.conf.py), with the eventstore of ``code``; ``wrapped``: the app
    inside a plain middleware function. The host's output goes to host.log."""

    def __init__(self, folder, db, command, options=None, wrapped=False, code=ROOT, startup_seconds=30):
        folder, code = Path(folder), Path(code)
        self.port = free_port()
        (folder / "app.py").write_text(textwrap.dedent(f"""\
            from eventstore import make_app

            app = make_app({str(db)!r}, **{options or {}!r})

            def wrapper(environ, start_response):  # a plain middleware function
                return app(environ, start_response)

            application = {"wrapper" if wrapped else "app"}
            """))
        (folder / "gunicorn.conf.py").write_text(readme_gunicorn_conf((code / "README.md").read_text()))
        self.log_path = folder / "host.log"
        argv = [part.format(port=self.port, python=sys.executable, bin=BIN, code=code, db=db)
                for part in argv_of(command)]
        # eventstore importable as if installed; the app's module from ``folder``
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(folder)])}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + startup_seconds
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the host exited:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the host did not answer within {startup_seconds} s:\n{self.log()}")
            try:
                if self.request("GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def request(self, method, path, body=None, headers=None, timeout=5):
        """-> (status, headers, body bytes); raises OSError (a timeout too) without an answer."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=payload, headers={
                **({"Content-Type": "application/json"} if payload else {}), **(headers or {})})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def stop(self, timeout=20):
        """SIGTERM to the host's first process -> seconds until it exited, or
        None if it had not within ``timeout`` (then its process group is killed)."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
            took = time.monotonic() - started
        except subprocess.TimeoutExpired:
            took = None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of its group is left
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(10)
        return took
