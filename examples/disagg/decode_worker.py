"""Decode worker: pulls the longest cached prefix of a prompt's KV from prefixd straight into
its own per-layer K/V tensors (paged fragments), computes only the rest of the prompt, then
generates greedily. With "mode": "recompute" it ignores prefixd and computes the whole prompt
(the baseline of the TTFT benchmark).

POST /decode {"tokens": [...], "max_new_tokens": N, "mode": "pull"|"recompute", "verify": bool} ->
  {"tokens", "hit_tokens", "pull_s", "bytes", "ttft_s", "decode_s", "digests"?, "fingerprint"}
ttft_s runs from the request's start on this worker to the first token on the host.
"""

import argparse
import time

import torch

import common

prefixd = common.prefixd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-small", choices=sorted(common.PRESETS))
    ap.add_argument("--device", default="cuda:1", help="torch device (cuda:N or cpu)")
    ap.add_argument("--prefixd", default="http://127.0.0.1:50051", help="prefixd gRPC endpoint")
    ap.add_argument("--port", type=int, default=8200)
    ap.add_argument("--seed", type=int, default=0, help="weight seed (same in every worker)")
    a = ap.parse_args()

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = common.build_model(a.model, device, a.seed)
    fp = common.fingerprint(model)
    bpt = common.kv_bytes_per_token(model)
    client = prefixd.Client(a.prefixd, namespace=a.model, device=device.index if device.type == "cuda" else None,
                            name="decode-worker")
    print(f"decode: {a.model} on {device}, weights {fp}, prefixd {client.data_path}", flush=True)

    def decode(req):
        toks = req["tokens"]
        n_new = int(req.get("max_new_tokens", 16))
        mode = req.get("mode", "pull")
        if mode not in ("pull", "recompute"):
            raise ValueError(f"mode must be pull or recompute, not {mode!r}")
        t0 = time.perf_counter()
        hit, kv, cache = 0, None, None
        usable = common.usable_chunks(len(toks)) if mode == "pull" else 0
        if usable:
            kv = common.empty_kv(model, usable * common.CHUNK, device)
            frags = prefixd.Fragments.token_runs(kv, token_dim=2, first_token=0, chunks=usable)
            hit = client.get_paged(toks, frags)
            if hit:
                cache = common.cache_from(kv, hit)
        t1 = time.perf_counter()
        first, cache = common.forward(model, toks[hit:], cache)
        common.sync(device)
        t2 = time.perf_counter()
        out = common.greedy_continue(model, first, cache, n_new)
        common.sync(device)
        t3 = time.perf_counter()
        res = {
            "tokens": out, "hit_tokens": hit, "pull_s": t1 - t0, "bytes": hit * bpt, "ttft_s": t2 - t0,
            "decode_s": t3 - t2, "queued_s": req["_queued_s"], "fingerprint": fp,
        }
        if req.get("verify") and hit:
            res["digests"] = common.chunk_digests(kv, hit // common.CHUNK)
        return res

    common.serve(a.port, {"/decode": decode}, "decode")


if __name__ == "__main__":
    main()
