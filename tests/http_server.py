"""A plain HTTP server on loopback over a folder (Python's http.server: GET, HEAD and directory
listings, no PUT), for tests of http(s) SOURCEs against a real server."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default 5 drops fsspec's concurrent connections, retried 1 s later


@contextmanager
def serve_folder(folder: Path, heads: list[str] | None = None, listings: bool = True,
                 forbidden: tuple[str, ...] = ()) -> Iterator[str]:
    """Serve `folder`; yields the base URL. HEAD requests' paths are appended to `heads`.
    `listings=False`: a folder's URL answers 404, as on a server without an index page.
    A request whose path starts with one of `forbidden` answers 403."""

    class Handler(SimpleHTTPRequestHandler):
        def send_head(self):
            if self.path.startswith(forbidden) and forbidden:
                self.send_error(403, "Forbidden")
                return None
            return super().send_head()

        def list_directory(self, path):
            if listings:
                return super().list_directory(path)
            self.send_error(404, "No listing here")
            return None

        def do_HEAD(self):
            if heads is not None:
                heads.append(self.path)
            super().do_HEAD()

        def log_message(self, *args):
            pass

    server = _Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
