"""What the prefill worker, the decode worker and the reference share: the model (a Qwen3
configuration with seeded random weights: nothing is downloaded), the KV layout prefixd stores,
the greedy schedule, digests, and a small JSON-over-HTTP layer (standard library only).

KV layout: HuggingFace keeps, per layer, K and V as [1, kv_heads, tokens, head_dim]. A chunk of
256 tokens is stored as its fragments in this order: for each layer, K then V, for each head,
the head's 256-token run (head_dim * 2 bytes per token). Qwen3-4B: 36 x 2 x 8 = 576 fragments of
64 KiB, 36 MiB a chunk, 144 KiB a token.
"""

import hashlib
import json
import os
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Deterministic cuBLAS (read when CUDA starts): the check compares processes bit for bit.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

# The package from this checkout when it is not installed (e.g. a wheel unpacked beside it).
try:
    import prefixd
except ImportError:  # pragma: no cover - depends on the machine
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
    import prefixd

CHUNK = 256

# Qwen3 shapes. "qwen3-4b" is Qwen3-4B's configuration (config.json of the released model);
# "qwen3-small" keeps its vocabulary and layout at a fraction of the size; "tiny" is for CPU
# smoke tests.
PRESETS = {
    "qwen3-4b": dict(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "qwen3-small": dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=40960,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
}


def build_model(preset, device, seed=0):
    """The model with weights drawn from `seed` on `device`: the same weights in every process
    (the same generator, sequence and kernels); `fingerprint` checks that."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # cuDNN's attention builds an execution plan for every new sequence length (tens of ms each,
    # at every prompt and every decode step); FlashAttention needs none and is deterministic.
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = Qwen3Config(**PRESETS[preset])
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval().requires_grad_(False)
    return model


def fingerprint(model):
    """sha256 over a few whole weight tensors (first and last layer, embedding)."""
    h = hashlib.sha256()
    sd = model.state_dict()
    names = [n for n in sd if ".0." in n or f".{model.config.num_hidden_layers - 1}." in n]
    for n in sorted(names) + ["model.embed_tokens.weight"]:
        h.update(sd[n].contiguous().view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def kv_tensors(cache):
    """[K0, V0, K1, V1, ...] of a DynamicCache, each [1, kv_heads, tokens, head_dim]."""
    out = []
    for layer in cache.layers:
        out.extend([layer.keys, layer.values])
    return out


def empty_kv(model, tokens, device):
    c = model.config
    shape = (1, c.num_key_value_heads, tokens, c.head_dim)
    return [torch.empty(shape, dtype=torch.bfloat16, device=device) for _ in range(2 * c.num_hidden_layers)]


def cache_from(kv, tokens):
    """A DynamicCache holding the first `tokens` tokens of [K0, V0, ...]."""
    from transformers import DynamicCache

    pairs = [(kv[i][:, :, :tokens], kv[i + 1][:, :, :tokens]) for i in range(0, len(kv), 2)]
    return DynamicCache(pairs)


def kv_bytes_per_token(model):
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2


def chunk_digests(kv, chunks):
    """sha256 of each chunk's bytes in prefixd's order (fragments of all layers, K then V, heads)."""
    out = []
    for c in range(chunks):
        h = hashlib.sha256()
        for t in kv:
            h.update(t[:, :, c * CHUNK:(c + 1) * CHUNK].contiguous().view(torch.int16).cpu().numpy().tobytes())
        out.append(h.hexdigest())
    return out


@torch.no_grad()
def forward(model, ids, cache=None):
    """One forward over `ids` (a list of ints) after `cache`: (next token, cache)."""
    device = model.device
    x = torch.tensor([ids], device=device)
    out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return int(out.logits[0, -1].argmax()), out.past_key_values


@torch.no_grad()
def greedy_continue(model, first, cache, new_tokens):
    """Greedy tokens after `first` (already chosen) with `cache`: [first, t2, ...]."""
    toks = [first]
    while len(toks) < new_tokens:
        nxt, cache = forward(model, [toks[-1]], cache)
        toks.append(nxt)
    return toks


def usable_chunks(n_tokens):
    """Chunks a decode may take from the cache: at least one prompt token is always computed."""
    return max(0, (n_tokens - 1) // CHUNK)


def make_prompt(seed, n, vocab, shared=None):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (n,), generator=g).tolist()
    if shared:
        toks[: len(shared)] = shared[: n]
    return toks


# -- workers -------------------------------------------------------------------------------


def worker_parser(doc, device, port):
    """The options both workers take."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-small", choices=sorted(PRESETS))
    ap.add_argument("--device", default=device, help="torch device (cuda:N or cpu)")
    ap.add_argument("--prefixd", default="http://127.0.0.1:50051", help="prefixd gRPC endpoint")
    ap.add_argument("--port", type=int, default=port)
    ap.add_argument("--seed", type=int, default=0, help="weight seed (same in every worker)")
    return ap


def start_worker(a, name):
    """The worker's device, model, weights fingerprint and prefixd client (namespace: the model)."""
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build_model(a.model, device, a.seed)
    fp = fingerprint(model)
    client = prefixd.Client(a.prefixd, namespace=a.model, device=device.index if device.type == "cuda" else None,
                            name=f"{name}-worker")
    print(f"{name}: {a.model} on {device}, weights {fp}, prefixd {client.data_path}", flush=True)
    return device, model, fp, client


# -- JSON over HTTP --------------------------------------------------------------------------


def serve(port, routes, name):
    """Serves POST routes {path: fn(dict) -> dict} one request at a time (a worker's GPU work
    is serial; requests queue, and req["_queued_s"] says for how long), GET /health, on
    127.0.0.1:port."""
    _serve(port, routes, name, threading.Lock())


def serve_concurrent(port, routes, name):
    """As `serve`, with requests handled at once (for the proxy, which only waits)."""
    _serve(port, routes, name, None)


def _serve(port, routes, name, lock):
    import contextlib

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"ok": True, "name": name})
            else:
                self._send(404, {"error": f"no route {self.path}"})

        def do_POST(self):
            fn = routes.get(self.path)
            if fn is None:
                return self._send(404, {"error": f"no route {self.path}"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                arrived = time.perf_counter()
                with lock if lock is not None else contextlib.nullcontext():
                    req["_queued_s"] = time.perf_counter() - arrived
                    res = fn(req)
                self._send(200, res)
            except Exception as e:  # noqa: BLE001 - returned to the caller, logged here
                import traceback

                traceback.print_exc()
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"{name} listening on 127.0.0.1:{port}", flush=True)
    srv.serve_forever()


def post(url, obj, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(obj).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: {e.code} {e.read().decode(errors='replace')}") from None


def wait_healthy(url, timeout=300, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {timeout}s")
