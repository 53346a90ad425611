"""Fixtures: a real prefixd server process on loopback ports, started once per session.

The server binary is PREFIXD_BIN, else the newest of target/{debug,release}/prefixd (scripts/
dev.sh test builds it before running these tests), else it is built here with cargo.
"""

import os
import pathlib
import subprocess
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _server_binary():
    if os.environ.get("PREFIXD_BIN"):
        return os.environ["PREFIXD_BIN"]
    found = [p for p in (REPO / "target" / d / "prefixd" for d in ("debug", "release")) if p.exists()]
    if not found:
        subprocess.run(["cargo", "build", "--quiet", "-p", "prefixd-server"], cwd=REPO, check=True)
        found = [REPO / "target" / "debug" / "prefixd"]
    return str(max(found, key=lambda p: p.stat().st_mtime))


class Server:
    def __init__(self, *args, listen="127.0.0.1:0"):
        self.log = tempfile.NamedTemporaryFile(prefix="prefixd-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [_server_binary(), "--listen", listen, "--metrics-listen", "127.0.0.1:0",
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
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server():
    s = Server("--host-pool", "64MiB")
    yield s
    assert s.stop() == 0, "prefixd did not drain and exit 0 on SIGTERM"


@pytest.fixture(scope="session")
def key_vectors():
    rows = []
    for line in (REPO / "proto" / "testdata" / "key_vectors.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        seed, block, chunk, tokens, none_hash, keys = line.split("|")
        rows.append((
            seed, int(block), int(chunk),
            [int(t) for t in tokens.split(",") if t],
            [bytes.fromhex(k) for k in keys.split(",") if k],
        ))
    assert len(rows) >= 5
    return rows
