"""find_tiny_imagenet / download_file / safe_extract_zip against local file:// zips (no network)."""

from __future__ import annotations

import hashlib
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from common.datasets import download_file, find_tiny_imagenet, load_tiny_imagenet, safe_extract_zip
from common.synthetic import make_tiny_imagenet


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A zip shaped like the official one (top folder tiny-imagenet-200) and its MD5."""
    source = tmp_path_factory.mktemp("source")
    make_tiny_imagenet(source, num_classes=3, train_per_class=4, val_per_class=2, image_size=16)
    archive = shutil.make_archive(str(tmp_path_factory.mktemp("zip") / "tiny-imagenet-200"), "zip",
                                  root_dir=source, base_dir="tiny-imagenet-200")
    return Path(archive), hashlib.md5(Path(archive).read_bytes()).hexdigest()


def zip_with(path: Path, members: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
        if symlink is not None:
            link = zipfile.ZipInfo(symlink)
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(link, "/etc/passwd")
    return path


def test_download_extracts_verifies_and_cleans_up(tiny_zip: tuple[Path, str], tmp_path: Path) -> None:
    archive, md5 = tiny_zip
    data_dir = tmp_path / "data"
    (data_dir / ".tiny-imagenet-extract-killed" / "tiny-imagenet-200").mkdir(parents=True)  # a SIGKILL's leftover
    found = find_tiny_imagenet(data_dir, url=archive.as_uri(), md5=md5)
    assert found == data_dir.resolve() / "tiny-imagenet-200"
    assert [p.name for p in data_dir.iterdir()] == ["tiny-imagenet-200"]  # no zip, no temp folder
    splits = load_tiny_imagenet(found, holdout_per_class=1)
    assert (len(splits.train), len(splits.holdout), len(splits.test)) == (9, 3, 6)
    # Found again without downloading (the URL would fail), from data_dir or the folder itself.
    assert find_tiny_imagenet(data_dir, url=(tmp_path / "gone.zip").as_uri()) == found
    assert find_tiny_imagenet(found, download=False) == found


def test_wrong_md5_is_rejected_and_leaves_nothing(tiny_zip: tuple[Path, str], tmp_path: Path) -> None:
    archive, _ = tiny_zip
    data_dir = tmp_path / "data"
    with pytest.raises(RuntimeError, match="MD5 mismatch") as error:
        find_tiny_imagenet(data_dir, url=archive.as_uri(), md5="0" * 32)
    assert "--smoke" in str(error.value)
    assert not data_dir.exists()  # the download created it, so the failure removes it


def test_download_file_deletes_a_bad_file(tiny_zip: tuple[Path, str], tmp_path: Path, capsys) -> None:
    archive, md5 = tiny_zip
    dest = tmp_path / "copy.zip"
    with pytest.raises(ValueError, match=f"expected {'f' * 32}, got {md5}"):
        download_file(archive.as_uri(), dest, "f" * 32)
    assert list(tmp_path.iterdir()) == []
    assert download_file(archive.as_uri(), dest, md5) == dest
    assert dest.read_bytes() == archive.read_bytes()
    dest.write_bytes(b"a stale or damaged earlier download")  # is fetched again, not kept
    capsys.readouterr()
    assert download_file(archive.as_uri(), dest, md5) == dest
    assert dest.read_bytes() == archive.read_bytes()
    stale_md5 = hashlib.md5(b"a stale or damaged earlier download").hexdigest()  # said, not silent
    assert capsys.readouterr().out == (f"{dest} has MD5 {stale_md5}, not {md5} (a partial or other "
                                       "file): downloading it again\n")


def test_download_failure_says_what_where_and_smoke(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    url = (tmp_path / "does-not-exist.zip").as_uri()
    with pytest.raises(RuntimeError) as error:
        find_tiny_imagenet(data_dir, url=url)
    message = str(error.value)
    assert url in message and str(data_dir / "tiny-imagenet-200") in message and "--smoke" in message
    assert list(tmp_path.iterdir()) == []


def test_failed_download_removes_only_the_folders_it_created(tmp_path: Path) -> None:
    url = (tmp_path / "does-not-exist.zip").as_uri()
    with pytest.raises(RuntimeError, match="Could not download"):
        find_tiny_imagenet(tmp_path / "new" / "deeper" / "data", url=url)
    assert list(tmp_path.iterdir()) == []  # all three levels were created by the download
    kept = tmp_path / "mine"
    (kept / "notes.txt").parent.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="Could not download"):
        find_tiny_imagenet(kept / "data", url=url)
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]
    with pytest.raises(RuntimeError, match="Could not download"):
        find_tiny_imagenet(kept, url=url)  # an existing --data-dir stays, with what it held
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_data_dir_that_cannot_be_created_is_a_download_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="Could not download Tiny ImageNet into /proc/no-such-dir"):
        find_tiny_imagenet("/proc/no-such-dir", url=(tmp_path / "x.zip").as_uri())
    assert not Path("/proc/no-such-dir").exists()


def test_missing_dataset_without_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        find_tiny_imagenet(tmp_path, download=False)
    message = str(error.value)
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in message
    assert str(tmp_path / "tiny-imagenet-200") in message and "--smoke" in message
    assert "not unzipped" not in message
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(b"PK")  # downloaded by hand, not unzipped
    with pytest.raises(FileNotFoundError) as error:
        find_tiny_imagenet(tmp_path, download=False)
    assert str(error.value).startswith(
        f"Tiny ImageNet not found in {tmp_path}. {tmp_path / 'tiny-imagenet-200.zip'} is there, not "
        "unzipped: without --no-download the script checks its MD5 and unzips it.\n")


def test_zip_without_the_dataset_leaves_nothing_that_looks_like_one(tmp_path: Path) -> None:
    archive = zip_with(tmp_path / "other.zip", {"tiny-imagenet-200/train/readme.txt": b"half"})
    data_dir = tmp_path / "data"
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(RuntimeError, match="no tiny-imagenet-200/wnids.txt"):
        find_tiny_imagenet(data_dir, url=archive.as_uri(), md5=md5)
    # Only the verified zip stays, for a retry; no dataset folder, no temporary folder.
    assert [p.name for p in data_dir.iterdir()] == ["tiny-imagenet-200.zip"]


@pytest.mark.parametrize("bad_member", ["../evil.txt", "inner/../../evil.txt", "ABSOLUTE", "..\\evil.txt"])
def test_safe_extract_refuses_escaping_members(tmp_path: Path, bad_member: str) -> None:
    if bad_member == "ABSOLUTE":
        bad_member = str(tmp_path / "evil.txt")
    archive = zip_with(tmp_path / "bad.zip", {"good/ok.txt": b"fine", bad_member: b"evil"})
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="refusing to extract"):
        safe_extract_zip(archive, dest)
    assert not (tmp_path / "evil.txt").exists()
    assert not dest.exists()  # checked before anything is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_safe_extract_refuses_symlinks(tmp_path: Path) -> None:
    archive = zip_with(tmp_path / "link.zip", {"a.txt": b"a"}, symlink="link")
    with pytest.raises(ValueError, match="symbolic link"):
        safe_extract_zip(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_safe_extract_writes_nested_members(tmp_path: Path) -> None:
    archive = zip_with(tmp_path / "ok.zip", {"top/": b"", "top/sub/a.txt": b"a", "b.txt": b"b"})
    safe_extract_zip(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "top" / "sub" / "a.txt").read_bytes() == b"a"
    assert (tmp_path / "dest" / "b.txt").read_bytes() == b"b"


def test_incomplete_dataset_folder_is_reported_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "tiny-imagenet-200" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="exists but has no wnids.txt"):
        find_tiny_imagenet(tmp_path, url=(tmp_path / "never-fetched.zip").as_uri())
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-imagenet-200"]


def test_two_runs_downloading_into_one_new_folder_at_once_both_get_the_dataset(
        tiny_zip: tuple[Path, str], tmp_path: Path) -> None:
    """T1 and T2 started side by side on a fresh --data-dir: one downloads and extracts while
    the other waits for it, instead of both writing one .part file and extracting over each
    other. The server sends the zip slowly, so the two calls overlap."""
    import http.server
    import threading
    import time

    archive, md5 = tiny_zip
    data = archive.read_bytes()
    requests = []

    class Slow(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            step = len(data) // 20 + 1
            for i in range(0, len(data), step):  # about 0.6 s
                self.wfile.write(data[i:i + step])
                time.sleep(0.03)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, data_dir, found, errors = f"http://127.0.0.1:{server.server_port}/t.zip", tmp_path / "data", [], []

    def run() -> None:
        try:
            found.append(find_tiny_imagenet(data_dir, url=url, md5=md5))
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(repr(error))
    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=120)
    server.shutdown()
    assert errors == [] and found == [data_dir.resolve() / "tiny-imagenet-200"] * 2
    assert requests == ["/t.zip"]  # downloaded once
    assert [p.name for p in data_dir.iterdir()] == ["tiny-imagenet-200"]
    assert len(load_tiny_imagenet(found[0], holdout_per_class=1).test) == 6


def test_a_data_dir_that_is_a_file_is_named_as_one(tmp_path: Path) -> None:
    from common.errors import DatasetNotFoundError
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for download in (True, False):
        with pytest.raises(DatasetNotFoundError, match=f"--data-dir {afile} is a file; expected a folder"):
            find_tiny_imagenet(afile, download=download, url=(tmp_path / "none.zip").as_uri())


def test_a_dataset_unzipped_one_level_too_deep_or_a_data_dir_inside_it_is_named(tmp_path: Path) -> None:
    from common.errors import DatasetNotFoundError
    make_tiny_imagenet(tmp_path / "data" / "tiny-imagenet-200", num_classes=2, train_per_class=2,
                       val_per_class=1, image_size=8)  # data/tiny-imagenet-200/tiny-imagenet-200/wnids.txt
    outer = (tmp_path / "data" / "tiny-imagenet-200").resolve()
    for download in (True, False):  # never "remove it": that folder holds the whole dataset
        with pytest.raises(DatasetNotFoundError, match=f"one level deeper.*pass --data-dir {outer}$"):
            find_tiny_imagenet(tmp_path / "data", download=download, url=(tmp_path / "none.zip").as_uri())
    dataset = outer / "tiny-imagenet-200"
    for inner in (dataset / "val", dataset / "train" / "n00000000"):  # no download into the dataset
        with pytest.raises(DatasetNotFoundError, match=f"inside the Tiny ImageNet at {dataset}: pass --data-dir"):
            find_tiny_imagenet(inner, url=(tmp_path / "none.zip").as_uri())
    assert sorted(p.name for p in (dataset / "val").iterdir()) == ["images", "val_annotations.txt"]
