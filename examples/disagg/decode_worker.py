"""Decode worker: pulls the longest cached prefix of a prompt's KV from prefixd straight into
its engine's static K/V tensors (paged fragments, engine.py), computes only the rest of the
prompt, then generates greedily (CUDA graphs). With "mode": "recompute" it ignores prefixd and computes the whole prompt
(the baseline of the TTFT benchmark).

POST /decode {"tokens": [...], "max_new_tokens": N, "mode": "pull"|"recompute", "verify": bool} ->
  {"tokens", "hit_tokens", "pull_s", "bytes", "ttft_s", "decode_s", "digests"?, "fingerprint"}
ttft_s runs from the request's start on this worker to the first token on the host.
"""

import time

import common
from engine import StaticEngine

prefixd = common.prefixd


def main():
    ap = common.worker_parser(__doc__, "cuda:1", 8200)
    ap.add_argument("--max-tokens", type=int, default=16384 + 512, help="longest prompt + new tokens")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run the engine's forwards eagerly")
    a = ap.parse_args()
    device, model, fp, client = common.start_worker(a, "decode")
    bpt = common.kv_bytes_per_token(model)
    t = time.perf_counter()
    engine = StaticEngine(model, a.max_tokens, graphs=not a.no_cuda_graphs)
    print(f"decode: engine for {a.max_tokens} tokens, {len(engine.graphs)} CUDA graphs in "
          f"{time.perf_counter() - t:.1f} s", flush=True)

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
