"""The decode side's engine: a static KV cache that prefixd fills in place, and CUDA graphs for
the forwards that follow (the prompt's uncached tail, then one token per step).

Why: HuggingFace's eager forward launches ~2000 kernels (Qwen3-4B shape); on the GPU machine
that is 60-75 ms of CPU time per forward whatever the number of tokens, more than the GPU work of
a 256-token tail. Production engines (vLLM, SGLang) run such forwards as CUDA graphs; so does
this one, with the HuggingFace model's own modules inside the graphs.

How:
- K and V of every layer live in static tensors [1, kv_heads, capacity, head_dim]. A pull lands
  there directly: `fragments(chunks)` names each chunk's 256-token runs, as the prefill worker
  named them in its own cache.
- A forward of R new tokens at positions start.. runs the graph of the smallest bucket
  (1, 2, 4, ... 256) holding R, with the input padded. The pad tokens' K/V land past the real
  ones and are overwritten by the next forward before anything attends to them: a query at
  position p attends to keys 0..p only (an explicit mask over the whole capacity).
- Attention groups the query heads that share a KV head into one sequence, so K and V are read
  without HuggingFace's repeat_kv copies (grouped-query attention with a mask): by SDPA's fused
  kernel over the smallest multiple of 4096 keys that holds the forward (one graph per length),
  or, for decode steps, by two matmuls over the whole capacity (memory-bound, one graph).
The numerics are those of this engine, not of HuggingFace's dynamic-cache path: the reference
(reference.py) runs the same engine with the KV kept in memory, and must match bit for bit.
"""

import torch

_ACTIVE = None  # the engine whose forward is being run or captured (read by the attention function)
_REGISTERED = False


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention for models switched to "prefixd_static": the engine's grouped, masked attention
    inside an engine forward, HuggingFace's SDPA path otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    eng = _ACTIVE
    if eng is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    _, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    rep = heads // kv_heads
    # Query heads h = g * rep + r share KV head g: fold r into the sequence.
    q = query.reshape(1, kv_heads, rep * q_len, dim)
    k, v = key[:, :, : eng._kv_len], value[:, :, : eng._kv_len]
    if rep * q_len <= eng.SMALL_ROWS:
        # A few query rows (decode steps): memory-bound; matmuls read K and V once, where the
        # fused kernel would run one block per KV head.
        s = torch.matmul(q, k.transpose(-1, -2)) * scaling + eng._mask
        out = torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), v)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=eng._mask, scale=scaling)
    out = out.reshape(1, heads, q_len, dim).transpose(1, 2).contiguous()
    return out, None


