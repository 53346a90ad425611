#!/usr/bin/env python3
"""How long a prefill instance's stores take to reach prefixd while its engine loop is busy, on
CPU, with vLLM's real `Scheduler`, the connector's real worker side (CPU tensors laid out by
vLLM's own KV-cache allocation) and a real prefixd. A decode instance waits for exactly this:
its waiting lookup answers when the prefill's chunks commit.

One step schedules --burst requests at once (the first step of a benchmark at concurrency N)
and starts their stores; from then on the loop spends --busy-ms of pure-Python work (holding
the GIL, as an engine's input preparation does) and --idle-ms asleep (as while the GPU runs)
per step. A watcher process looks the chunks up every 0.2 ms and records when each request's
chunks are all committed. Reported: commit latency from the step that started the stores, p50 /
p99 / max, over --rounds rounds (the first one, which connects, not counted).

    python3 bench/vllm/store_cost.py [--burst 16] [--busy-ms 2] [--idle-ms 3] [--rounds 20]

Needs vLLM (CI's 0.26.0 is enough) and target/release/prefixd (or PREFIXD_BIN).
"""

import argparse
import multiprocessing as mp
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python" / "tests"))
os.environ.setdefault("PREFIXD_BIN", str(REPO / "target" / "release" / "prefixd"))


def watch(endpoint, namespace, wanted, ready, start, out):
    """Process: the wall time at which each request's keys are all cached."""
    import prefixd

    c = prefixd.Client(endpoint, device=None, namespace=namespace)
    c.lookup_keys(next(iter(wanted.values())))  # connected and warm
    seen = {}
    ready.set()
    start.wait()
    deadline = time.time() + 30
    while len(seen) < len(wanted) and time.time() < deadline:
        for rid, keys in wanted.items():
            if rid not in seen and c.lookup_keys(keys) == len(keys):
                seen[rid] = time.time()
        time.sleep(0.0002)
    out.put(seen)
    c.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=112)
    ap.add_argument("--busy-ms", type=float, default=2.0)
    ap.add_argument("--idle-ms", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()

    import prefixd
    import test_vllm as tv
    from conftest import Server
    from prefixd.vllm import chunks as chunking
    from sched_cost import busy  # the same GIL-holding engine work

    srv = Server("--host-pool", "256MiB")
    model_dir = tv.write_tiny_model(tempfile.mkdtemp(prefix="qwen3-tiny-"))
    vc = tv.vllm_config(model_dir, "kv_producer", {"endpoint": srv.endpoint})
    sched, conn = tv.scheduler(vc), tv.worker(vc)
    chunk_blocks = conn._worker.cfg.chunk_blocks
    ctx = mp.get_context("spawn")
    latencies = []
    for r in range(a.rounds):
        reqs, wanted = [], {}
        for i in range(a.burst):
            tokens = [(r * 1_000_003 + i * 7919 + j * 31 + 5) % 3900 + 50 for j in range(a.tokens)]
            req = tv.request(f"r{r}-{i}", tokens)
            reqs.append(req)
            plan = chunking.plan(req.block_hashes, len(req.block_hashes), chunk_blocks)
            wanted[req.request_id] = [c.key for c in plan]
        ready, start, out = ctx.Event(), ctx.Event(), ctx.Queue()
        w = ctx.Process(target=watch, args=(srv.endpoint, conn._worker.namespace, wanted, ready, start, out))
        w.start()
        ready.wait(60)
        for req in reqs:
            sched.add_request(req)
        so = sched.schedule()
        assert len(so.scheduled_new_reqs) == a.burst, "the whole burst in one step (raise NUM_BLOCKS?)"
        start.set()
        t0 = time.time()
        tv.step(sched, conn, so, [q.request_id for q in reqs], eos=True)
        while any(q.request_id in sched.requests for q in reqs) and time.time() - t0 < 30:
            busy(a.busy_ms)
            time.sleep(a.idle_ms / 1000)
            tv.step(sched, conn, sched.schedule())
        seen = out.get(timeout=60)
        w.join()
        if len(seen) < a.burst:
            print(f"round {r}: only {len(seen)} of {a.burst} requests' chunks were seen committed", file=sys.stderr)
        if r > 0:  # the first round connects
            latencies += [(t - t0) * 1000 for t in seen.values()]
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]  # noqa: E731
    print(f"prefixd {prefixd.__file__}")
    print(f"{a.rounds} bursts of {a.burst} stores, engine loop {a.busy_ms:.1f} ms busy + {a.idle_ms:.1f} ms idle "
          f"per step: commit after p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms, max {latencies[-1]:.1f} ms")
    conn.shutdown()
    srv.stop()


if __name__ == "__main__":
    main()
