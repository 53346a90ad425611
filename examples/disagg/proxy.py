"""Proxy: sends each prompt to the prefill worker (which pushes its KV to prefixd), then to the
decode worker (which pulls it), as the seed guide's disagg_proxy_server.py does.

POST /generate {"tokens": [...], "max_new_tokens": N, "verify": bool, "mode": "pull"|"recompute"}
  -> {"tokens", "ttft_s", "prefill": {...}, "decode": {...}}
ttft_s: from the proxy's receipt of the request to the decode worker's first token (the prefill
call, queueing included, plus the decode worker's own time to first token).
"recompute" skips the prefill worker: the decode worker computes the whole prompt (the
no-disaggregation baseline).
"""

import argparse
import time

import common


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill", default="http://127.0.0.1:8100")
    ap.add_argument("--decode", default="http://127.0.0.1:8200")
    ap.add_argument("--port", type=int, default=8000)
    a = ap.parse_args()

    def generate(req):
        t0 = time.perf_counter()
        mode = req.get("mode", "pull")
        pre = None
        if mode == "pull":
            pre = common.post(a.prefill + "/prefill", {"tokens": req["tokens"], "verify": req.get("verify", False)})
        t1 = time.perf_counter()
        dec = common.post(a.decode + "/decode", {
            "tokens": req["tokens"], "max_new_tokens": req.get("max_new_tokens", 16), "mode": mode,
            "verify": req.get("verify", False),
        })
        t2 = time.perf_counter()
        return {"tokens": dec["tokens"], "ttft_s": (t1 - t0) + dec["queued_s"] + dec["ttft_s"], "e2e_s": t2 - t0,
                "prefill": pre, "decode": dec}

    # The proxy does no GPU work: requests must not queue behind one another here.
    common.serve_concurrent(a.port, {"/generate": generate}, "proxy")


if __name__ == "__main__":
    main()
