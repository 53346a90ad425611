#!/usr/bin/env python3
"""How long a decode instance's loads from another node's sidecar take to reach its engine
while the engine loop is busy, on CPU, with vLLM's real `Scheduler`, the connector's real worker
side (CPU tensors laid out by vLLM's own KV-cache allocation) and a real prefixd, the remote
path forced (active messages over tcp).

Each round a producer instance stores --burst prompts; then the decode instance gets them at
once, with the producer's kv_transfer_params. From the step whose metadata carries a request's
load, the loop spends --busy-ms of pure-Python work (holding the GIL, as an engine's input
preparation does) and --idle-ms asleep (as while the GPU runs) per step. Reported: from that
step to the one that schedules the request (its load reported received), p50 / p99 / max, over
--rounds rounds (the first one, which connects, not counted).

    python3 bench/vllm/load_cost.py [--burst 16] [--busy-ms 2] [--idle-ms 3] [--rounds 11]

Needs vLLM (CI's 0.26.0 is enough) and target/release/prefixd (or PREFIXD_BIN).
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python" / "tests"))
os.environ.setdefault("PREFIXD_BIN", str(REPO / "target" / "release" / "prefixd"))


def store_round(tv, sched, conn, prompts, r):
    """The producer computes and stores `prompts`; returns each one's kv_transfer_params."""
    reqs = [tv.request(f"p{r}-{i}", t) for i, t in enumerate(prompts)]
    for q in reqs:
        sched.add_request(q)
    out = sched.schedule()
    assert len(out.scheduled_new_reqs) == len(reqs), "the whole burst in one step"
    for i, nr in enumerate(out.scheduled_new_reqs):
        tv.fill_blocks(conn, nr.block_ids[0], r * 1000 + i)
    outputs, _ = tv.step(sched, conn, out, [q.request_id for q in reqs], eos=True)
    params = {o.request_id: o.kv_transfer_params for eo in outputs.values() for o in eo.outputs}
    t0 = time.time()
    while any(q.request_id in sched.requests for q in reqs) and time.time() - t0 < 30:
        time.sleep(0.002)
        tv.step(sched, conn, sched.schedule())
    return [params[q.request_id] for q in reqs]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=112)
    ap.add_argument("--busy-ms", type=float, default=2.0)
    ap.add_argument("--idle-ms", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=11)
    a = ap.parse_args()

    import prefixd
    import test_vllm as tv
    from conftest import Server
    from sched_cost import busy  # the same GIL-holding engine work

    srv = Server("--host-pool", "256MiB")
    model_dir = tv.write_tiny_model(tempfile.mkdtemp(prefix="qwen3-tiny-"))
    pvc = tv.vllm_config(model_dir, "kv_producer", {"endpoint": srv.endpoint})
    psched, pconn = tv.scheduler(pvc), tv.worker(pvc)
    dvc = tv.vllm_config(model_dir, "kv_consumer", {"endpoint": srv.endpoint, "force_remote": True})
    dsched, dconn = tv.scheduler(dvc), tv.worker(dvc)
    latencies, incomplete = [], 0
    for r in range(a.rounds):
        prompts = [[(r * 1_000_003 + i * 7919 + j * 31 + 5) % 3900 + 50 for j in range(a.tokens)]
                   for i in range(a.burst)]
        params = store_round(tv, psched, pconn, prompts, r)
        reqs = [tv.request(f"d{r}-{i}", t, params=p) for i, (t, p) in enumerate(zip(prompts, params))]
        for q in reqs:
            dsched.add_request(q)
        started, scheduled = {}, {}
        t_round = time.time()
        while len(scheduled) < len(reqs) and time.time() - t_round < 30:
            out = dsched.schedule()
            now = time.time()
            for spec in out.kv_connector_metadata.loads:
                started.setdefault(spec.req_id, now)
            for rid in out.num_scheduled_tokens:
                if rid in started:
                    scheduled.setdefault(rid, now)
            tv.step(dsched, dconn, out, list(out.num_scheduled_tokens), eos=True)
            busy(a.busy_ms)
            time.sleep(a.idle_ms / 1000)
        incomplete += len(reqs) - len(scheduled)
        if r > 0:  # the first round connects
            latencies += [(scheduled[rid] - started[rid]) * 1000 for rid in scheduled]
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]  # noqa: E731
    print(f"prefixd {prefixd.__file__}")
    print(f"{a.rounds} bursts of {a.burst} remote loads, engine loop {a.busy_ms:.1f} ms busy + {a.idle_ms:.1f} ms "
          f"idle per step: scheduled after p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms, max {latencies[-1]:.1f} ms"
          f"{f'; {incomplete} never scheduled' if incomplete else ''}")
    pconn.shutdown()
    dconn.shutdown()
    srv.stop()


if __name__ == "__main__":
    main()
