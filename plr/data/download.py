"""Download the Amazon Reviews 2023 benchmark files (5-core, ``timestamp_w_his``).

Files come from the McAuley lab's data repository::

    {base_url}/{category}.{kind}.csv.gz      kind in train / valid / test
    base_url = https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/benchmark/5core/timestamp_w_his

(the same files are mirrored uncompressed on the Hugging Face dataset
McAuley-Lab/Amazon-Reviews-2023 under ``benchmark/5core/timestamp_w_his``;
pass ``base_url`` and the readers accept both ``.csv`` and ``.csv.gz``).

Caching and integrity (``download_file``):

- a complete file ``dest/<name>`` is never fetched again (unless ``force``);
  if its checksum sidecar ``<name>.sha256`` exists, the file is re-hashed and a
  mismatch is an error;
- bytes are written to ``<name>.part``; an interrupted download resumes with an
  HTTP ``Range`` request (a server that ignores ``Range`` restarts it);
- if the server publishes ``<url>.sha256`` it is fetched and the file must
  match it, else the sha256 of the downloaded file is recorded locally in
  ``<name>.sha256`` (``sha256sum`` format) so later corruption is caught;
- the ``.part`` file is renamed to ``<name>`` atomically once complete and verified.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["download_amazon2023", "download_file", "DownloadError", "ChecksumError", "OFFICIAL_BASE_URL",
           "AMAZON2023_CATEGORIES"]

OFFICIAL_BASE_URL = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/benchmark/5core/timestamp_w_his"

#: The 5-core categories of the benchmark (the paper uses CDs_and_Vinyl, Movies_and_TV, Video_Games).
AMAZON2023_CATEGORIES = (
    "All_Beauty", "Arts_Crafts_and_Sewing", "Automotive", "Baby_Products", "Beauty_and_Personal_Care", "Books",
    "CDs_and_Vinyl", "Cell_Phones_and_Accessories", "Clothing_Shoes_and_Jewelry", "Electronics", "Gift_Cards",
    "Grocery_and_Gourmet_Food", "Health_and_Household", "Home_and_Kitchen", "Industrial_and_Scientific",
    "Kindle_Store", "Magazine_Subscriptions", "Movies_and_TV", "Musical_Instruments", "Office_Products",
    "Patio_Lawn_and_Garden", "Pet_Supplies", "Software", "Sports_and_Outdoors", "Tools_and_Home_Improvement",
    "Toys_and_Games", "Video_Games", "Unknown",
)

_CHUNK = 1 << 20


class DownloadError(OSError):
    """A file could not be downloaded (offline, HTTP error, incomplete transfer)."""


class ChecksumError(DownloadError):
    """A downloaded or cached file does not match its sha256."""


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _parse_sidecar(text: str) -> Optional[str]:
    """The digest of a ``sha256sum``-style line ("<hex>  <name>" or "<hex>"), else None."""
    tokens = text.strip().split()
    if tokens and re.fullmatch(r"[0-9a-fA-F]{64}", tokens[0]):
        return tokens[0].lower()
    return None


def _fetch_remote_checksum(url: str, data_url: str, timeout: float) -> Optional[str]:
    """The server's sha256 for ``data_url`` from ``url``, or None when it has none."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return _parse_sidecar(resp.read(4096).decode("utf-8", "replace"))
    except urllib.error.HTTPError:
        return None  # no sidecar published (404) or not served: record one locally
    except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot download {data_url}: {reason} (offline, or the server is unreachable)") from exc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def download_file(url: str, path, *, force: bool = False, timeout: float = 30, progress: bool = True,
                  checksum_url: Optional[str] = None) -> Path:
    """Download ``url`` to ``path`` with caching, resume and sha256 checks
    (see the module docstring). Returns ``path``.

    Raises:
        DownloadError: offline / connection refused / HTTP error / short transfer
            (the message names the URL; a partial ``.part`` is kept for resuming).
        ChecksumError: the file does not match the server's or the recorded sha256.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_name(path.name + ".sha256")
    part = path.with_name(path.name + ".part")
    if force:
        for p in (path, part, sidecar):
            if p.exists():
                p.unlink()
    if path.exists():
        if sidecar.exists():
            want = _parse_sidecar(sidecar.read_text())
            got = sha256_file(path)
            if want and got != want:
                raise ChecksumError(f"cached file {path} does not match its checksum {sidecar} (expected sha256 "
                                    f"{want}, got {got}); delete it or pass force=True to download {url} again")
        return path

    remote = _fetch_remote_checksum(checksum_url or url + ".sha256", url, timeout)
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "plr-downloader", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # The .part already holds every byte (or is bogus): verify below / restart.
            m = re.search(r"/(\d+)", exc.headers.get("Content-Range", "") or "")
            if not (m and int(m.group(1)) == offset):
                part.unlink()
                return download_file(url, path, timeout=timeout, progress=progress, checksum_url=checksum_url)
            resp = None
        else:
            raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, socket.timeout, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot download {url}: {reason} (offline, or the server is unreachable)") from exc

    if resp is not None:
        with resp:
            if offset and resp.status != 206:
                offset = 0  # the server ignored Range: start over
            length = resp.headers.get("Content-Length")
            total = int(length) + offset if length is not None else None
            mode = "ab" if offset else "wb"
            with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                              unit_divisor=1024, desc=path.name, disable=not progress,
                                              leave=False) as bar:
                try:
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        fh.write(chunk)
                        bar.update(len(chunk))
                except (OSError, socket.timeout) as exc:
                    raise DownloadError(f"download of {url} interrupted after {fh.tell()} bytes: {exc}; "
                                        f"run again to resume from {part}") from exc
        size = part.stat().st_size
        if total is not None and size != total:
            raise DownloadError(f"download of {url} is incomplete: expected {total} bytes, got {size}; "
                                f"run again to resume from {part}")
    digest = sha256_file(part)
    if remote is not None and digest != remote:
        part.unlink()
        raise ChecksumError(f"checksum mismatch for {url}: the server's sha256 is {remote}, the downloaded "
                            f"file's is {digest}; the partial file was removed, download again")
    os.replace(part, path)
    _write_atomic(sidecar, f"{digest}  {path.name}\n")
    return path


def download_amazon2023(category: str, dest, *, base_url: str = OFFICIAL_BASE_URL,
                        kinds: Sequence[str] = ("train", "valid", "test"), force: bool = False,
                        timeout: float = 30, progress: bool = True, suffix: str = ".csv.gz") -> List[Path]:
    """Fetch ``{base_url}/{category}.{kind}{suffix}`` for each kind into ``dest``.

    Returns the local paths (``dest/<category>.<kind>.csv.gz``), ready for
    ``read_interactions(dest / category, fmt="amazon2023")``.
    """
    if not isinstance(category, str) or not re.fullmatch(r"[A-Za-z0-9_&\-]+", category):
        raise ValueError(f"category: expected an Amazon 2023 category name such as 'Video_Games' "
                         f"(one of {', '.join(AMAZON2023_CATEGORIES)}), got {category!r}")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in ("train", "valid", "test")]
    if bad or not kinds:
        raise ValueError(f"kinds: expected a non-empty subset of ('train', 'valid', 'test'), got {kinds!r}")
    dest = Path(dest)
    out = []
    for kind in kinds:
        name = f"{category}.{kind}{suffix}"
        out.append(download_file(f"{base_url.rstrip('/')}/{name}", dest / name, force=force, timeout=timeout,
                                 progress=progress))
    return out
