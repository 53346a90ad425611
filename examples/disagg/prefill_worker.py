"""Prefill worker: computes a prompt's KV on its GPU and pushes every full 256-token chunk to
prefixd, straight from the model's per-layer K/V tensors (paged fragments, no gather copy).

POST /prefill {"tokens": [...], "verify": bool} ->
  {"first_token", "chunks", "stored", "compute_s", "push_s", "bytes", "digests"?, "fingerprint"}
"""

import argparse
import time

import torch

import common


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-small", choices=sorted(common.PRESETS))
    ap.add_argument("--device", default="cuda:0", help="torch device (cuda:N or cpu)")
    ap.add_argument("--prefixd", default="http://127.0.0.1:50051", help="prefixd gRPC endpoint")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--seed", type=int, default=0, help="weight seed (same in every worker)")
    a = ap.parse_args()

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = common.build_model(a.model, device, a.seed)
    fp = common.fingerprint(model)
    client = prefixd.Client(a.prefixd, namespace=a.model, device=device.index if device.type == "cuda" else None,
                            name="prefill-worker")
    print(f"prefill: {a.model} on {device}, weights {fp}, prefixd {client.data_path}", flush=True)

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
