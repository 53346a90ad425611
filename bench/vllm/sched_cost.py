#!/usr/bin/env python3
"""What the connector costs vLLM's engine loop on a decode instance, on CPU, with vLLM's real
`Scheduler` and a real prefixd: requests arrive at --rate per second, each announcing (as a
prefill's kv_transfer_params do) chunks that a producer thread commits --lag-ms later, the way a
prefill's stores trail its responses under load. The loop schedules, then spends --busy-ms of
pure-Python work (holding the GIL, as an engine's input preparation does) and --idle-ms asleep
(as while the GPU runs). Reported:
  - the connector's scheduler time per step (its hooks, `scheduler_seconds` / `steps`);
  - lookup calls the sidecar answered per request;
  - from a request's chunks being committed to the step that schedules it, p50 / p99;
  - requests that got all their announced tokens from prefixd.

    python3 bench/vllm/sched_cost.py [--rate 100] [--seconds 10] [--lag-ms 30]
    python3 bench/vllm/sched_cost.py --burst 100 --stagger-ms 1 --rate 0 --seconds 2

--burst N adds N requests at the start, all at once (the first second of a benchmark at
concurrency N), their commits --stagger-ms apart after --lag-ms (a prefill's stores finish one
after another).

Needs vLLM (CI's 0.26.0 is enough) and target/release/prefixd (or PREFIXD_BIN).
"""

import argparse
import heapq
import os
import pathlib
import sys
import threading
import time
import urllib.request

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python" / "tests"))
os.environ.setdefault("PREFIXD_BIN", str(REPO / "target" / "release" / "prefixd"))

import numpy as np  # noqa: E402
import prefixd  # noqa: E402
import test_vllm as tv  # noqa: E402  (the CPU tests' vLLM set-up: config, scheduler, requests)
from conftest import Server  # noqa: E402
from prefixd.vllm import chunks as chunking  # noqa: E402
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402


