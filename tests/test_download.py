"""The dataset downloader against a loopback HTTP server that the tests start themselves.

No test reaches the internet: every download gets ``url=`` pointing at 127.0.0.1 (a guard on
``urllib.request.urlopen`` fails any other host), and the archives are built here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import os
import re
import stat
import subprocess
import sys
import tarfile
import threading
import types
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metarec_runner.data import archive as unpack
from metarec_runner.data import download as dl
from metarec_runner.data import registry
from metarec_runner.data.download import download
from metarec_runner.data.registry import Checksum
from metarec_runner.errors import ConfigError, DataError

ML100K_FILES = {
    "u.data": b"1\t10\t4\t881250949\n1\t20\t3\t881250950\n2\t10\t5\t881250951\n",
    "u.item": "10|Caf\xe9 (1995)|01-Jan-1995||http://x|0|1\n".encode("latin-1")
    + b"20|Toy (1995)|01-Jan-1995||http://y|1|0\n",
    "u.user": b"1|24|M|technician|85711\n2|53|F|other|94043\n",
}
LASTFM_FILES = {
    "user_artists.dat": b"userID\tartistID\tweight\r\n2\t51\t13883\r\n2\t52\t11690\r\n",
    "artists.dat": b"id\tname\turl\tpictureURL\n51\tDuran Duran\thttp://a\thttp://b\n",
    "tags.dat": b"tagID\ttagValue\r\n1\tmetal\r\n",
    "user_friends.dat": b"userID\tfriendID\r\n2\t275\r\n",
}


# -- archives -----------------------------------------------------------------------------------


def make_zip(path: Path, files: dict[str, bytes], *,
             symlinks: dict[str, str] | None = None) -> Path:
    """A zip of ``files`` (entry name -> bytes), plus unix symlink entries (name -> target)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def make_tar(path: Path, files: dict[str, bytes], *,
             links: dict[str, tuple[bytes, str]] | None = None) -> Path:
    """A .tar.gz of ``files``, plus link entries (name -> (tar type, target))."""
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    return path


def ml100k_entries(prefix: str = "ml-100k/") -> dict[str, bytes]:
    return {prefix + k: v for k, v in ML100K_FILES.items()}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# -- loopback server ----------------------------------------------------------------------------


