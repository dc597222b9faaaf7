"""The distributions users get: a wheel and an sdist that build, pass ``twine check``
(the long description, README.md, renders), and carry the license and project URLs.
Heavy and version-independent: runs where build and twine are installed (the matrix
installs them in one cell)."""
import email
import glob
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("build", reason="build is not installed (the matrix has it in one cell)")
pytest.importorskip("twine", reason="twine is not installed (the matrix has it in one cell)")


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel",
                           "--outdir", str(out), ROOT],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    wheels = glob.glob(str(out / "safe_gthread-*.whl"))
    sdists = glob.glob(str(out / "safe_gthread-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(str(out))
    return wheels[0], sdists[0]


def wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(zf.read(name)), zf.namelist()


def test_twine_check_passes(dists):
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict"] + list(dists),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=120)
    assert proc.returncode == 0, proc.stdout


def test_wheel_metadata(dists):
    import safe_gthread
    meta, names = wheel_metadata(dists[0])
    assert meta["Name"] == "safe-gthread"
    assert meta["Version"] == safe_gthread.__version__
    assert meta["Requires-Python"] == ">=3.6"
    assert any(r.replace(" ", "").startswith("gunicorn") for r in meta.get_all("Requires-Dist"))
    assert meta["Description-Content-Type"] == "text/markdown"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    assert meta.get_payload(decode=True).decode("utf-8").strip() == readme.strip()  # 日本語, ·
    assert "MIT" in (meta.get("License-Expression") or meta.get("License") or "") or \
        "License :: OSI Approved :: MIT License" in meta.get_all("Classifier")
    assert any(n.endswith("LICENSE") for n in names), "the wheel has no LICENSE"
    assert meta.get_all("Project-URL"), "no project URLs in the metadata"
    assert any(n.endswith("entry_points.txt") for n in names)
    # Every subpackage ships: the runtime's retirements and the check tooling.
    for module in ("safe_gthread/_retire/legacy.py", "safe_gthread/_retire/graceful.py",
                   "safe_gthread/check/cli.py", "safe_gthread/check/runner.py"):
        assert module in names, module


def test_sdist_carries_what_a_build_needs(dists):
    with tarfile.open(dists[1]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE",
                   "safe_gthread/__init__.py", "safe_gthread/_worker.py",
                   "safe_gthread/guard.py"):
        assert needed in names, needed
