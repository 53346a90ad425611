"""Fixtures for the deployment tests: the repository, the built binaries, and real prefixd
processes (the same server fixture as the Python package's tests; scripts/dev.sh test builds
the binaries first)."""

import importlib.util
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# python/tests/conftest.py's Server, loaded under its own name (both files are "conftest").
_spec = importlib.util.spec_from_file_location("prefixd_test_server", REPO / "python/tests/conftest.py")
_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_server)


def binary(name):
    """The newest built `name` (debug or release), building the workspace's binaries when there
    is none."""
    found = [p for p in (REPO / "target" / d / name for d in ("debug", "release")) if p.exists()]
    if not found:
        subprocess.run(["cargo", "build", "--quiet", "--bins"], cwd=REPO, check=True)
        found = [REPO / "target" / "debug" / name]
    return str(max(found, key=lambda p: p.stat().st_mtime))


class Prefixd(_server.Server):
    def stop(self):
        """Stops it at once (the tests stop the sidecar on purpose: SIGKILL, no drain)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def repo():
    return REPO


@pytest.fixture
def prefixd_factory():
    started = []

    def start(*args):
        s = Prefixd(*args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def pytest_configure(config):
    os.environ.setdefault("PYTHONHASHSEED", "0")
