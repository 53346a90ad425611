"""Remote gets through Python clients, side by side in one run: prefixd forced onto its remote
path (active messages over tcp), Redis (GET over its socket), and Mooncake Store (its tcp
transfer engine, the object held by another process). Hardening defect 14 measured this.

    python3 bench/remote/compare.py [--sizes 1M,4M] [--concurrency 1,4] [--seconds 3]

Each reader process reads the same few stored objects over and over for --seconds; a row gives
GB/s over all readers and the p50/p99 of one get, and the ratios against both baselines.
Needs: target/release/prefixd (or PREFIXD_BIN), redis-server, and the PyPI packages `redis`
and `mooncake-transfer-engine-non-cuda` (with libibverbs1 from Debian); `scripts/dev.sh
bench-remote` installs what is missing. A baseline that cannot start is reported, not faked.
"""

import argparse
import multiprocessing as mp
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
OBJECTS = 4  # distinct objects per size, read round-robin


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def size_of(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


# -- the three systems: start, store, and a reader's get -------------------------------------


class Prefixd:
    name = "prefixd"

    def __init__(self, work):
        binary = os.environ.get("PREFIXD_BIN") or str(REPO / "target" / "release" / "prefixd")
        self.log = open(os.path.join(work, "prefixd.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--net-devices", "lo",
             "--host-pool", "2GiB"], stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
        self.endpoint = "http://" + fields["grpc"]

    def store(self, size):
        import numpy as np
        import prefixd

        keys = [bytes([size % 251, i]) * 16 for i in range(OBJECTS)]
        with prefixd.Client(self.endpoint, device=None, namespace="bench") as c:
            data = [np.random.default_rng(i).integers(0, 255, size, dtype=np.uint8) for i in range(OBJECTS)]
            r = c.put_chunks(keys, data)
            if r.stored + r.skipped != OBJECTS:
                raise RuntimeError(f"prefixd stored {r.stored} of {OBJECTS}")
        return keys

    def info(self):
        return self.endpoint

    @staticmethod
    def reader(endpoint):
        import numpy as np
        import prefixd

        c = prefixd.Client(endpoint, device=None, namespace="bench", transports="tcp", force_remote=True)
        assert c.data_path == "active_message", c.data_path
        bufs = {}

        def get(key, size):
            out = bufs.setdefault(size, np.empty(size, dtype=np.uint8))
            if c.get_chunks([key], [out]) != 1:
                raise RuntimeError("prefixd: miss")

        return get

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Redis:
    name = "Redis"

    def __init__(self, work):
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed")
        self.port = free_port()
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--save", "", "--appendonly", "no",
                                      "--dir", work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        for _ in range(100):
            try:
                redis.Redis(port=self.port).ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)

    def store(self, size):
        import redis

        r = redis.Redis(port=self.port)
        keys = [f"obj-{size}-{i}" for i in range(OBJECTS)]
        for i, k in enumerate(keys):
            r.set(k, os.urandom(size))
        return keys

    def info(self):
        return self.port

    @staticmethod
    def reader(port):
        import redis

        r = redis.Redis(port=port)

        def get(key, size):
            if len(r.get(key)) != size:
                raise RuntimeError("Redis: short read")

        return get

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


MOONCAKE_HOLDER = """
import sys, time
from mooncake.store import MooncakeDistributedStore
s = MooncakeDistributedStore()
rc = s.setup("127.0.0.1", sys.argv[1], 2048 << 20, 64 << 20, "tcp", "", sys.argv[2])
print("ready" if rc == 0 else f"setup failed {rc}", flush=True)
time.sleep(3600)
"""


class Mooncake:
    """Mooncake Store: a master, one process that holds the memory (the 'storage node'), and
    readers that hold none, so every get crosses its tcp transfer engine."""

    name = "Mooncake"

    def __init__(self, work):
        import mooncake

        d = os.path.dirname(mooncake.__file__)
        rpc, http = free_port(), free_port()
        self.master = subprocess.Popen(
            [os.path.join(d, "mooncake_master"), f"--rpc_port={rpc}", "--enable_http_metadata_server=true",
             "--http_metadata_server_host=127.0.0.1", f"--http_metadata_server_port={http}",
             f"--metrics_port={free_port()}"],
            stdout=open(os.path.join(work, "mooncake-master.log"), "w"), stderr=subprocess.STDOUT)
        self.metadata, self.master_addr = f"http://127.0.0.1:{http}/metadata", f"127.0.0.1:{rpc}"
        time.sleep(1.5)
        self.holder = subprocess.Popen([sys.executable, "-c", MOONCAKE_HOLDER, self.metadata, self.master_addr],
                                       stdout=subprocess.PIPE, stderr=open(os.path.join(work, "mooncake-holder.log"), "w"),
                                       text=True)
        line = self.holder.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"Mooncake's holder did not start: {line!r}")

    @staticmethod
    def _client(metadata, master, buffer):
        from mooncake.store import MooncakeDistributedStore

        s = MooncakeDistributedStore()
        rc = s.setup("127.0.0.1", metadata, 0, buffer, "tcp", "", master)
        if rc != 0:
            raise RuntimeError(f"Mooncake setup failed: {rc}")
        return s

    def info(self):
        return (self.metadata, self.master_addr)

    def store(self, size):
        s = self._client(self.metadata, self.master_addr, 64 << 20)
        keys = [f"obj-{size}-{i}" for i in range(OBJECTS)]
        for k in keys:
            rc = s.put(k, os.urandom(size))
            if rc != 0:
                raise RuntimeError(f"Mooncake put failed: {rc}")
        s.close()
        return keys

    @staticmethod
    def reader(info):
        s = Mooncake._client(*info, 64 << 20)

        def get(key, size):
            if len(s.get(key)) != size:
                raise RuntimeError("Mooncake: short read")

        return get

    def stop(self):
        for p in (getattr(self, "holder", None), self.master):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)


