"""Decode worker: pulls the longest cached prefix of a prompt's KV from prefixd straight into
its engine's static K/V tensors (paged fragments, engine.py), computes only the rest of the
prompt, then generates greedily (CUDA graphs). With "mode": "recompute" it ignores prefixd and computes the whole prompt
(the baseline of the TTFT benchmark).

POST /decode {"tokens": [...], "max_new_tokens": N, "mode": "pull"|"recompute", "verify": bool} ->
  {"tokens", "hit_tokens", "pull_s", "bytes", "ttft_s", "decode_s", "digests"?, "fingerprint"}
ttft_s runs from the request's start on this worker to the first token on the host.
"""

import argparse
import time

import torch

import common
from engine import StaticEngine

prefixd = common.prefixd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-small", choices=sorted(common.PRESETS))
    ap.add_argument("--device", default="cuda:1", help="torch device (cuda:N or cpu)")
    ap.add_argument("--prefixd", default="http://127.0.0.1:50051", help="prefixd gRPC endpoint")
    ap.add_argument("--port", type=int, default=8200)
    ap.add_argument("--seed", type=int, default=0, help="weight seed (same in every worker)")
    ap.add_argument("--max-tokens", type=int, default=16384 + 512, help="longest prompt + new tokens")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run the engine's forwards eagerly")
    a = ap.parse_args()

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = common.build_model(a.model, device, a.seed)
    fp = common.fingerprint(model)
    t = time.perf_counter()
    engine = StaticEngine(model, a.max_tokens, graphs=not a.no_cuda_graphs)
    print(f"decode: engine for {a.max_tokens} tokens, {len(engine.graphs)} CUDA graphs in "
          f"{time.perf_counter() - t:.1f} s", flush=True)
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
        if len(toks) + n_new > engine.max_tokens:
            raise ValueError(f"{len(toks)} + {n_new} tokens exceed --max-tokens {engine.max_tokens}")
        t0 = time.perf_counter()
        hit = 0
        if mode == "pull":
            usable = common.usable_chunks(len(toks))
            if usable:
                # Straight into the engine's static KV cache: no staging, no copy after.
                hit = client.get_paged(toks, engine.fragments(usable))
            t1 = time.perf_counter()
            first = engine.forward(toks[hit:], hit)
        else:
            t1 = t0
            first, cache = common.forward(model, toks)  # HuggingFace's own prefill (FlashAttention)
            engine.load(common.kv_tensors(cache), len(toks))
            del cache
        t2 = time.perf_counter()
        out = engine.generate(first, len(toks), n_new)
        common.sync(device)
        t3 = time.perf_counter()
        res = {
            "tokens": out, "hit_tokens": hit, "pull_s": t1 - t0, "bytes": hit * bpt, "ttft_s": t2 - t0,
            "decode_s": t3 - t2, "queued_s": req["_queued_s"], "fingerprint": fp,
        }
        if req.get("verify") and hit:
            res["digests"] = common.chunk_digests(engine.kv, hit // common.CHUNK)
        return res

    common.serve(a.port, {"/decode": decode}, "decode")


if __name__ == "__main__":
    main()
