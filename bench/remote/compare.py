"""Remote gets through Python clients, side by side in one run: prefixd forced onto its remote
path (active messages over tcp), Redis (GET over its socket), and Mooncake Store (its tcp
transfer engine, the object held by another process). Hardening defect 14 measured this.

    python3 bench/remote/compare.py [--sizes 1M,4M] [--concurrency 1,4] [--seconds 3] [--slices 6]

Each reader process reads the same few stored objects over and over, --seconds in all per
system and row, the systems taking turns in --slices slices (a shared machine's slow stretches
then fall on all of them alike; --slices 1 measures each system in one go, as before 2026-11-30);
a row gives GB/s over all readers and the p50/p99 of one get, and the ratios against both
baselines.
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


def read_loop(name, info, keys, size, ctrl, out):
    """A reader process: connects and warms up, says it is ready, then reads for as long as
    each ("run", seconds) it is sent says, reporting each slice's get times, until "stop"."""
    try:
        get = SYSTEMS[name].reader(info)
        for k in keys:  # warm-up: connections, first touch
            get(k, size)
        out.put(("ready", None))
        i = 0
        while True:
            cmd = ctrl.get()
            if cmd[0] == "stop":
                return
            times, t_end = [], time.perf_counter() + cmd[1]
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


def measure(systems, stored, size, readers, seconds, slices):
    """One row: `readers` reader processes per system, all started and warmed up first; then
    the systems take turns, `slices` times, each reading for seconds / slices while the others'
    readers wait. This machine is shared and has slow stretches: taking turns in short slices
    puts every system through the same stretches, so the ratios compare like with like."""
    # Fresh interpreters: the parent's clients have threads (tokio, UCX) that a fork would break.
    ctx = mp.get_context("spawn")
    crews = {}
    for s in systems:
        out = ctx.Queue()
        ctrls = [ctx.Queue() for _ in range(readers)]
        procs = [ctx.Process(target=read_loop, args=(s.name, s.info(), stored[s.name], size, c, out)) for c in ctrls]
        for p in procs:
            p.start()
        crews[s.name] = (procs, ctrls, out)
    results = {s.name: {"times": [], "error": None} for s in systems}
    try:
        for name, (procs, _ctrls, out) in crews.items():
            for _ in procs:
                status, r = out.get(timeout=120)
                if status == "error":
                    results[name]["error"] = r
        for _ in range(slices):
            for name, (procs, ctrls, out) in crews.items():
                if results[name]["error"]:
                    continue
                for c in ctrls:
                    c.put(("run", seconds / slices))
                for _ in procs:
                    status, r = out.get(timeout=seconds + 120)
                    if status == "error":
                        results[name]["error"] = r
                    else:
                        results[name]["times"] += r
    finally:
        for procs, ctrls, _out in crews.values():
            for c in ctrls:
                c.put(("stop",))
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    row = {}
    for name, r in results.items():
        if r["error"]:
            row[name] = {"error": r["error"]}
            continue
        times = sorted(r["times"])
        row[name] = {"gbps": len(times) * size / seconds / 1e9, "p50_us": times[len(times) // 2] * 1e6,
                     "p99_us": times[int(len(times) * 0.99)] * 1e6, "gets": len(times)}
    return row


SYSTEMS.update({c.name: c for c in (Prefixd, Redis, Mooncake)})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,4M")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--seconds", type=float, default=3.0, help="reading time per system and row")
    ap.add_argument("--slices", type=int, default=6, help="turns the systems take within a row")
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
                r = measure(systems, stored, size, n, a.seconds, max(1, a.slices))
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
