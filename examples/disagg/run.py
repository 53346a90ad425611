"""Runs the disaggregated prefill/decode example end to end and measures it.

Starts prefixd, the prefill worker, the decode worker and the proxy; then
  correctness  N prompts (300..8000 tokens, some sharing prefixes) through the proxy: the decode
               worker's greedy tokens (KV pulled from prefixd) must equal those of the same
               schedule run in one process with the KV in memory (reference.py), and the pulled
               KV must equal the prefill worker's bit for bit (sha256 per chunk). Agreement
               with a plain single-pass `generate` is reported, not required.
  ttft         the decode worker's time to first token, KV pulled vs whole prompt recomputed,
               at each size of --ttft-sizes (median of --reps, after a warm-up)
  concurrent   --requests prompts through the proxy at each --concurrency, pulled (prefill on
               one GPU, decode on the other) and recompute (decode GPU alone): throughput and
               TTFT percentiles
Writes results.json and results.md into --out (also what ran before a step failed), and prints
results.md. Exit status 1 when a correctness check, a request or a step fails.

  python3 examples/disagg/run.py --model qwen3-4b          # on a machine with two GPUs
  python3 examples/disagg/run.py --model tiny --cpu --steps correctness   # smoke test, no GPU
"""

import argparse
import concurrent.futures as cf
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import common  # noqa: E402


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


class Cluster:
    def __init__(self, a):
        self.a = a
        self.procs = []
        out = pathlib.Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        self.logs = out
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
        self.env = env
        srv = [a.prefixd_bin, "--listen", f"127.0.0.1:{a.grpc_port}", "--metrics-listen", f"127.0.0.1:{a.grpc_port + 1}",
               "--host-pool", a.host_pool]
        if not a.cpu:
            srv += ["--gpu-pool", a.gpu_pool, "--gpu", a.prefill_device.split(":")[1]]
        self.start("prefixd", srv)
        ep = f"http://127.0.0.1:{a.grpc_port}"
        self.wait_prefixd(a.grpc_port + 1)
        py = sys.executable
        common_args = ["--model", a.model, "--prefixd", ep, "--seed", str(a.seed)]
        self.start("prefill", [py, str(HERE / "prefill_worker.py"), *common_args, "--device", a.prefill_device,
                               "--port", "8100"])
        self.start("decode", [py, str(HERE / "decode_worker.py"), *common_args, "--device", a.decode_device,
                              "--port", "8200"])
        self.start("proxy", [py, str(HERE / "proxy.py"), "--port", "8000"])
        for name, port in (("prefill", 8100), ("decode", 8200), ("proxy", 8000)):
            common.wait_healthy(f"http://127.0.0.1:{port}", proc=self.proc(name))

    def start(self, name, cmd):
        log = open(self.logs / f"{name}.log", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=HERE)
        self.procs.append((name, p))

    def proc(self, name):
        return next(p for n, p in self.procs if n == name)

    def wait_prefixd(self, metrics_port):
        import urllib.request

        for _ in range(120):
            if self.proc("prefixd").poll() is not None:
                raise RuntimeError("prefixd exited:\n" + (self.logs / "prefixd.log").read_text())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("prefixd not ready")

    def stop(self):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()


