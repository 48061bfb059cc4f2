"""The package as users install it: a wheel (and an sdist) of the project carry the CUDA C++ sources of
``lowrank_kernels/csrc/``, and a non-editable install finds them through ``cuda_ext.source_dir()`` with the
checkout nowhere on ``sys.path``. CPU only; about 10-30 s (pip builds the pure-Python wheel offline, with the
setuptools of this environment)."""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC_FILES = ("nf4_common.cuh", "nf4_entry.h", "nf4_mma_gemv.cu", "nf4_mma_gemv_op.cpp", "nf4_merge_mma.cu",
              "nf4_merge_mma_op.cpp")
TIMEOUT = 300


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _setuptools_builds_wheels() -> bool:
    """setuptools is installed and can build a wheel without the separate ``wheel`` package (>= 70.1) or with it.
    Read from the installed metadata only: neither an import nor ``importlib.util.find_spec("setuptools")``, after
    which setuptools' distutils shim makes a later ``import setuptools`` fail in this process (inductor's C++
    builder imports it through ``torch.utils.cpp_extension``)."""
    if not (_installed("setuptools") and _installed("pip")):
        return False
    try:
        major, minor = (int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (70, 1) or _installed("wheel")


pytestmark = pytest.mark.skipif(not _setuptools_builds_wheels(),
                                reason="needs pip and setuptools (>= 70.1, or the wheel package) to build offline")


def _source_copy(tmp: Path) -> Path:
    """The project's build inputs copied to ``tmp/src`` (so that the build leaves no build/ or egg-info in the
    checkout)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.so", "*.o")
    for package in ("lowrank_kernels", "python_ref"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    return src


def _run(cmd, cwd, env=None):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packaging")
    src = _source_copy(tmp)
    out = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          str(out), str(src)], cwd=tmp)
    (whl,) = out.glob("lowrank_kernels-*.whl")
    return whl


def test_wheel_contains_the_cuda_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in CSRC_FILES if f"lowrank_kernels/csrc/{f}" not in names]
    assert not missing, f"{wheel.name} lacks {missing}"
    assert not any(n.startswith("csrc/") for n in names)  # inside the package, not a top-level folder


def test_sdist_contains_the_cuda_sources(tmp_path):
    src = _source_copy(tmp_path)
    _run([sys.executable, "-c", "from setuptools import build_meta as b; print(b.build_sdist('dist'))"], cwd=src)
    (sdist,) = (src / "dist").glob("*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    missing = [f for f in CSRC_FILES if f"lowrank_kernels/csrc/{f}" not in names]
    assert not missing, f"{sdist.name} lacks {missing}"


_PROBE = r"""
import json, sys
from pathlib import Path
target, root = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
import lowrank_kernels
from lowrank_kernels import cuda_ext
from lowrank_kernels.kernels import nf4_merge_mma, nf4_mma_gemv
csrc = cuda_ext.source_dir()
print(json.dumps(dict(
    package=str(Path(lowrank_kernels.__file__).resolve()),
    csrc=str(csrc),
    sources={name: [str(p) for p in cuda_ext.sources(name) if p.is_file()] for name in (nf4_mma_gemv.NAME,
                                                                                       nf4_merge_mma.NAME)},
    files=sorted(p.name for p in csrc.iterdir()),
    checkout_on_path=[p for p in sys.path if p and Path(p).resolve() == root],
    target=str(target),
)))
"""


def test_installed_package_finds_its_cuda_sources(wheel, tmp_path):
    """``pip install --target`` of the wheel (non-editable), imported from a fresh interpreter whose only extra
    path is that target and whose working directory is elsewhere: the sources resolve inside the target."""
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
          str(wheel)], cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(target), PYTHONNOUSERSITE="1", LOWRANK_KERNELS_CUDA="0")
    out = _run([sys.executable, "-c", _PROBE, str(target), str(ROOT)], cwd=work, env=env)
    info = json.loads(out.strip().splitlines()[-1])
    target = target.resolve()
    assert Path(info["package"]).is_relative_to(target), info  # not the checkout (an editable install's finder)
    assert Path(info["csrc"]) == target / "lowrank_kernels" / "csrc", info
    assert info["checkout_on_path"] == [], info
    assert set(CSRC_FILES) <= set(info["files"]), info
    for name, found in info["sources"].items():
        assert len(found) == 2 and all(Path(p).is_relative_to(target) for p in found), (name, info)
