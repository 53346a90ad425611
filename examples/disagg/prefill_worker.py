"""Prefill worker: computes a prompt's KV on its GPU and pushes every full 256-token chunk to
prefixd, straight from the model's per-layer K/V tensors (paged fragments, no gather copy).

POST /prefill {"tokens": [...], "verify": bool} ->
  {"first_token", "chunks", "stored", "compute_s", "push_s", "bytes", "digests"?, "fingerprint"}
"""

import time

import common


def main():
    a = common.worker_parser(__doc__, "cuda:0", 8100).parse_args()
    device, model, fp, client = common.start_worker(a, "prefill")

    def prefill(req):
        toks = req["tokens"]
        t0 = time.perf_counter()
        first, cache = common.forward(model, toks)
        common.sync(device)
        t1 = time.perf_counter()
        kv = [t.contiguous() for t in common.kv_tensors(cache)]
        chunks = len(toks) // common.CHUNK
        stored = 0
        if chunks:
            frags = prefixd.Fragments.token_runs(kv, token_dim=2, first_token=0, chunks=chunks)
            stored = client.put_paged(toks, frags).stored
        t2 = time.perf_counter()
        res = {
            "first_token": first, "chunks": chunks, "stored": stored, "compute_s": t1 - t0, "push_s": t2 - t1,
            "bytes": stored * common.CHUNK * common.kv_bytes_per_token(model), "fingerprint": fp,
        }
        if req.get("verify"):
            res["digests"] = common.chunk_digests(kv, chunks)
        return res

    common.serve(a.port, {"/prefill": prefill}, "prefill")


prefixd = common.prefixd

if __name__ == "__main__":
    main()
