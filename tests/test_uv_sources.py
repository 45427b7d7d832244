"""scripts/pip_sources_for_uv.py: uv, which reads no pip configuration, gets pip's sources and takes pip's file.

Two local simple indexes stand for PyPI and a partial mirror of it: the mirror lists only the `py310` wheel of a pin,
the main index both the `py310` and the `py311` wheel. pip installs the `py311` one on Python 3.11 wherever each index
sits; uv takes the pin's files from the first index that has the version. The script's arguments must make uv install
what pip does; the reversed order shows the test can tell the difference.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

UV = Path(sys.prefix) / "bin" / "uv"
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "pip_sources_for_uv.py"


def uv_arguments() -> list[str]:
    """The script's arguments, from a process of its own: importing pip._internal here would turn setuptools'
    distutils shim off for the rest of the test process (`_distutils_hack` steps aside once pip is imported), and
    every later in-process `import setuptools` (vllm, trl's trainers) would then fail its own assertion."""
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True)
    return out.stdout.split()
pytestmark = pytest.mark.skipif(not UV.exists(), reason="uv is not installed (requirements/uv.lock; `make` has it)")


def wheel(folder: Path, tag: str) -> Path:
    """A minimal valid wheel of `demo-pin` 1.0 whose module says which wheel it came from."""
    files = {
        "demo_pin/__init__.py": f"TAG = {tag!r}\n",
        "demo_pin-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: demo-pin\nVersion: 1.0\n",
        "demo_pin-1.0.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                        f"Tag: {tag}-none-any\n",
    }
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(body.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(body.encode())}" for name, body in files.items()]
    files["demo_pin-1.0.dist-info/RECORD"] = "\n".join([*record, "demo_pin-1.0.dist-info/RECORD,,"]) + "\n"
    path = folder / f"demo_pin-1.0-{tag}-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, body in files.items():
            zf.writestr(name, body)
    return path


def simple_index(root: Path, tags: list[str]) -> str:
    """A PEP 503 simple index under root holding demo-pin 1.0's wheels for the given tags; its file:// URL."""
    (root / "files").mkdir(parents=True)
    (root / "simple" / "demo-pin").mkdir(parents=True)
    links = "".join(f'<a href="../../files/{wheel(root / "files", tag).name}">x</a>\n' for tag in tags)
    (root / "simple" / "demo-pin" / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    return (root / "simple").as_uri()


def installed_tag(tmp_path: Path, uv_args: list[str] | None) -> str:
    """Install demo-pin==1.0 into a fresh venv, with uv and these arguments or (None) with pip as configured; the
    tag of the wheel installed."""
    venv = tmp_path / f"venv{len(list(tmp_path.glob('venv*')))}"
    subprocess.run([sys.executable, "-m", "venv", *(["--without-pip"] if uv_args is not None else []), str(venv)],
                   check=True)
    python = str(venv / "bin" / "python")
    env = {**os.environ, "UV_CACHE_DIR": str(tmp_path / "uv-cache"), "UV_NO_CONFIG": "1", "PIP_NO_CACHE_DIR": "1"}
    install = ([python, "-m", "pip", "install", "-q"] if uv_args is None
               else [str(UV), "pip", "install", "-q", "--python", python, *uv_args])
    subprocess.run([*install, "--no-deps", "demo-pin==1.0"], check=True, env=env, capture_output=True, text=True)
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import demo_pin; print(demo_pin.TAG)"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the two wheels are tagged for Python 3.10 and 3.11")
def test_uv_gets_pips_sources_and_installs_the_file_pip_installs(tmp_path, monkeypatch):
    main = simple_index(tmp_path / "main", ["py310", "py311"])
    mirror = simple_index(tmp_path / "mirror", ["py310"])
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # this machine's pip.conf out of the way: only what is set here
    monkeypatch.setenv("PIP_INDEX_URL", main)
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", mirror)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    monkeypatch.setenv("PIP_CONSTRAINT", str(tmp_path / "constraints.txt"))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "constraints.txt").write_text("demo-pin<2\n")

    args = uv_arguments()
    assert args == ["--index-strategy", "unsafe-best-match", "--index", main, "--index", mirror,
                    "--default-index", main, "--find-links", str(tmp_path / "wheels"),
                    "--constraint", str(tmp_path / "constraints.txt")]
    assert installed_tag(tmp_path, None) == "py311"  # pip: the best wheel of the pin across both indexes
    assert installed_tag(tmp_path, args) == "py311"

    mirror_first = ["--index-strategy", "unsafe-best-match", "--index", mirror, "--default-index", main]
    assert installed_tag(tmp_path, mirror_first) == "py310"
