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


def announce(args, port, processes):
    print(f"baseline serving on http://{args.host}:{port} with {processes} processes", file=sys.stderr)


if __name__ == "__main__":
    args = serve.parse_args()
    processes = args.processes or 1
    if args.worker or processes == 1:
        serve.pin_to_cpu(args)  # served the same way as eventstore, pinning included
        serve.run_until_stopped(serve.create_waitress(baseline_app, args, reuse_port=args.worker))
    else:
        sys.exit(serve.supervise(args, sys.argv[1:], processes, prepare=announce, script=__file__))
