"""bench/gpu_check.sh --wheels and bench/dali_check.py, the parts that need no GPU.

The real wheels (270 MB) were installed and run by hand (README, "DALI on a GPU machine
without internet"); here a one-file stand-in wheel checks the script's own logic: checksum
guard, offline pip install into a temporary target, that target first on PYTHONPATH.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import zstandard

from tests.conftest import ROOT

_FAKE_DALI = 'raise ImportError("stand-in DALI from tests/test_gpu_check.py")\n'


def _fake_wheel(folder: Path) -> Path:
    """A valid py3-none-any wheel named like DALI's, whose nvidia.dali fails to import."""
    name, dist_info = "nvidia_dali_cuda130-2.4.0-py3-none-any.whl", "nvidia_dali_cuda130-2.4.0.dist-info"
    files = {
        # as in the real nvimgcodec / nvjpeg2k / nvtiff wheels; without it a site-packages
        # nvidia/ package (with its __init__) would win and DALI be found there (dali_check
        # refuses that case: found outside the target)
        "nvidia/__init__.py": "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n",
        "nvidia/dali/__init__.py": _FAKE_DALI,
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\nName: nvidia-dali-cuda130\nVersion: 2.4.0\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / name, "w") as z:
        for path, text in {**files, f"{dist_info}/RECORD": record}.items():
            z.writestr(path, text)
    return folder / name


