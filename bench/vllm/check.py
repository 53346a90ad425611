#!/usr/bin/env python3
"""Correctness of prefixd P/D inside real `vllm serve` (run on the GPU machine by gpu.sh).

Sends prompts of token ids (100 to 8,000 tokens, a third sharing prefixes, most lengths not a
multiple of 16 or 256) through the proxy, one at a time, greedy, 32 new tokens, ignore_eos, and
checks for every prompt:
  - the tokens equal a single vLLM instance's whose prefix cache was warmed with the prompt (the
    prefill instance itself: after the P/D run it holds the prompt's KV it computed, so asking it
    again is "cached KV, then the tail", the schedule the decode instance ran);
  - the decode instance's own counter of tokens from external KV transfer grew by at least
    prompt length - block size;
  - every block the decode instance loaded hashes (sha256) to what the prefill instance stored
    (the connector's debug hook writes both sides' hashes to --debug-dir).
First it checks the two instances hold the same dummy weights: a prompt neither has seen, sent
to each directly, gives the same tokens.
"""

import argparse
import glob
import json
import os
import random
import sys
import time
import urllib.request


def post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def complete(base, model, prompt, n):
    r = post(f"{base}/v1/completions", {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
                                        "ignore_eos": True})
    return r["choices"][0]["text"]


def metric(base, name, labels):
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(l in line for l in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def prompts(n, seed, vocab):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(100, 8000)
        if length % 16 == 0:
            length += rng.randint(1, 15)
        if i % 3 == 2 and out:
            base = rng.choice(out)
            shared = rng.randint(min(64, len(base) - 1), len(base) - 1)
            p = base[:shared] + [rng.randrange(10, vocab) for _ in range(max(1, length - shared))]
        else:
            p = [rng.randrange(10, vocab) for _ in range(length)]
        out.append(p)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--prefill", required=True)
    ap.add_argument("--decode", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=150000)
    ap.add_argument("--debug-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="local", help="names the report: correctness-TAG.json")
    a = ap.parse_args()
    report = {"prompts": []}

    fp = [random.Random(7).randrange(10, a.vocab) for _ in range(77)]
    fp_p, fp_d = complete(a.prefill, a.model, fp, 16), complete(a.decode, a.model, fp, 16)
    report["fingerprint_equal"] = fp_p == fp_d
    print(f"weights fingerprint: prefill {'==' if fp_p == fp_d else '!='} decode", flush=True)

    os.makedirs(a.debug_dir, exist_ok=True)
    open(os.path.join(a.debug_dir, "on"), "w").close()  # the connector's hashing, for this run only
    ext = ("vllm:prompt_tokens_by_source_total", ['source="external_kv_transfer"'])
    ok_tokens = ok_hits = 0
    for i, p in enumerate(prompts(a.n, 11, a.vocab)):
        before = metric(a.decode, *ext)
        t0 = time.perf_counter()
        got = complete(a.proxy, a.model, p, a.new_tokens)
        took = time.perf_counter() - t0
        hit = metric(a.decode, *ext) - before
        ref = complete(a.prefill, a.model, p, a.new_tokens)
        same = got == ref
        enough = hit >= len(p) - a.block
        ok_tokens += same
        ok_hits += enough
        report["prompts"].append({"len": len(p), "same_tokens": same, "external_tokens": hit, "seconds": took})
        print(f"{i:2d} len {len(p):5d} tokens {'==' if same else '!='} reference, external {int(hit):5d} "
              f"({'ok' if enough else 'SHORT'}), {took * 1000:.0f} ms", flush=True)

    # The prefill's hook hashes each chunk after committing it, on its store threads, which run
    # behind: switch the hook off only once its files stop growing (2x H200, 2026-11-30: the
    # last prompt's last chunks were loaded but never hashed on the store side).
    sizes, quiet_since = None, time.monotonic()
    while time.monotonic() - quiet_since < 5:
        now = [os.path.getsize(f) for f in sorted(glob.glob(os.path.join(a.debug_dir, "worker-*.txt")))]
        if now != sizes:
            sizes, quiet_since = now, time.monotonic()
        time.sleep(0.5)
    os.remove(os.path.join(a.debug_dir, "on"))
    stores, loads = {}, []
    for f in glob.glob(os.path.join(a.debug_dir, "worker-*.txt")):
        for line in open(f):
            what, key, idx, digest = line.split()
            if what == "store":
                stores[(key, idx)] = digest
            else:
                loads.append(((key, idx), digest))
    matched = sum(1 for k, d in loads if stores.get(k) == d)
    unhashed = sum(1 for k, d in loads if k not in stores)
    report.update(
        n=a.n, same_tokens=ok_tokens, enough_external=ok_hits, loaded_blocks=len(loads),
        loaded_blocks_bit_identical=matched, loaded_blocks_different=len(loads) - matched - unhashed,
        loaded_blocks_without_store_hash=unhashed, stored_blocks=len(stores),
    )
    print(f"tokens equal to the reference: {ok_tokens}/{a.n}; external hits >= len - {a.block}: {ok_hits}/{a.n}; "
          f"loaded blocks identical to stored: {matched}/{len(loads)} ({len(loads) - matched - unhashed} different, "
          f"{unhashed} with no store hash; {len(stores)} stored)")
    json.dump(report, open(os.path.join(a.out, f"correctness-{a.tag}.json"), "w"), indent=1)
    good = report["fingerprint_equal"] and ok_tokens == a.n and ok_hits == a.n and loads and matched == len(loads)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