def _register():
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register("prefixd_static", _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register("prefixd_static", sdpa_mask)
    _REGISTERED = True


class _StaticKV:
    """What the attention layers see as `past_key_values`: writes the new K/V at the forward's
    positions and hands back the whole static tensors."""

    def __init__(self, engine, pos):
        self.e, self.pos = engine, pos

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.e.k[layer_idx], self.e.v[layer_idx]
        k.index_copy_(2, self.pos, key_states)
        v.index_copy_(2, self.pos, value_states)
        return k, v


class StaticEngine:
    BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    # Forwards of many tokens attend over the smallest of these key lengths that holds them
    # (fused attention costs in proportion); decode steps over the whole capacity (cheap).
    KV_STEP = 4096
    SMALL_ROWS = 128

    def __init__(self, model, max_tokens, graphs=True):
        _register()
        model.config._attn_implementation = "prefixd_static"
        self.model = model
        cfg = model.config
        self.device = model.device
        self.max_tokens = max_tokens
        self.capacity = cap = max_tokens + self.BUCKETS[-1]  # room for the padding of the last forward
        shape = (1, cfg.num_key_value_heads, cap, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=torch.bfloat16, device=self.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=torch.bfloat16, device=self.device) for _ in range(cfg.num_hidden_layers)]
        self.kv = [t for pair in zip(self.k, self.v) for t in pair]
        self.rep = cfg.num_attention_heads // cfg.num_key_value_heads
        self._positions = torch.arange(cap + self.BUCKETS[-1], device=self.device)
        self._keys = torch.arange(cap, device=self.device)
        self.static = {b: {"ids": torch.zeros(1, b, dtype=torch.long, device=self.device),
                           "pos": torch.arange(b, device=self.device)} for b in self.BUCKETS}
        self.outs = {}
        self.graphs = {}
        self._mask = None
        self._kv_len = cap
        if graphs and self.device.type == "cuda":
            self._capture()

    def _kv_lengths(self, b):
        if self.rep * b <= self.SMALL_ROWS:
            return [self.capacity]
        return [n for n in range(self.KV_STEP, self.capacity, self.KV_STEP)] + [self.capacity]

    def _kv_len_for(self, b, end):
        return next(n for n in self._kv_lengths(b) if n >= end)

    def fragments(self, chunks, chunk_tokens=256):
        """Where chunks 0..chunks of a pulled prefix go: this engine's K/V tensors."""
        import prefixd

        return prefixd.Fragments.token_runs(self.kv, token_dim=2, first_token=0, chunks=chunks,
                                            chunk_tokens=chunk_tokens)

    def load(self, kv, tokens):
        """Copies the first `tokens` tokens of [K0, V0, ...] (e.g. a DynamicCache's) in."""
        for dst, src in zip(self.kv, kv):
            dst[:, :, :tokens].copy_(src[:, :, :tokens])

    @torch.inference_mode()
    def _run(self, b, kv_len):
        global _ACTIVE
        st = self.static[b]
        pos = st["pos"]
        # Query row r of a head group attends to keys 0..pos[r]; the rows repeat per group.
        visible = self._keys[None, :kv_len] <= pos[:, None]
        zero = torch.zeros((), dtype=torch.bfloat16, device=self.device)
        mask = torch.where(visible, zero, torch.finfo(torch.bfloat16).min)
        self._mask = mask.repeat(self.rep, 1)[None, None]
        self._kv_len = kv_len
        _ACTIVE = self
        try:
            out = self.model.model(input_ids=st["ids"], position_ids=pos[None], past_key_values=_StaticKV(self, pos),
                                   attention_mask={"full_attention": None}, use_cache=True)
        finally:
            _ACTIVE = None
        self.outs[(b, kv_len)] = out.last_hidden_state

    def _capture(self):
        shapes = [(b, n) for b in self.BUCKETS for n in self._kv_lengths(b)]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for b, n in shapes:
                for _ in range(2):  # warm-up: kernels and cuBLAS plans chosen outside the capture
                    self._run(b, n)
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = None
        for b, n in shapes:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._run(b, n)
            pool = g.pool()
            self.graphs[(b, n)] = g
        torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def forward(self, ids, start):
        """Runs `ids` (a list of token ids) at positions start.. and returns the greedy next token."""
        if not ids:
            raise ValueError("nothing to forward")
        if start + len(ids) > self.max_tokens:
            raise ValueError(f"{start + len(ids)} tokens exceed the engine's {self.max_tokens}")
        top = self.BUCKETS[-1]
        for i in range(0, len(ids), top):
            piece = ids[i:i + top]
            r = len(piece)
            b = next(x for x in self.BUCKETS if x >= r)
            st = self.static[b]
            st["ids"][0, :r].copy_(torch.tensor(piece, dtype=torch.long))
            st["ids"][0, r:].zero_()
            p = start + i
            st["pos"].copy_(self._positions[p:p + b])
            n = self._kv_len_for(b, p + b)
            if (b, n) in self.graphs:
                self.graphs[(b, n)].replay()
            else:
                self._run(b, n)
        h = self.outs[(b, n)][:, r - 1]
        return int(self.model.lm_head(h)[0].argmax())

    def generate(self, first, start, new_tokens):
        """Greedy tokens after `first` (the token at position `start`): [first, t2, ...]."""
        toks = [first]
        while len(toks) < new_tokens:
            toks.append(self.forward([toks[-1]], start + len(toks) - 1))
        return toks
