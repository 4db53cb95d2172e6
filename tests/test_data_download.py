"""download_amazon2023 / download_file against a local HTTP server on
127.0.0.1 serving files written here (no other network)."""

import gzip
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from plr.data import ChecksumError, DownloadError, download_amazon2023, download_file, read_interactions

CATEGORY = "Video_Games"


class Handler(BaseHTTPRequestHandler):
    files = {}       # url path -> bytes
    log = []         # (path, Range header or None)
    honour_range = True

    def log_message(self, *args):  # keep pytest output quiet
        pass

    def do_GET(self):
        self.log.append((self.path, self.headers.get("Range")))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        start = 0
        if rng and self.honour_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    Handler.files, Handler.log, Handler.honour_range = {}, [], True
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/bench", Handler
    httpd.shutdown()
    httpd.server_close()


def fixture_files():
    header = "user_id,parent_asin,rating,timestamp,history\n"
    hist = "A1 A2 A3 A4 A5"
    rows = {"train": "".join(f"U{k},A{6 + k % 2},5.0,{1000 + k},{hist}\n" for k in range(2000)),
            "valid": f"U1,A7,5.0,20,{hist} A6\n", "test": f"U2,A6,5.0,30,{hist} A7\n"}
    return {k: gzip.compress((header + v).encode(), mtime=0) for k, v in rows.items()}


def serve_all(handler, with_sha=False, wrong_sha=False):
    data = fixture_files()
    for kind, body in data.items():
        handler.files[f"/bench/{CATEGORY}.{kind}.csv.gz"] = body
        if with_sha:
            digest = hashlib.sha256(body + (b"x" if wrong_sha else b"")).hexdigest()
            handler.files[f"/bench/{CATEGORY}.{kind}.csv.gz.sha256"] = f"{digest}  {CATEGORY}.{kind}.csv.gz\n".encode()
    return data


def data_requests(handler):
    return [p for p, _ in handler.log if not p.endswith(".sha256")]


def test_download_then_cache_hit(server, tmp_path):
    base, handler = server
    data = serve_all(handler)
    paths = download_amazon2023(CATEGORY, tmp_path, base_url=base, progress=False)
    assert [p.name for p in paths] == [f"{CATEGORY}.{k}.csv.gz" for k in ("train", "valid", "test")]
    for p, kind in zip(paths, ("train", "valid", "test")):
        assert p.read_bytes() == data[kind]
        sidecar = p.with_name(p.name + ".sha256").read_text()  # recorded locally: the server has none
        assert sidecar.split()[0] == hashlib.sha256(data[kind]).hexdigest()
        assert not p.with_name(p.name + ".part").exists()
    assert len(data_requests(handler)) == 3
    again = download_amazon2023(CATEGORY, tmp_path, base_url=base, progress=False)
    assert again == paths and len(data_requests(handler)) == 3  # cache hit: nothing fetched
    inter = read_interactions(tmp_path / CATEGORY)
    assert inter.fmt == "amazon2023" and len(inter) == 2002
    download_amazon2023(CATEGORY, tmp_path, base_url=base, kinds=("valid",), force=True, progress=False)
    assert len(data_requests(handler)) == 4


def test_resume_from_partial(server, tmp_path):
    base, handler = server
    data = serve_all(handler, with_sha=True)
    body = data["train"]
    part = tmp_path / f"{CATEGORY}.train.csv.gz.part"
    assert len(body) > 5000
    part.write_bytes(body[:1000])
    (path,) = download_amazon2023(CATEGORY, tmp_path, base_url=base, kinds=("train",), progress=False)
    assert path.read_bytes() == body and not part.exists()
    assert (f"/bench/{CATEGORY}.train.csv.gz", "bytes=1000-") in handler.log
    # a server that ignores Range: the download restarts from zero
    handler.honour_range = False
    path.unlink()
    part.write_bytes(body[:500])
    download_amazon2023(CATEGORY, tmp_path, base_url=base, kinds=("train",), progress=False)
    assert path.read_bytes() == body
    # a complete .part (416 from the server) is verified and kept
    handler.honour_range = True
    path.unlink()
    part.write_bytes(body)
    download_amazon2023(CATEGORY, tmp_path, base_url=base, kinds=("train",), progress=False)
    assert path.read_bytes() == body


def test_checksum_mismatch(server, tmp_path):
    base, handler = server
    serve_all(handler, with_sha=True, wrong_sha=True)
    with pytest.raises(ChecksumError, match="checksum mismatch") as e:
        download_amazon2023(CATEGORY, tmp_path, base_url=base, kinds=("valid",), progress=False)
    assert f"{base}/{CATEGORY}.valid.csv.gz" in str(e.value)
    assert not (tmp_path / f"{CATEGORY}.valid.csv.gz").exists()
    assert not (tmp_path / f"{CATEGORY}.valid.csv.gz.part").exists()


def test_corrupted_cache_detected(server, tmp_path):
    base, handler = server
    serve_all(handler)
    (path,) = download_amazon2023(CATEGORY, tmp_path, base_url=base, kinds=("test",), progress=False)
    path.write_bytes(b"garbage")
    with pytest.raises(ChecksumError, match="does not match its checksum"):
        download_amazon2023(CATEGORY, tmp_path, base_url=base, kinds=("test",), progress=False)


def test_http_error_names_url(server, tmp_path):
    base, handler = server
    with pytest.raises(DownloadError, match=rf"{base}/Nope\.train\.csv\.gz: HTTP 404"):
        download_amazon2023("Nope", tmp_path, base_url=base, kinds=("train",), progress=False)


def test_offline_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}/bench"
    with pytest.raises(DownloadError, match=rf"cannot download {base}/{CATEGORY}\.train\.csv\.gz") as e:
        download_file(f"{base}/{CATEGORY}.train.csv.gz", tmp_path / "x.csv.gz", timeout=5, progress=False)
    assert "unreachable" in str(e.value) and isinstance(e.value, OSError)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="category"):
        download_amazon2023("../etc", tmp_path, progress=False)
    with pytest.raises(ValueError, match="kinds"):
        download_amazon2023(CATEGORY, tmp_path, kinds=("train", "dev"), progress=False)
