"""A webhook receiver for eventstore (docs/API.md §11), standard library only:
copy it and put your handling in ``handle``. It verifies each delivery's
signature (Standard Webhooks: HMAC-SHA256 over ``id.timestamp.body``), refuses
one older than five minutes, skips a webhook-id it has handled already, and
answers 2xx only once the events are handled: anything else makes the registry
send the same delivery again later.

    WEBHOOK_SECRET=whsec_... python webhook_receiver.py 8000
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


def verify(secret, headers, body, tolerance=300):
    """Whether ``body`` (bytes) was signed with ``secret`` (whsec_...); ``headers`` with lowercase names."""
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return any(version == "v1" and hmac.compare_digest(base64.b64decode(signature), expected)
               for version, _, signature in (item.partition(",") for item in headers["webhook-signature"].split()))


handled = set()  # webhook-ids handled (keep them in your database, to skip a delivery sent again)


def handle(events):
    for event in events:
        print(event["Sequence"], event["EventId"], event.get("EventType"), flush=True)


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {name.lower(): value for name, value in self.headers.items()}
        if not verify(os.environ["WEBHOOK_SECRET"], headers, body):
            self.send_response(401)
        else:
            if headers["webhook-id"] not in handled:
                handle(json.loads(body)["data"]["Events"])
                handled.add(headers["webhook-id"])
            self.send_response(204)
        self.end_headers()


if __name__ == "__main__":
    HTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 8000), Receiver).serve_forever()