def lookup_calls(srv):
    text = urllib.request.urlopen(f"http://{srv.metrics}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("prefixd_requests_total{") and 'op="lookup"' in line)


def busy(ms):
    """Pure-Python work holding the GIL for `ms`."""
    end = time.perf_counter() + ms / 1000
    x = 0
    while time.perf_counter() < end:
        for i in range(200):
            x += i * i
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--lag-ms", type=float, default=30.0)
    ap.add_argument("--busy-ms", type=float, default=2.0)
    ap.add_argument("--idle-ms", type=float, default=3.0)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--burst", type=int, default=0)
    ap.add_argument("--stagger-ms", type=float, default=1.0)
    a = ap.parse_args()

    import tempfile

    srv = Server("--host-pool", "1GiB")
    model_dir = tv.write_tiny_model(tempfile.mkdtemp(prefix="qwen3-tiny-"))
    vc = tv.vllm_config(model_dir, "kv_consumer", {"endpoint": srv.endpoint, "pd_wait_ms": 5000})
    vc.cache_config.num_gpu_blocks = tv.NUM_BLOCKS
    # log_stats off: with it on, vLLM takes the connector's counters every step.
    sched = tv.Scheduler(vllm_config=vc, kv_cache_config=tv.kv_cache_config(), log_stats=False,
                         structured_output_manager=tv.StructuredOutputManager(vc), block_size=tv.BLOCK)
    side = sched.connector._sched
    # vLLM takes (and resets) the connector's counters as it updates; keep them for the report.
    sched.connector.get_kv_connector_stats = lambda: None
    ns = side.namespaces[0]
    chunk_bytes = tv.BLOCK * tv.KV_HEADS * tv.HEAD * 2 * 2 * tv.LAYERS  # bytes per block, bf16 K and V

    due = []  # (commit time, request id, keys, sizes)
    committed = {}
    lock = threading.Condition()
    stop = threading.Event()

    def producer():
        with prefixd.Client(srv.endpoint, device=None, namespace=ns) as c:
            while not stop.is_set():
                with lock:
                    while not due and not stop.is_set():
                        lock.wait(0.05)
                    if stop.is_set():
                        return
                    t, rid, keys, sizes = due[0]
                    wait = t - time.monotonic()
                    if wait > 0:
                        lock.wait(wait)
                        continue
                    heapq.heappop(due)
                c.put_chunks(keys, [np.zeros(s, dtype=np.uint8) for s in sizes])
                committed[rid] = time.monotonic()

    th = threading.Thread(target=producer, daemon=True)
    th.start()
    before = lookup_calls(srv)
    side.stats()  # start the counters from here
    start = time.monotonic()
    next_arrival, n, scheduled, full = start, 0, {}, 0
    step_ms = []  # each schedule() call's wall time

    def arrive(commit_at):
        nonlocal n
        rid = f"r{n}"
        tokens = [(n * 7919 + i * 31 + 5) % 3900 + 50 for i in range(a.tokens)]
        req = tv.request(rid, tokens, params=None)
        plan = chunking.plan(req.block_hashes, len(req.block_hashes), side.cfg.chunk_blocks)
        req.kv_transfer_params = {"prefixd": {"endpoint": srv.endpoint, "chunks": len(plan)}}
        with lock:
            heapq.heappush(due, (commit_at, rid, [c.key for c in plan], [c.blocks * chunk_bytes for c in plan]))
            lock.notify()
        sched.add_request(req)
        n += 1

    for i in range(a.burst):
        arrive(start + (a.lag_ms + i * a.stagger_ms) / 1000)
    if a.rate <= 0:
        next_arrival = float("inf")
    while time.monotonic() - start < a.seconds or (len(scheduled) < n and time.monotonic() - start < a.seconds + 10):
        now = time.monotonic()
        while now >= next_arrival and now - start < a.seconds:
            arrive(now + a.lag_ms / 1000)
            next_arrival += 1 / a.rate
        t0 = time.monotonic()
        out = sched.schedule()
        t = time.monotonic()
        step_ms.append((t - t0) * 1000)
        for new in out.scheduled_new_reqs:
            scheduled[new.req_id] = t
            full += new.num_computed_tokens >= (a.tokens // tv.BLOCK) * tv.BLOCK - (1 if a.tokens % tv.BLOCK == 0 else 0)
        # Done with them once scheduled (their load is planned): aborted before the step's
        # output comes back, as vLLM allows, so nothing else holds the KV cache.
        if out.scheduled_new_reqs:
            sched.finish_requests([r.req_id for r in out.scheduled_new_reqs], RequestStatus.FINISHED_ABORTED)
        sched.update_from_output(out, EMPTY_MODEL_RUNNER_OUTPUT)
        busy(a.busy_ms)
        time.sleep(a.idle_ms / 1000)
    stop.set()
    th.join(timeout=5)
    stats = side.stats()
    calls = lookup_calls(srv) - before
    waits = sorted((scheduled[r] - committed[r]) * 1000 for r in scheduled if r in committed)
    steps = stats.get("steps", 0)
    per_step = 1000 * stats.get("scheduler_seconds", 0) / max(1, steps)
    pct = lambda p: waits[min(len(waits) - 1, int(p * len(waits)))] if waits else float("nan")  # noqa: E731
    print(f"{n} requests at {a.rate:.0f}/s, commits {a.lag_ms:.0f} ms after arrival; {len(scheduled)} scheduled, "
          f"{full} with every announced token from prefixd")
    print(f"connector scheduler time: {per_step:.3f} ms per step over {steps} steps; "
          f"lookup calls per request: {calls / max(1, n):.1f}")
    print(f"commit -> scheduled: p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms")
    longest = sorted(step_ms, reverse=True)[:5]
    print("longest schedule() calls: " + ", ".join(f"{m:.1f}" for m in longest) + " ms")
    sched.connector.shutdown()
    srv.stop()


if __name__ == "__main__":
    main()