def _gpu_check(*args: str, tmp_path: Path, path: str | None = None) -> subprocess.CompletedProcess:
    # This interpreter first on PATH: the script calls python3.
    env = {"PATH": path or str(Path(sys.executable).parent) + ":/usr/bin:/bin", "TMPDIR": str(tmp_path),
           "OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "data"), "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_wheels_are_installed_offline_into_a_temporary_target_that_python_imports_first(tmp_path):
    wheel = _fake_wheel(tmp_path / "wheels")
    (wheel.parent / "SHA256SUMS").write_text(f"{hashlib.sha256(wheel.read_bytes()).hexdigest()}  {wheel.name}\n")
    done = _gpu_check("--wheels", str(wheel.parent), "--install-only", tmp_path=tmp_path)
    output = done.stdout + done.stderr
    # pip installed it and Python found it in the target, ahead of any DALI in site-packages:
    # the stand-in's own import error proves both.
    assert done.returncode == 1 and "installing 1 wheels" in output, output
    assert "DALI not importable: stand-in DALI from tests/test_gpu_check.py" in output, output
    assert not list(tmp_path.glob("gpu_check_dali.*"))  # the temporary target is removed at exit


def test_a_wheel_that_differs_from_its_checksum_stops_before_installing(tmp_path):
    wheel = _fake_wheel(tmp_path / "wheels")
    (wheel.parent / "SHA256SUMS").write_text(f"{'0' * 64}  {wheel.name}\n")
    done = _gpu_check("--wheels", str(wheel.parent), tmp_path=tmp_path)
    assert done.returncode == 1 and "differs from SHA256SUMS" in done.stdout
    assert "installing" not in done.stdout


@pytest.mark.parametrize("case", ["no SHA256SUMS", "a wheel it does not list", "a malformed line"])
def test_wheels_that_sha256sums_does_not_vouch_for_stop_before_installing(tmp_path, case):
    """Every wheel installed is checked: SHA256SUMS is required, must list each wheel in the
    folder (a stale wheel of another version would be installed beside the right one), and
    must be well formed."""
    wheel = _fake_wheel(tmp_path / "wheels")
    line = f"{hashlib.sha256(wheel.read_bytes()).hexdigest()}  {wheel.name}\n"
    if case == "a wheel it does not list":
        shutil.copy(wheel, wheel.parent / "zz_extra-1.0-py3-none-any.whl")
        (wheel.parent / "SHA256SUMS").write_text(line)
    elif case == "a malformed line":
        (wheel.parent / "SHA256SUMS").write_text(line + "not a checksum line\n")
    done = _gpu_check("--wheels", str(wheel.parent), "--install-only", tmp_path=tmp_path)
    expected = {"no SHA256SUMS": f"error: {wheel.parent} has no SHA256SUMS",
                "a wheel it does not list": f"error: wheels in {wheel.parent} that SHA256SUMS does not list: "
                                            f"zz_extra-1.0-py3-none-any.whl",
                "a malformed line": "differs from SHA256SUMS"}[case]
    assert done.returncode == 1 and expected in done.stdout, done.stdout + done.stderr
    assert "installing" not in done.stdout


def test_install_only_without_wheels_is_a_usage_error(tmp_path):
    done = _gpu_check("--install-only", tmp_path=tmp_path)
    assert done.returncode == 2 and "--install-only needs --wheels DIR" in done.stdout


def test_dali_check_decodes_on_the_cpu_and_refuses_a_dali_from_elsewhere(tmp_path):
    pytest.importorskip("nvidia.dali")
    check = [sys.executable, str(ROOT / "bench" / "dali_check.py")]
    done = subprocess.run(check, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "DALI ok: cpu decode of 4 JPEGs (one grayscale) to RGB"
    elsewhere = subprocess.run(check + ["--expect-under", str(tmp_path)], capture_output=True, text=True,
                               timeout=300)
    assert elsewhere.returncode == 1 and f"expected DALI under {tmp_path}" in elsewhere.stdout


def test_dali_check_mixed_without_a_gpu_is_one_error_line():
    # It ended in DALI's "Assert on ... cuInitChecked()" traceback.
    pytest.importorskip("nvidia.dali")
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device mixed decodes here")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "dali_check.py"), "--device", "mixed"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith(
        "error: --device mixed needs a CUDA GPU that DALI can use; building the pipeline failed: ")


def _fake_parts(folder: Path, tmp_path: Path) -> Path:
    """dali312.tar.zst.part00/01 + SHA256 as pack_dali_site.sh writes them, of a site folder
    holding the stand-in DALI."""
    site = tmp_path / "site"
    with zipfile.ZipFile(_fake_wheel(tmp_path / "wheel")) as z:
        z.extractall(site)
    folder.mkdir(parents=True, exist_ok=True)
    # zstd's frame format, from the zstandard module: the test needs no zstd command
    packed = zstandard.ZstdCompressor().compress(
        subprocess.run(["tar", "-cf", "-", "-C", str(site), "."], capture_output=True, check=True).stdout)
    half = len(packed) // 2
    (folder / "dali312.tar.zst.part00").write_bytes(packed[:half])
    (folder / "dali312.tar.zst.part01").write_bytes(packed[half:])
    (folder / "SHA256").write_text(f"{hashlib.sha256(packed).hexdigest()}  dali312.tar.zst\n")
    return folder


def _bin_without_zstd(tmp_path: Path) -> str:
    """A PATH of one folder: links to every command of this interpreter's folder, /usr/bin
    and /bin but zstd, as on the GPU machine, which has no zstd command."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for source in (Path(sys.executable).parent, Path("/usr/bin"), Path("/bin")):
        for command in source.iterdir():
            if not command.name.startswith("zstd") and not (folder / command.name).exists():
                (folder / command.name).symlink_to(command)
    return str(folder)


def _zstandard_wheel(folder: Path) -> Path:
    """The installed zstandard, zipped back into its wheel (files, dist-info and tag as pip
    installed them): what pack_dali_site.sh downloads beside the parts."""
    dist = importlib.metadata.distribution("zstandard")
    tag = next(line.split(": ", 1)[1] for line in dist.read_text("WHEEL").splitlines() if line.startswith("Tag: "))
    wheel = folder / f"zstandard-{dist.version}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for file in dist.files:
            if "__pycache__" not in file.parts and Path(dist.locate_file(file)).is_file():
                z.write(dist.locate_file(file), str(file))
    return wheel


def test_dali_parts_without_a_zstd_command_are_unpacked_with_the_zstandard_wheel_beside_them(tmp_path):
    # The GPU machine's case: no zstd command (untested before: the test below used the command).
    parts = _fake_parts(tmp_path / "parts", tmp_path)
    path = _bin_without_zstd(tmp_path)
    done = _gpu_check("--dali-parts", str(parts), "--install-only", tmp_path=tmp_path, path=path)
    assert done.returncode == 1 and "error: no zstd command and no zstandard wheel in" in done.stdout, done.stdout
    _zstandard_wheel(parts)
    done = _gpu_check("--dali-parts", str(parts), "--install-only", tmp_path=tmp_path, path=path)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "unpacking 2 parts" in output, output
    assert "DALI not importable: stand-in DALI from tests/test_gpu_check.py" in output, output


def test_dali_parts_are_checked_joined_and_unpacked_into_a_folder_python_imports_first(tmp_path):
    parts = _fake_parts(tmp_path / "parts", tmp_path)
    done = _gpu_check("--dali-parts", str(parts), "--install-only", tmp_path=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "unpacking 2 parts" in output, output
    assert "DALI not importable: stand-in DALI from tests/test_gpu_check.py" in output, output
    (parts / "dali312.tar.zst.part01").unlink()  # a part lost on the way
    done = _gpu_check("--dali-parts", str(parts), tmp_path=tmp_path)
    assert done.returncode == 1 and "differ from SHA256" in done.stdout
    assert "unpacking" not in done.stdout


def _gpu_check_runs() -> list[tuple[str, str, list[str]]]:
    """(name, script, flags) of every task run gpu_check.sh makes (its `run` lines)."""
    import shlex
    text = (ROOT / "bench" / "gpu_check.sh").read_text().replace("\\\n", " ")
    runs = []
    for line in text.splitlines():
        if line.startswith("run "):
            name, _own, _keep, script, *flags = shlex.split(line)[1:]
            runs.append((name, script, flags))
    return runs


def test_every_task_run_of_gpu_check_passes_its_scripts_flag_checks(tmp_path):
    # T4's --holdout-per-class 1, refused since T4 requires 2, cost every GPU check its T4 row.
    runs = _gpu_check_runs()
    assert [name for name, _, _ in runs] == ["t3", "t2", "t1", "t4"]
    started = []
    for name, script, flags in runs:  # gpu_check adds --data-dir, --out and --workers
        flags = [f.replace("$OUT", str(tmp_path)) for f in flags]
        started.append((name, subprocess.Popen(
            [sys.executable, script, *flags, "--data-dir", str(tmp_path / "no-data"), "--out",
             str(tmp_path / name), "--workers", "8"], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)))
    for name, process in started:
        _, err = process.communicate(timeout=300)
        # Past every flag check, to the missing dataset (exit 1; a usage error exits 2).
        assert process.returncode == 1 and "not found" in err, (name, err[-500:])


def test_gpu_check_summary_says_why_a_run_finished_no_second_epoch(tmp_path):
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    summary = text.split("<<'PY' | tee \"$OUT/summary.txt\"\n", 1)[1].split("\nPY\n", 1)[0]
    (tmp_path / "t4.log").write_text("usage: t4_retrieval.py ...\nt4_retrieval.py: error: --holdout-per-class must be >= 2\n\n")
    done = subprocess.run([sys.executable, "-", str(tmp_path), "12"], input=summary, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("T4 phase A             no second epoch (0 epoch(s) finished); t4.log ends: t4_retrieval.py: "
            "error: --holdout-per-class must be >= 2") in done.stdout
    assert "T3 cubs serial plain   no second epoch (0 epoch(s) finished); t3.log ends: no t3.log" in done.stdout
    import json
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert runs["T4 phase A"]["log_tail"] == "t4_retrieval.py: error: --holdout-per-class must be >= 2"


def test_full_size_tiny_imagenet_is_marked_complete_only_after_its_last_image(tmp_path, monkeypatch):
    # wnids.txt is written first; gpu_check.sh took it for a finished set after a killed run.
    from bench import make_full_synthetic as mfs

    written = []

    def write_or_die(job):
        if len(written) == 3:
            raise KeyboardInterrupt  # the 600 s command limit, mid-pool
        written.append(job)
        return job[3] - job[2]

    class InlinePool:  # the pool's jobs in this process, in order
        def __init__(self, procs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def imap_unordered(self, fn, jobs, chunksize=1):
            return map(fn, jobs)

    monkeypatch.setattr(mfs, "Pool", InlinePool)
    monkeypatch.setattr(mfs, "_write_train_images", write_or_die)
    monkeypatch.setattr(mfs, "make_tiny_imagenet", lambda folder, **kw: (folder / "tiny-imagenet-200").mkdir(
        parents=True) or folder / "tiny-imagenet-200")
    with pytest.raises(KeyboardInterrupt):
        mfs.main(["--tiny", str(tmp_path)])
    assert not (tmp_path / "tiny-imagenet-200" / mfs.FULL_SIZE_MARKER).exists()
    shutil.rmtree(tmp_path / "tiny-imagenet-200")
    written.append("not counted: no interruption this time")
    mfs.main(["--tiny", str(tmp_path)])
    assert (tmp_path / "tiny-imagenet-200" / mfs.FULL_SIZE_MARKER).read_text() == "100000 train images\n"
    assert f'$DATA/tiny-imagenet-200/{mfs.FULL_SIZE_MARKER}' in (ROOT / "bench" / "gpu_check.sh").read_text()


def test_the_summary_step_writes_strict_json_with_null_for_a_figure_no_run_logged(tmp_path):
    # The summary heredoc of gpu_check.sh, run as the script runs it (python3 - from the
    # repository root) on one run folder whose second epoch lacks the holdout score: the
    # printed table shows nan, summary.json null (json.dumps wrote a bare NaN, not JSON).
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    start = script.index('python3 - "$OUT"')
    body = script[script.index("\n", start) + 1:]
    body = body[:body.index("\nPY\n")]
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "metrics.jsonl").write_text(
        '{"epoch": 1, "epoch_time_s": 3.0, "images_per_s": 10.0, "data_wait_share": 0.1}\n'
        '{"epoch": 2, "epoch_time_s": 2.0, "images_per_s": 12.0, "data_wait_share": 0.05}\n')
    done = subprocess.run([sys.executable, "-", str(tmp_path), "12"], input=body, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "T2 resnet18" in done.stdout and " nan" in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    run = summary["runs"]["T2 resnet18"]
    assert (run["images_per_s"], run["data_wait_share"], run["holdout"], run["first_epoch_s"]) == (12.0, 0.05, None, 3.0)
    assert summary["runs"]["T1 custom cnn"]["log_tail"] == "no t1.log"
