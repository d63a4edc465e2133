"""A local stand-in for the Hugging Face hub: ``huggingface_hub`` downloads from it through its real code paths
(``HEAD`` metadata with ``X-Repo-Commit`` / LFS ``X-Linked-Etag`` = sha256 / ``X-Linked-Size``, streamed ``GET``
with HTTP range requests for resumes). Files live in a local folder laid out as the hub repository."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """``FakeHub(root, repo_id)``: serves ``root/<path>`` at ``/<repo_id>/resolve/<rev>/<path>`` and ``/files/<path>``.

    ``cut_once``: file paths whose first full GET is cut after half the bytes (the client must resume).
    ``requests``: (method, path, Range header) of every request."""

    def __init__(self, root: Path, repo_id: str, cut_once: tuple[str, ...] = ()):
        self.root, self.repo_id, self.cut = Path(root), repo_id, set(cut_once)
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _file(self) -> tuple[Path | None, str]:
                p = self.path.split("?")[0]
                pre = f"/{hub.repo_id}/resolve/"
                if p.startswith(pre):
                    rel = p[len(pre):].split("/", 1)[1]
                elif p.startswith("/files/"):
                    rel = p[len("/files/"):]
                else:
                    return None, ""
                f = hub.root / rel
                return (f if f.is_file() else None), rel

            def _head(self, f: Path, length: int, status: int = 200, extra: dict | None = None) -> None:
                data = f.read_bytes()
                sha = hashlib.sha256(data).hexdigest()
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()

            def do_HEAD(self):  # noqa: N802
                f, rel = self._file()
                hub.requests.append(("HEAD", rel, None))
                if f is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._head(f, f.stat().st_size)

            def do_GET(self):  # noqa: N802
                f, rel = self._file()
                rng = self.headers.get("Range")
                hub.requests.append(("GET", rel, rng))
                if f is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = f.read_bytes()
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                if rng:
                    self._head(f, len(body), 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                else:
                    self._head(f, len(body))
                if rel in hub.cut and not rng:
                    hub.cut.discard(rel)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
