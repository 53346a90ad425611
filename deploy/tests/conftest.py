"""Fixtures for the deployment tests: the repository, the built binaries, and a real prefixd
process (the binaries come from `cargo build`; scripts/dev.sh test builds them first)."""

import os
import pathlib
import subprocess
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def binary(name):
    """The newest built `name` (debug or release), building it when there is none."""
    found = [p for p in (REPO / "target" / d / name for d in ("debug", "release")) if p.exists()]
    if not found:
        subprocess.run(["cargo", "build", "--quiet", "--bins"], cwd=REPO, check=True)
        found = [REPO / "target" / "debug" / name]
    return str(max(found, key=lambda p: p.stat().st_mtime))


class Prefixd:
    def __init__(self, *args):
        self.log = tempfile.NamedTemporaryFile(prefix="prefixd-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [binary("prefixd"), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
             "--net-devices", "lo", *args],
            stdout=subprocess.PIPE, stderr=self.log, text=True,
        )
        line = self.proc.stdout.readline()
        if "grpc=" not in line:
            self.stop()
            raise RuntimeError(f"prefixd did not start: {line!r}\n{pathlib.Path(self.log.name).read_text()}")
        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
        self.endpoint = "http://" + fields["grpc"]
        self.metrics = fields["metrics"]

    def stop(self):
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