# -- measurement -----------------------------------------------------------------------------


SYSTEMS = {}  # name -> class, filled below


def read_loop(name, info, keys, size, seconds, start, out):
    try:
        get = SYSTEMS[name].reader(info)
        for k in keys:  # warm-up: connections, first touch
            get(k, size)
        start.wait()
        times, t_end, i = [], time.perf_counter() + seconds, 0
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                break
            get(keys[i % len(keys)], size)
            times.append(time.perf_counter() - t0)
            i += 1
        out.put(("ok", times))
    except Exception as e:  # reported in the table, never hidden
        out.put(("error", repr(e)))


def measure(system, keys, size, readers, seconds):
    # Fresh interpreters: the parent's clients have threads (tokio, UCX) that a fork would break.
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(readers + 1), ctx.Queue()
    procs = [ctx.Process(target=read_loop, args=(system.name, system.info(), keys, size, seconds, start, out))
             for _ in range(readers)]
    for p in procs:
        p.start()
    try:
        start.wait(timeout=120)
    except Exception:
        pass
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    errors = [r for s, r in results if s == "error"]
    if errors:
        return {"error": errors[0]}
    times = sorted(t for s, r in results for t in r)
    total = sum(len(r) for s, r in results) * size
    return {"gbps": total / seconds / 1e9, "p50_us": times[len(times) // 2] * 1e6,
            "p99_us": times[int(len(times) * 0.99)] * 1e6, "gets": len(times)}


SYSTEMS.update({c.name: c for c in (Prefixd, Redis, Mooncake)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,4M")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--seconds", type=float, default=3.0)
    a = ap.parse_args()
    sizes = [size_of(s) for s in a.sizes.split(",")]
    conc = [int(c) for c in a.concurrency.split(",")]
    work = tempfile.mkdtemp(prefix="prefixd-remote-bench-")
    systems = []
    for cls in (Prefixd, Redis, Mooncake):
        try:
            systems.append(cls(work))
        except Exception as e:
            print(f"{cls.name}: not measured ({e})", file=sys.stderr)
    rows = []
    try:
        for size in sizes:
            stored = {s.name: s.store(size) for s in systems}
            for n in conc:
                r = {s.name: measure(s, stored[s.name], size, n, a.seconds) for s in systems}
                rows.append((size, n, r))
                print(f"... {size >> 20} MiB x {n} readers: "
                      + ", ".join(f"{k} {v.get('gbps', 0):.2f} GB/s" for k, v in r.items()), file=sys.stderr)
    finally:
        for s in systems:
            s.stop()
    names = [s.name for s in systems]
    print("| object | readers | " + " | ".join(f"{n} GB/s, p50 / p99 µs" for n in names)
          + " | prefixd / Redis | prefixd / Mooncake |")
    print("|---" * (2 + len(names) + 2) + "|")
    for size, n, r in rows:
        cells = []
        for name in names:
            v = r[name]
            cells.append(v["error"] if "error" in v else f"{v['gbps']:.2f}, {v['p50_us']:.0f} / {v['p99_us']:.0f}")

        def ratio(other):
            p, o = r.get("prefixd", {}), r.get(other, {})
            return f"{p['gbps'] / o['gbps']:.2f}" if "gbps" in p and "gbps" in o else "-"

        print(f"| {size >> 20} MiB | {n} | " + " | ".join(cells) + f" | {ratio('Redis')} | {ratio('Mooncake')} |")


if __name__ == "__main__":
    main()
