"""A local Google Cloud Storage API for tests: gcp-storage-emulator on 127.0.0.1.

``gcs_emulator`` (session) starts the server and points every client at it: ``STORAGE_EMULATOR_HOST`` for gcsfs /
google-cloud-storage (what ``etils.epath`` uses for ``gs://``), ``TENSORSTORE_GCS_HTTP_URL`` with
``GOOGLE_AUTH_TOKEN_FOR_TESTING`` for tensorstore (Orbax). Subprocesses started by a test inherit the variables.
``gcs_dir`` gives each test a fresh ``gs://`` prefix in the emulator's bucket.
"""

from __future__ import annotations

import logging
import os
import uuid

import portpicker
import pytest

BUCKET = "mmfm-test"


def _send_generation_headers() -> None:
    """Downloads from real GCS carry ``x-goog-generation``; the emulator's do not, and tensorstore's OCDBT then fails
    ("Malformed StorageGeneration") as soon as it re-reads a manifest (any Orbax save of more than one array)."""
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "_mmfm", False):
        return
    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001  (not found: the plain handler already answered 404)
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])

    download._mmfm = True
    objects.download = download  # objects.get (the JSON API's ?alt=media) looks it up at call time


@pytest.fixture(scope="session")
def gcs_emulator():
    from gcp_storage_emulator.server import create_server

    _send_generation_headers()

    port = portpicker.pick_unused_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                            "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GOOGLE_CLOUD_PROJECT")}
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test",
                      GOOGLE_CLOUD_PROJECT="test")
    # The emulator logs every request and gcsfs warns that there are no real credentials: both are expected here.
    for name in ("gcp_storage_emulator", "gcsfs", "google.auth"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def gcs_dir(gcs_emulator) -> str:
    """A fresh, empty ``gs://`` prefix (a string URI) for one test."""
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"
