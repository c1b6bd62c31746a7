"""The benchmark's baseline: a WSGI app that only reads the request body and
answers 200, served by waitress with exactly serve.py's settings."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import serve  # noqa: E402


def baseline_app(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)
    start_response("200 OK", [("Content-Length", "0")])
    return [b""]


if __name__ == "__main__":
    args = serve.parse_args()
    serve.run_waitress(baseline_app, args)