class Server:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``root``; ``log`` records (path, Range header)."""

    def __init__(self, root: Path, *, ranges: bool, drop: int) -> None:
        self.root, self.ranges, self.drop = root, ranges, drop
        self.log: list[tuple[str, str | None]] = []
        self._served: dict[str, int] = {}
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                path = server.root / urllib.parse.unquote(self.path.lstrip("/"))
                rng = self.headers.get("Range")
                with server._lock:
                    server.log.append((self.path, rng))
                    n = server._served[self.path] = server._served.get(self.path, 0) + 1
                if not path.is_file():
                    self.send_error(404)
                    return
                data, start = path.read_bytes(), 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if server.ranges and m:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Last-Modified", "Wed, 01 Jan 2020 00:00:00 GMT")
                if server.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if n <= server.drop:  # break the transfer halfway
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return Handler


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """``serve(ranges=False, drop=0)``: a loopback server over ``tmp_path/srv``.

    ``drop=k`` breaks the first k transfers of each path halfway; ``ranges`` honours
    ``Range: bytes=N-`` with a 206 answer.
    """
    servers: list[Server] = []
    (tmp_path / "srv").mkdir(exist_ok=True)

    def start(*, ranges: bool = False, drop: int = 0) -> Server:
        servers.append(Server(tmp_path / "srv", ranges=ranges, drop=drop))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No backoff waits, no proxies, no data dir outside tmp, and no host but 127.0.0.1."""
    monkeypatch.setattr(dl, "BACKOFF_S", 0.0)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("METAREC_DATA_DIR", str(tmp_path / "default-data"))
    real = urllib.request.urlopen

    def guarded(req, *args, **kwargs):  # type: ignore[no-untyped-def]
        url = req.full_url if isinstance(req, urllib.request.Request) else req
        parts = urllib.parse.urlsplit(url)
        assert parts.scheme == "file" or parts.hostname == "127.0.0.1", f"non-loopback {url}"
        return real(req, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", guarded)


def pin(monkeypatch: pytest.MonkeyPatch, name: str, archive: Path | None,
        **changes: object) -> None:
    """Swap the registry entry of ``name``: pin ``archive``'s md5 (None: unpinned) and more."""
    spec = registry.DATASETS[name]
    checksum = Checksum("md5", md5(archive)) if archive is not None else None
    monkeypatch.setitem(registry.DATASETS, name,
                        dataclasses.replace(spec, checksum=checksum, **changes))


def assert_clean(root: Path, tmp_path: Path) -> None:
    """Nothing under the data dir (no partial dataset, no temp files) and no evil file anywhere."""
    assert not root.exists() or sorted(p.name for p in root.iterdir()) == []
    assert [p for p in tmp_path.rglob("*evil*")] == []


# -- registry -----------------------------------------------------------------------------------


def test_registry_entries_are_complete() -> None:
    assert set(registry.names()) == {"ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m",
                                     "ml-latest-small", "ml-latest", "hetrec2011-lastfm-2k"}
    for spec in registry.DATASETS.values():
        assert spec.url.startswith("https://files.grouplens.org/datasets/")
        assert spec.url.endswith(".zip") and spec.approx_bytes > 0 and spec.files
        assert spec.licence and spec.description
        if spec.checksum is not None:
            assert spec.checksum.algorithm == "md5"
            assert re.fullmatch(r"[0-9a-f]{32}", spec.checksum.hexdigest)
    ml = registry.DATASETS
    assert str(ml["ml-100k"].checksum) == "md5:0e33842e24a9c977be4e0107933c0723"
    assert str(ml["ml-1m"].checksum) == "md5:c4d9eecfca2ab87c1945afe126590906"
    assert ml["ml-10m"].inner_dir == "ml-10M100K"
    assert ml["ml-latest-small"].inner_dir == "ml-latest-small"
    assert ml["hetrec2011-lastfm-2k"].inner_dir is None
    assert ml["ml-latest"].checksum is None and ml["ml-latest-small"].checksum is None


def test_data_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("METAREC_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.data_dir(str(tmp_path / "cli")) == tmp_path / "cli"
    assert registry.data_dir() == tmp_path / "env"
    monkeypatch.delenv("METAREC_DATA_DIR")
    assert registry.data_dir() == tmp_path / "xdg" / "metarec" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.data_dir() == tmp_path / "home" / ".cache" / "metarec" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert registry.data_dir() == tmp_path / "home" / ".cache" / "metarec" / "data"


def test_is_present_needs_every_expected_file(tmp_path: Path) -> None:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    for name in ("u.data", "u.item"):
        (folder / name).write_bytes(b"x")
    assert not registry.is_present("ml-100k", tmp_path)
    (folder / "u.user").write_bytes(b"x")
    assert registry.is_present("ml-100k", tmp_path)


def test_unknown_name_lists_the_known_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ml-100k, ml-1m, .*hetrec2011-lastfm-2k") as err:
        download("ml-99k", root=tmp_path / "data", url="http://127.0.0.1:9/x.zip")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data").exists()


# -- good downloads -----------------------------------------------------------------------------


def test_good_archive_is_verified_and_lands_atomically(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    archive = make_zip(tmp_path / "srv" / "ml-100k.zip", ml100k_entries())
    pin(monkeypatch, "ml-100k", archive)
    root = tmp_path / "data"
    replaced: list[tuple[str, str]] = []
    real_replace = dl.os.replace

    def spy(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst) == root / "ml-100k":  # the folder appears only complete, in one rename
            assert all((Path(src) / f).is_file() for f in ML100K_FILES)
        replaced.append((str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(dl.os, "replace", spy)
    out = download("ml-100k", root=root, url=server.url("ml-100k.zip"), progress=False)
    assert out == root / "ml-100k"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == ML100K_FILES
    assert [Path(d) for _, d in replaced] == [out]
    assert sorted(p.name for p in root.iterdir()) == ["ml-100k"]  # no temp files left
    assert registry.is_present("ml-100k", root)


def test_present_dataset_is_kept_without_network_unless_force(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    archive = make_zip(tmp_path / "srv" / "ml-100k.zip", ml100k_entries())
    pin(monkeypatch, "ml-100k", archive)
    root = tmp_path / "data"
    url = server.url("ml-100k.zip")
    download("ml-100k", root=root, url=url, progress=False)
    (root / "ml-100k" / "u.data").write_bytes(b"edited")
    assert download("ml-100k", root=root, url=url, progress=False) == root / "ml-100k"
    assert len(server.log) == 1 and (root / "ml-100k" / "u.data").read_bytes() == b"edited"
    download("ml-100k", root=root, url=url, force=True, progress=False)
    assert len(server.log) == 2
    assert (root / "ml-100k" / "u.data").read_bytes() == ML100K_FILES["u.data"]
    assert sorted(p.name for p in root.iterdir()) == ["ml-100k"]


def test_inner_folder_is_renamed_to_the_registry_name(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    files = {"ratings.dat": b"1::122::5::838985046\n",
             "movies.dat": b"122::Boomerang (1992)::Comedy\n",
             "tags.dat": b"15::4973::excellent!::1215184630\n", "README.html": b"<html></html>"}
    archive = make_zip(tmp_path / "srv" / "ml-10m.zip",
                       {f"ml-10M100K/{k}": v for k, v in files.items()})
    pin(monkeypatch, "ml-10m", archive)
    out = download("ml-10m", root=tmp_path / "data", url=server.url("ml-10m.zip"), progress=False)
    assert out == tmp_path / "data" / "ml-10m"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_unverified_archive_is_refused_unless_allowed(serve, tmp_path, capsys) -> None:
    server = serve()
    archive = make_zip(tmp_path / "srv" / "lastfm.zip", LASTFM_FILES)  # files at the top level
    root = tmp_path / "data"
    with pytest.raises(DataError, match="--allow-unverified") as err:
        download("hetrec2011-lastfm-2k", root=root, url=server.url("lastfm.zip"), progress=False)
    assert "\n" not in str(err.value) and server.log == []  # refused before any transfer
    out = download("hetrec2011-lastfm-2k", root=root, url=server.url("lastfm.zip"),
                   allow_unverified=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == LASTFM_FILES
    assert md5(archive) in capsys.readouterr().err  # the warning names the md5 to check


def test_tar_gz_archives_are_supported(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    archive = make_tar(tmp_path / "srv" / "ml-100k.tar.gz", ml100k_entries())
    pin(monkeypatch, "ml-100k", archive)
    out = download("ml-100k", root=tmp_path / "data", url=server.url("ml-100k.tar.gz"),
                   progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == ML100K_FILES


def test_local_path_works_as_url(monkeypatch, tmp_path) -> None:
    (tmp_path / "srv").mkdir()
    archive = make_zip(tmp_path / "srv" / "ml-100k.zip", ml100k_entries())
    pin(monkeypatch, "ml-100k", archive)
    out = download("ml-100k", root=tmp_path / "data", url=str(archive), progress=False)
    assert (out / "u.user").read_bytes() == ML100K_FILES["u.user"]


def test_progress_bar_does_not_break_the_download(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    archive = make_zip(tmp_path / "srv" / "ml-100k.zip", ml100k_entries())
    pin(monkeypatch, "ml-100k", archive)
    assert download("ml-100k", root=tmp_path / "data", url=server.url("ml-100k.zip"),
                    progress=True).is_dir()


# -- broken transfers ---------------------------------------------------------------------------


def test_broken_transfer_resumes_with_range(serve, monkeypatch, tmp_path) -> None:
    server = serve(ranges=True, drop=1)
    archive = make_zip(tmp_path / "srv" / "ml-100k.zip", ml100k_entries())
    pin(monkeypatch, "ml-100k", archive)
    out = download("ml-100k", root=tmp_path / "data", url=server.url("ml-100k.zip"), progress=False)
    assert (out / "u.data").read_bytes() == ML100K_FILES["u.data"]
    half = archive.stat().st_size // 2
    assert server.log == [("/ml-100k.zip", None), ("/ml-100k.zip", f"bytes={half}-")]


def test_broken_transfer_restarts_without_range_support(serve, monkeypatch, tmp_path) -> None:
    server = serve(ranges=False, drop=2)
    archive = make_zip(tmp_path / "srv" / "ml-100k.zip", ml100k_entries())
    pin(monkeypatch, "ml-100k", archive)
    out = download("ml-100k", root=tmp_path / "data", url=server.url("ml-100k.zip"), retries=3,
                   progress=False)
    assert (out / "u.item").read_bytes() == ML100K_FILES["u.item"]
    assert len(server.log) == 3  # two broken transfers, each restarted from byte 0


def test_transfer_that_keeps_breaking_fails_cleanly(serve, monkeypatch, tmp_path) -> None:
    server = serve(drop=99)
    archive = make_zip(tmp_path / "srv" / "ml-100k.zip", ml100k_entries())
    pin(monkeypatch, "ml-100k", archive)
    root = tmp_path / "data"
    with pytest.raises(DataError, match=r"failed after 2 attempt\(s\)") as err:
        download("ml-100k", root=root, url=server.url("ml-100k.zip"), retries=2, progress=False)
    assert "\n" not in str(err.value) and len(server.log) == 2
    assert_clean(root, tmp_path)


def test_http_404_fails_at_once_naming_the_url(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    pin(monkeypatch, "ml-100k", None)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="HTTP 404") as err:
        download("ml-100k", root=root, url=server.url("missing.zip"), allow_unverified=True,
                 progress=False)
    assert server.url("missing.zip") in str(err.value) and len(server.log) == 1
    assert_clean(root, tmp_path)


# -- rejected archives --------------------------------------------------------------------------


def test_checksum_mismatch_fails_and_leaves_nothing(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    good = make_zip(tmp_path / "good.zip", ml100k_entries())
    pin(monkeypatch, "ml-100k", good)
    corrupted = bytearray(good.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF
    (tmp_path / "srv" / "ml-100k.zip").write_bytes(bytes(corrupted))
    root = tmp_path / "data"
    url = server.url("ml-100k.zip")
    with pytest.raises(DataError, match="checksum mismatch") as err:
        download("ml-100k", root=root, url=url, progress=False)
    msg = str(err.value)
    assert md5(good) in msg and hashlib.md5(bytes(corrupted)).hexdigest() in msg and url in msg
    assert "\n" not in msg
    assert_clean(root, tmp_path)


def test_failed_force_keeps_the_existing_dataset(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    archive = make_zip(tmp_path / "srv" / "ml-100k.zip", ml100k_entries())
    pin(monkeypatch, "ml-100k", archive)
    root = tmp_path / "data"
    download("ml-100k", root=root, url=server.url("ml-100k.zip"), progress=False)
    make_zip(tmp_path / "srv" / "other.zip", ml100k_entries() | {"ml-100k/x": b"x"})
    with pytest.raises(DataError, match="checksum mismatch"):
        download("ml-100k", root=root, url=server.url("other.zip"), force=True, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["ml-100k"]
    assert {p.name: p.read_bytes() for p in (root / "ml-100k").iterdir()} == ML100K_FILES


UNSAFE_ZIPS = {
    "traversal": lambda tmp: make_zip(tmp / "srv" / "a.zip",
                                      ml100k_entries() | {"../evil.txt": b"pwned"}),
    "deep-traversal": lambda tmp: make_zip(tmp / "srv" / "a.zip",
                                           ml100k_entries() | {"ml-100k/../../../evil.txt": b"x"}),
    "absolute": lambda tmp: make_zip(tmp / "srv" / "a.zip",
                                     ml100k_entries() | {f"{tmp}/abs_evil.txt": b"pwned"}),
    "symlink": lambda tmp: make_zip(tmp / "srv" / "a.zip", ml100k_entries(),
                                    symlinks={"ml-100k/evil_link": str(tmp)}),
    "tar-traversal": lambda tmp: make_tar(tmp / "srv" / "a.tgz",
                                          ml100k_entries() | {"../evil.txt": b"pwned"}),
    "tar-absolute": lambda tmp: make_tar(tmp / "srv" / "a.tgz",
                                         ml100k_entries() | {f"{tmp}/abs_evil.txt": b"x"}),
    "tar-symlink": lambda tmp: make_tar(tmp / "srv" / "a.tgz", ml100k_entries(),
                                        links={"ml-100k/evil_link": (tarfile.SYMTYPE, "/etc")}),
    "tar-hardlink": lambda tmp: make_tar(
        tmp / "srv" / "a.tgz", ml100k_entries(),
        links={"ml-100k/evil_hard": (tarfile.LNKTYPE, "/etc/passwd")}),
    "tar-device": lambda tmp: make_tar(tmp / "srv" / "a.tgz", ml100k_entries(),
                                       links={"ml-100k/evil_dev": (tarfile.CHRTYPE, "")}),
}


@pytest.mark.parametrize("kind", list(UNSAFE_ZIPS))
def test_unsafe_archive_is_rejected_and_leaves_nothing(kind, serve, monkeypatch, tmp_path) -> None:
    server = serve()
    archive = UNSAFE_ZIPS[kind](tmp_path)
    pin(monkeypatch, "ml-100k", archive)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="refusing") as err:
        download("ml-100k", root=root, url=server.url(archive.name), progress=False)
    assert "\n" not in str(err.value) and server.url(archive.name) in str(err.value)
    assert_clean(root, tmp_path)


def test_zip_bomb_is_rejected(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    monkeypatch.setattr(unpack, "MIN_UNPACK_CAP", 1 << 20)
    archive = make_zip(tmp_path / "srv" / "bomb.zip",
                       ml100k_entries() | {"ml-100k/zeros": bytes(4 << 20)})
    assert archive.stat().st_size * unpack.MAX_EXPANSION < 4 << 20
    pin(monkeypatch, "ml-100k", archive)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="zip bomb"):
        download("ml-100k", root=root, url=server.url("bomb.zip"), progress=False)
    assert_clean(root, tmp_path)


def test_archive_without_the_expected_files_fails(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    archive = make_zip(tmp_path / "srv" / "a.zip", {"ml-100k/u.data": b"1\t1\t1\t1\n"})
    pin(monkeypatch, "ml-100k", archive)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="lacks u.data, u.item, u.user"):
        download("ml-100k", root=root, url=server.url("a.zip"), progress=False)
    assert_clean(root, tmp_path)


def test_not_an_archive_fails(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    page = tmp_path / "srv" / "page.zip"
    page.write_bytes(b"<html>moved</html>")
    pin(monkeypatch, "ml-100k", page)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="not a zip or tar archive"):
        download("ml-100k", root=root, url=server.url("page.zip"), progress=False)
    assert_clean(root, tmp_path)


# -- CLI ----------------------------------------------------------------------------------------


def _cli(*args: str):  # type: ignore[no-untyped-def]
    from metarec_runner.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_list_shows_every_dataset_and_presence(tmp_path) -> None:
    root = tmp_path / "data"
    (root / "ml-100k").mkdir(parents=True)
    for name in ML100K_FILES:
        (root / "ml-100k" / name).write_bytes(b"x")
    res = _cli("data", "list", "--data-dir", str(root))
    assert res.exit_code == 0, res.output
    assert f"data dir: {root}" in res.output
    for name in registry.names():
        assert name in res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("ml-100k "))
    assert "present" in line and "pinned" in line and "4.7 MiB" in line
    assert "present" not in next(ln for ln in res.output.splitlines() if ln.startswith("ml-1m "))


def test_cli_download_and_errors(serve, monkeypatch, tmp_path) -> None:
    server = serve()
    archive = make_zip(tmp_path / "srv" / "ml-100k.zip", ml100k_entries())
    pin(monkeypatch, "ml-100k", archive)
    root = tmp_path / "data"
    res = _cli("data", "download", "ml-100k", "--data-dir", str(root), "--url",
               server.url("ml-100k.zip"), "--no-progress")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(root / "ml-100k")
    res = _cli("data", "download", "ml-99k", "--data-dir", str(root))
    assert res.exit_code == 2 and "ml-100k, ml-1m" in res.output and "Traceback" not in res.output
    res = _cli("data", "download", "ml-latest", "--data-dir", str(root), "--url",
               server.url("x.zip"))
    assert res.exit_code == 2 and "--allow-unverified" in res.output
    assert len(res.output.strip().splitlines()) == 1


def _fake_loader(monkeypatch: pytest.MonkeyPatch, module: str, attr: str, calls: list) -> None:
    """Replace ``module.attr`` (creating the module if it is not written yet) with a fake loader."""
    try:
        mod = importlib.import_module(module)
    except ImportError:
        mod = types.ModuleType(module)
        monkeypatch.setitem(sys.modules, module, mod)

    class Fake:
        def summary(self) -> dict[str, object]:
            return {"name": "x", "users": 2, "items": 4, "interactions": 3, "rating_min": 1.0,
                    "rating_max": 5.0, "user_features": ["age", "gender"],
                    "item_features": ["genres"], "checksum": "0123456789abcdef"}

    def loader(name: str, data_dir: object = None, **kwargs: object) -> Fake:
        calls.append((name, data_dir, kwargs))
        return Fake()

    monkeypatch.setattr(mod, attr, loader, raising=False)


@pytest.mark.parametrize(("name", "module", "attr", "files"), [
    ("ml-100k", "metarec_runner.data.movielens", "load_movielens", ML100K_FILES),
    ("hetrec2011-lastfm-2k", "metarec_runner.data.tabular", "load_tabular", LASTFM_FILES),
])
def test_cli_info_calls_the_loader(name, module, attr, files, monkeypatch, tmp_path) -> None:
    calls: list = []  # type: ignore[type-arg]
    _fake_loader(monkeypatch, module, attr, calls)
    root = tmp_path / "data"
    res = _cli("data", "info", name, "--data-dir", str(root))
    assert res.exit_code == 2 and f"metarec data download {name}" in res.output and calls == []
    (root / name).mkdir(parents=True)
    for f, data in files.items():
        (root / name / f).write_bytes(data)
    res = _cli("data", "info", name, "--data-dir", str(root))
    assert res.exit_code == 0, res.output
    assert [c[:2] for c in calls] == [(name, root)]
    if module.endswith("tabular"):  # the bring-your-own loader is told where the listens are
        kwargs = calls[0][2]
        assert kwargs["ratings"] == f"{name}/user_artists.dat" and kwargs["sep"] == "\t"
        assert kwargs["columns"] == {"user": "userID", "item": "artistID", "weight": "weight"}
    for text in ("users: 2", "items: 4", "interactions: 3", "rating scale: 1 .. 5",
                 "user features: age, gender", "item features: genres"):
        assert text in res.output


@pytest.mark.slow
def test_cli_subprocess_lists_datasets(tmp_path) -> None:
    env_root = tmp_path / "env-data"
    res = subprocess.run([sys.executable, "-m", "metarec_runner.cli", "data", "list"],
                         check=False, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "METAREC_DATA_DIR": str(env_root)})
    assert res.returncode == 0, res.stderr
    assert f"data dir: {env_root}" in res.stdout and "hetrec2011-lastfm-2k" in res.stdout


@pytest.mark.slow
def test_help_does_not_import_heavy_modules() -> None:
    code = ("import sys\n"
            "from metarec_runner.cli import app\n"
            "for args in (['--help'], ['data', '--help']):\n"
            "    try:\n"
            "        app(args)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'torch', 'numpy',"
            " 'mlflow', 'hydra'})\n"
            "print('HEAVY', heavy)\n")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout and "data" in res.stdout
