"""Reference: the same schedule in one process with the KV kept in memory, and a plain
single-pass `generate` for comparison.

For each prompt of the input file, with P the prefix the decode worker pulled: a forward over
the whole prompt (what the prefill worker computes), its first P tokens of KV loaded into the
decode engine (engine.py), a forward over the rest, then greedy decoding, as the decode worker
does; also HuggingFace's `generate` (greedy) on the prompt alone.

Input: JSON list of {"tokens", "hit_tokens", "max_new_tokens"}. Output: JSON list of
{"schedule_tokens", "generate_tokens", "digests"} plus the weights' fingerprint.
"""

import argparse
import json

import torch

import common
from engine import StaticEngine


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-small", choices=sorted(common.PRESETS))
    ap.add_argument("--device", default="cuda:1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--max-tokens", type=int, default=16384 + 512)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    a = ap.parse_args()

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = common.build_model(a.model, device, a.seed)
    engine = StaticEngine(model, a.max_tokens, graphs=not a.no_cuda_graphs)
    out = {"fingerprint": common.fingerprint(model), "prompts": []}
    for p in json.load(open(a.input)):
        toks, hit, n = p["tokens"], p["hit_tokens"], p["max_new_tokens"]
        _, cache = common.forward(model, toks)  # what the prefill worker computes
        kv = common.kv_tensors(cache)
        digests = common.chunk_digests(kv, hit // common.CHUNK)
        engine.load(kv, hit)  # the prefix, from memory instead of prefixd
        first = engine.forward(toks[hit:], hit)
        schedule = engine.generate(first, len(toks), n)
        del cache, kv
        ids = torch.tensor([toks], device=device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
        out["prompts"].append({"schedule_tokens": schedule, "generate_tokens": gen[0, len(toks):].tolist(),
                               "digests": digests})
        print(f"reference: {len(toks)} tokens, P={hit}", flush=True)
    json.dump(out, open(a.output, "w"))


if __name__ == "__main__":
    main()
