"""Download exactly the files a release variant needs, with ``huggingface_hub``, into ``<dir>/<path in the repo>``.

``hf_hub_download(..., local_dir=dir)`` does the transfer: an interrupted download resumes from its
``.incomplete`` file (HTTP range requests) on the next call, and a file already complete is not downloaded again.
Files the hub repository does not hold (``url`` in the manifest: the Inception weights) go through
``huggingface_hub``'s ``http_get`` with the same resume logic (``<file>.incomplete`` + range request).

Verification: a file's size must equal the hub's (and the manifest's, when known); an LFS file's sha256 must equal
the hub's LFS object id; a manifest sha256, when known, must match. The size, sha256 and repository commit are
then recorded in ``<dir>/mmfm_release.lock.json``; later runs check a present file's size against that record
(``verify=True``: its sha256 too) without contacting the hub. A mismatch raises :class:`ReleaseError` and leaves the
bad file in place, renamed ``<file>.bad``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from mmfm_jax.release import manifest

log = logging.getLogger("mmfm_jax")
LOCK_FILE = "mmfm_release.lock.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ReleaseError(RuntimeError):
    """A downloaded file failed verification, or the hub could not be reached for a missing file."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_lock(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / LOCK_FILE
    return json.loads(path.read_text()) if path.exists() else {"repo_id": None, "files": {}}


def _write_lock(directory: Path, lock: dict[str, Any]) -> None:
    from mmfm_jax.storage import write_json_atomic

    write_json_atomic(directory / LOCK_FILE, lock)


def _download_url(url: str, dest: Path) -> None:
    from huggingface_hub.file_download import http_get

    tmp = dest.with_name(dest.name + ".incomplete")
    dest.parent.mkdir(parents=True, exist_ok=True)
    resume = tmp.stat().st_size if tmp.exists() else 0
    if resume:
        log.info("fetch-release: resuming %s at byte %d", dest.name, resume)
    with open(tmp, "ab") as f:
        http_get(url, f, resume_size=resume, displayed_filename=dest.name)
    tmp.replace(dest)


def _reject(dest: Path, why: str) -> None:
    bad = dest.with_name(dest.name + ".bad")
    dest.replace(bad)
    raise ReleaseError(f"{dest}: {why}; moved to {bad.name} (delete it and fetch again)")


def fetch_release(variant: str, directory: str | os.PathLike, *, guide: bool = True, evaluation: bool = True,
                  repo_id: str = manifest.REPO_ID, revision: str = manifest.REVISION, endpoint: str | None = None,
                  token: str | bool | None = None, verify: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Fetch variant ``variant``'s files into ``directory``. Returns ``{'files': {role: {...}}, 'bytes': total}``.

    ``guide=False`` skips the AutoGuidance guide, ``evaluation=False`` the FID reference batch and Inception weights.
    ``endpoint``: another hub endpoint (a mirror; default ``HF_ENDPOINT`` / huggingface.co). ``dry_run``: report
    sizes (from the hub) and what would be downloaded, download nothing.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    roles = manifest.files_for(variant, guide=guide, evaluation=evaluation)
    directory = Path(directory).absolute()
    lock = read_lock(directory)
    if lock.get("repo_id") not in (None, repo_id):
        raise ReleaseError(f"{directory / LOCK_FILE} was written for {lock['repo_id']!r}, not {repo_id!r}")
    lock["repo_id"] = repo_id
    out: dict[str, Any] = {}
    total = 0
    for role, key in roles.items():
        entry = manifest.FILES[key]
        rel = entry["path"]
        dest = directory / rel
        rec = lock["files"].get(rel)
        if dest.exists() and rec is not None and dest.stat().st_size == rec["size"] and (
                not verify or sha256_file(dest) == rec["sha256"]):
            out[role] = dict(path=str(dest), size=rec["size"], status="present")
            total += rec["size"]
            continue
        url = entry.get("url")
        meta = None
        if url is None:
            meta = get_hf_file_metadata(hf_hub_url(repo_id, rel, repo_type=manifest.REPO_TYPE, revision=revision,
                                                   endpoint=endpoint), token=token, endpoint=endpoint)
        size = meta.size if meta is not None else entry["size"]
        if dry_run:
            out[role] = dict(path=str(dest), size=size, status="to download", source=url or f"{repo_id}/{rel}")
            total += size or 0
            continue
        log.info("fetch-release: %s (%s) <- %s", role, rel, url or repo_id)
        if url is None:
            hf_hub_download(repo_id, rel, repo_type=manifest.REPO_TYPE, revision=revision, local_dir=directory,
                            endpoint=endpoint, token=token)
        else:
            _download_url(url, dest)
        got_size, digest = dest.stat().st_size, sha256_file(dest)
        for want, what in ((size, "hub size"), (entry["size"], "manifest size")):
            if want is not None and got_size != want:
                _reject(dest, f"{got_size} bytes, {what} {want}")
        lfs = (meta.etag or "") if meta is not None else ""
        for want, what in ((lfs if _SHA256.match(lfs) else None, "the hub's LFS sha256"),
                           (entry["sha256"], "the manifest's sha256"),
                           (rec["sha256"] if rec else None, f"the sha256 recorded in {LOCK_FILE}")):
            if want is not None and digest != want:
                _reject(dest, f"sha256 {digest} != {what} {want}")
        lock["files"][rel] = dict(size=got_size, sha256=digest, commit=meta.commit_hash if meta else None,
                                  source=url or f"{repo_id}@{revision}")
        _write_lock(directory, lock)
        out[role] = dict(path=str(dest), size=got_size, sha256=digest, status="downloaded")
        total += got_size
    if not dry_run:
        _write_lock(directory, lock)
    return dict(variant=variant, dir=str(directory), repo_id=repo_id, files=out, bytes=total)
