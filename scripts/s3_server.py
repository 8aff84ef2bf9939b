#!/usr/bin/env python3
"""An S3-compatible server on loopback for the scale-out setup and its tests: moto's S3
(PyPI `moto[server]`), served one request at a time.

moto checks `If-Match` / `If-None-Match` and then writes; its own `moto_server` handles
requests on threads, which would let two conditional puts pass the check together. One
request at a time makes each conditional put atomic, as it is on S3.

Usage: s3_server.py PORT [BUCKET ...]   (the buckets are created once it listens)
"""
import sys
import threading
import urllib.request

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


def main() -> None:
    port = int(sys.argv[1])
    server = make_server("127.0.0.1", port, DomainDispatcherApplication(create_backend_app),
                         threaded=False)
    for bucket in sys.argv[2:]:
        # Created through the server itself once it accepts connections.
        threading.Timer(0.2, lambda b=bucket: urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{port}/{b}", method="PUT"))).start()
    print(f"s3 listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
