#!/usr/bin/env python3
"""One reader's remote gets, run after run: a fresh prefixd each run (forced onto active
messages over tcp), one object read over and over for --seconds, its p50. On a small machine a
run's result depends on where the scheduler puts the busy threads (the reader, its UCX thread,
the server's UCX and async threads), so a single run says little; the spread over runs does.

    python3 bench/remote/one_reader.py [--size 1M] [--runs 10] [--seconds 2]

Needs target/release/prefixd (or PREFIXD_BIN) and the prefixd package.
"""

import argparse
import os
import pathlib
import subprocess
import time

import numpy as np
import prefixd

REPO = pathlib.Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1M")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    units = {"K": 1 << 10, "M": 1 << 20}
    size = int(a.size[:-1]) * units[a.size[-1]] if a.size[-1] in units else int(a.size)
    binary = os.environ.get("PREFIXD_BIN") or str(REPO / "target" / "release" / "prefixd")
    key = bytes([7]) * 32
    p50s = []
    for run in range(a.runs):
        server = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--net-devices", "lo",
             "--host-pool", "2GiB"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            fields = dict(w.split("=", 1) for w in server.stdout.readline().split() if "=" in w)
            endpoint = "http://" + fields["grpc"]
            with prefixd.Client(endpoint, device=None, namespace="one") as c:
                c.put_chunks([key], [np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)])
            c = prefixd.Client(endpoint, device=None, namespace="one", transports="tcp", force_remote=True)
            out = np.empty(size, dtype=np.uint8)
            for _ in range(20):  # warm-up
                c.get_chunks([key], [out])
            times, end = [], time.perf_counter() + a.seconds
            while (t := time.perf_counter()) < end:
                if c.get_chunks([key], [out]) != 1:
                    raise RuntimeError("miss")
                times.append(time.perf_counter() - t)
            c.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
        times.sort()
        p50s.append(times[len(times) // 2] * 1e6)
        print(f"run {run}: {len(times)} gets, p50 {p50s[-1]:.0f} µs", flush=True)
    print(f"p50 over runs: {min(p50s):.0f}-{max(p50s):.0f} µs; sorted: " + ", ".join(f"{p:.0f}" for p in sorted(p50s)))


if __name__ == "__main__":
    main()