def correctness(a, vocab, cl):
    """The 20-prompt check. Returns (summary dict, ok)."""
    rng = random.Random(a.seed + 1)
    lengths = [int(300 + i * (7700 / (a.prompts - 1))) for i in range(a.prompts)]
    rng.shuffle(lengths)
    prompts = []
    for i, n in enumerate(lengths):
        shared = None
        if i % 5 == 4 and prompts:  # every fifth prompt starts with an earlier prompt's prefix
            src = max(prompts, key=len)
            shared = src[: min(len(src), n) // 2]
        prompts.append(common.make_prompt(1000 + i, n, vocab, shared))
    results = []
    for i, toks in enumerate(prompts):
        r = common.post("http://127.0.0.1:8000/generate", {"tokens": toks, "max_new_tokens": a.new_tokens,
                                                             "verify": True})
        results.append(r)
        print(f"  prompt {i}: {len(toks)} tokens, pulled {r['decode']['hit_tokens']}", flush=True)
    ref_in = pathlib.Path(a.out) / "reference_input.json"
    ref_out = pathlib.Path(a.out) / "reference_output.json"
    json.dump([{"tokens": t, "hit_tokens": r["decode"]["hit_tokens"], "max_new_tokens": a.new_tokens}
               for t, r in zip(prompts, results)], open(ref_in, "w"))
    with open(pathlib.Path(a.out) / "reference.log", "w") as log:
        subprocess.run([sys.executable, str(HERE / "reference.py"), "--model", a.model, "--device", a.reference_device,
                        "--seed", str(a.seed), "--input", str(ref_in), "--output", str(ref_out)],
                       check=True, stdout=log, stderr=subprocess.STDOUT, env=cl.env, cwd=HERE)
    ref = json.load(open(ref_out))
    rows, ok = [], True
    fps = {results[0]["prefill"]["fingerprint"], results[0]["decode"]["fingerprint"], ref["fingerprint"]}
    if len(fps) != 1:
        ok = False
        print(f"  WEIGHTS DIFFER between processes: {fps}")
    same_tokens = kv_equal = 0
    gen_agree = []
    for i, (toks, r, rf) in enumerate(zip(prompts, results, ref["prompts"])):
        d, p = r["decode"], r["prefill"]
        hit_chunks = d["hit_tokens"] // common.CHUNK
        expect_hit = min(common.usable_chunks(len(toks)), len(toks) // common.CHUNK) * common.CHUNK
        tok_ok = d["tokens"] == rf["schedule_tokens"]
        pulled = d.get("digests", [])
        kv_ok = pulled == p["digests"][:hit_chunks] and pulled == rf["digests"] and d["hit_tokens"] == expect_hit
        agree = sum(x == y for x, y in zip(d["tokens"], rf["generate_tokens"])) / len(d["tokens"])
        gen_agree.append(agree)
        same_tokens += tok_ok
        kv_equal += kv_ok
        ok &= tok_ok and kv_ok
        rows.append({"prompt": i, "tokens": len(toks), "pulled": d["hit_tokens"], "tokens_equal": tok_ok,
                     "kv_bit_equal": kv_ok, "agree_with_generate": agree})
        if not (tok_ok and kv_ok):
            first_diff = next((j for j, (x, y) in enumerate(zip(d["tokens"], rf["schedule_tokens"])) if x != y), None)
            # Is the decode worker itself repeatable? (the KV is still cached)
            again = common.post("http://127.0.0.1:8200/decode", {"tokens": toks, "max_new_tokens": a.new_tokens})
            rows[-1].update(decode_tokens=d["tokens"], reference_tokens=rf["schedule_tokens"], first_diff=first_diff,
                            decode_repeatable=again["tokens"] == d["tokens"])
            print(f"  MISMATCH prompt {i}: tokens {tok_ok} (first difference at {first_diff}; decode repeats itself: "
                  f"{again['tokens'] == d['tokens']}), kv {kv_ok}, hit {d['hit_tokens']} (expected {expect_hit})")
    summary = {"prompts": len(prompts), "tokens_equal": same_tokens, "kv_bit_equal": kv_equal,
               "new_tokens": a.new_tokens, "weights_fingerprint": sorted(fps),
               "generate_agreement_mean": statistics.mean(gen_agree),
               "generate_exact": sum(g == 1.0 for g in gen_agree), "rows": rows}
    return summary, ok


def ttft(a, vocab):
    out = []
    for n in a.ttft_sizes:
        pulled, recomputed, pulls = [], [], []
        for rep in range(a.reps + 1):  # rep 0 warms up this size
            toks = common.make_prompt(50_000 + n + rep, n, vocab)
            pre = common.post("http://127.0.0.1:8100/prefill", {"tokens": toks})
            dp = common.post("http://127.0.0.1:8200/decode", {"tokens": toks, "max_new_tokens": 1, "mode": "pull"})
            dr = common.post("http://127.0.0.1:8200/decode", {"tokens": toks, "max_new_tokens": 1,
                                                                "mode": "recompute"})
            if dp["tokens"][0] != pre["first_token"] or dr["tokens"][0] != pre["first_token"]:
                print(f"  note: first token differs at {n} tokens (pull {dp['tokens'][0]}, recompute "
                      f"{dr['tokens'][0]}, prefill {pre['first_token']}): bf16 near-ties")
            if rep:
                pulled.append(dp["ttft_s"])
                recomputed.append(dr["ttft_s"])
                pulls.append((dp["pull_s"], dp["bytes"], dp["hit_tokens"], pre["push_s"], pre["bytes"],
                              dp["ttft_s"] - dp["pull_s"]))
        tp, tr = statistics.median(pulled), statistics.median(recomputed)
        pull_s = statistics.median(x[0] for x in pulls)
        nbytes = pulls[0][1]
        push_s = statistics.median(x[3] for x in pulls)
        rest_s = statistics.median(x[5] for x in pulls)
        row = {"tokens": n, "ttft_pull_ms": tp * 1e3, "rest_forward_ms": rest_s * 1e3, "ttft_recompute_ms": tr * 1e3, "ratio": tp / tr,
               "pulled_tokens": pulls[0][2], "bytes": nbytes, "pull_ms": pull_s * 1e3,
               "pull_GBps": nbytes / pull_s / 1e9 if pull_s else 0.0,
               "push_ms": push_s * 1e3, "push_GBps": pulls[0][4] / push_s / 1e9 if push_s else 0.0,
               "reps": a.reps}
        print(f"  {n} tokens: TTFT pulled {tp * 1e3:.1f} ms vs recompute {tr * 1e3:.1f} ms ({tp / tr:.3f}x); "
              f"pull {nbytes / 2**20:.0f} MiB in {pull_s * 1e3:.1f} ms", flush=True)
        out.append(row)
    return out


def concurrent(a, vocab):
    rng = random.Random(a.seed + 7)
    out = []
    for conc in a.concurrency:
        for mode in ("pull", "recompute"):
            prompts = [common.make_prompt(90_000 + conc * 1000 + i, rng.randint(a.min_len, a.max_len), vocab)
                       for i in range(a.requests)]

            def one(t):
                try:
                    return common.post("http://127.0.0.1:8000/generate", {"tokens": t, "max_new_tokens": a.new_tokens,
                                                                           "mode": mode})
                except Exception as e:  # noqa: BLE001 - counted and reported
                    return {"error": str(e)}

            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(conc) as ex:
                res = list(ex.map(one, prompts))
            wall = time.perf_counter() - t0
            errors = [r["error"] for r in res if "error" in r]
            res = [r for r in res if "error" not in r]
            if errors:
                print(f"  concurrency {conc} {mode}: {len(errors)} FAILED requests, first: {errors[0]}", flush=True)
            if not res:
                out.append({"concurrency": conc, "mode": mode, "requests": 0, "failed": len(errors)})
                continue
            tt = [r["ttft_s"] * 1e3 for r in res]
            row = {"concurrency": conc, "mode": mode, "requests": len(res), "failed": len(errors), "wall_s": wall,
                   "req_per_s": len(res) / wall, "out_tok_per_s": sum(len(r["tokens"]) for r in res) / wall,
                   "prompt_tok_per_s": sum(len(p) for p in prompts) / wall,
                   "ttft_p50_ms": pct(tt, 50), "ttft_p90_ms": pct(tt, 90), "ttft_p99_ms": pct(tt, 99),
                   "e2e_p50_ms": pct([r["e2e_s"] * 1e3 for r in res], 50)}
            print(f"  concurrency {conc} {mode}: {row['req_per_s']:.2f} req/s, TTFT p50 {row['ttft_p50_ms']:.0f} "
                  f"p90 {row['ttft_p90_ms']:.0f} p99 {row['ttft_p99_ms']:.0f} ms", flush=True)
            out.append(row)
    return out


def markdown(res):
    lines = [f"# disagg example: {res['model']} (prefill {res['prefill_device']}, decode {res['decode_device']})", ""]
    c = res.get("correctness")
    if c:
        lines += [f"Correctness: {c['tokens_equal']}/{c['prompts']} prompts with greedy tokens equal to the "
                  f"in-memory schedule ({c['new_tokens']} new tokens each); {c['kv_bit_equal']}/{c['prompts']} "
                  f"with pulled KV bit-equal to the prefill worker's; weights {c['weights_fingerprint']}; "
                  f"agreement with single-pass generate: {c['generate_agreement_mean']:.3f} of positions, "
                  f"{c['generate_exact']}/{c['prompts']} prompts exact.", "",
                  "| prompt | tokens | pulled | tokens equal | KV bit-equal | agree w/ generate |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['prompt']} | {r['tokens']} | {r['pulled']} | {r['tokens_equal']} | {r['kv_bit_equal']} | "
                  f"{r['agree_with_generate']:.2f} |" for r in c["rows"]]
        lines.append("")
    if res.get("ttft"):
        lines += ["| prompt tokens | TTFT pulled (ms) | TTFT recompute (ms) | pulled / recompute | pulled MiB | "
                  "pull (ms) | pull GB/s | forward of the rest (ms) | push (ms) | push GB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['ttft_pull_ms']:.1f} | {r['ttft_recompute_ms']:.1f} | {r['ratio']:.3f} | "
                  f"{r['bytes'] / 2**20:.0f} | {r['pull_ms']:.1f} | {r['pull_GBps']:.0f} | {r['rest_forward_ms']:.1f} | "
                  f"{r['push_ms']:.1f} | {r['push_GBps']:.0f} |" for r in res["ttft"]]
        lines.append("")
    if res.get("concurrent"):
        lines += ["| concurrency | mode | requests (failed) | req/s | prompt tok/s | out tok/s | TTFT p50 | p90 | p99 (ms) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['concurrency']} | {r['mode']} | {r['requests']} ({r['failed']}) | {r['req_per_s']:.2f} | "
                  f"{r['prompt_tok_per_s']:.0f} | {r['out_tok_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
                  f"{r['ttft_p90_ms']:.0f} | {r['ttft_p99_ms']:.0f} |" for r in res["concurrent"] if r["requests"]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-4b", choices=sorted(common.PRESETS))
    ap.add_argument("--steps", default="correctness,ttft,concurrent")
    ap.add_argument("--out", default="disagg-results")
    ap.add_argument("--cpu", action="store_true", help="everything on the CPU (smoke test; no GPU pool)")
    ap.add_argument("--prefill-device", default="cuda:0")
    ap.add_argument("--decode-device", default="cuda:1")
    ap.add_argument("--reference-device", default=None, help="default: the decode device")
    ap.add_argument("--prefixd-bin", default=None, help="default: .device/prefixd, else target/release/prefixd")
    ap.add_argument("--gpu-pool", default="40GiB")
    ap.add_argument("--host-pool", default="8GiB")
    ap.add_argument("--grpc-port", type=int, default=50051)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--ttft-sizes", default="1024,4096,8192,16384")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--concurrency", default="4,8")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=8192)
    a = ap.parse_args()
    if a.cpu:
        a.prefill_device = a.decode_device = "cpu"
    a.reference_device = a.reference_device or a.decode_device
    a.ttft_sizes = [int(x) for x in a.ttft_sizes.split(",") if x]
    a.concurrency = [int(x) for x in a.concurrency.split(",") if x]
    if a.prefixd_bin is None:
        cands = [REPO / ".device" / "prefixd", REPO / "target" / "release" / "prefixd", REPO / "target" / "debug" / "prefixd"]
        found = [c for c in cands if c.exists()]
        if not found:
            sys.exit("no prefixd binary: build it (cargo build --release -p prefixd-server) or pass --prefixd-bin")
        a.prefixd_bin = str(found[0])
    a.prefixd_bin = str(pathlib.Path(a.prefixd_bin).resolve())
    steps = set(a.steps.split(","))
    vocab = common.PRESETS[a.model]["vocab_size"]
    res = {"model": a.model, "prefill_device": a.prefill_device, "decode_device": a.decode_device}
    ok = True
    cl = Cluster(a)
    failure = None
    try:
        if "correctness" in steps:
            print("correctness:", flush=True)
            res["correctness"], ok = correctness(a, vocab, cl)
        if "ttft" in steps:
            print("ttft:", flush=True)
            res["ttft"] = ttft(a, vocab)
        if "concurrent" in steps:
            print("concurrent:", flush=True)
            res["concurrent"] = concurrent(a, vocab)
            if any(r.get("failed") for r in res["concurrent"]):
                ok = False
    except Exception as e:  # noqa: BLE001 - what ran is still written below
        failure = f"{type(e).__name__}: {e}"
        res["failure"] = failure
        ok = False
    finally:
        cl.stop()
    json.dump(res, open(pathlib.Path(a.out) / "results.json", "w"), indent=1)
    md = markdown(res)
    (pathlib.Path(a.out) / "results.md").write_text(md)
    print(md)
    if failure:
        print(f"FAILED: {failure}", flush=True)
    if not ok:
        print("FAILED (see above)", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
