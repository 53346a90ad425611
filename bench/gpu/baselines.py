#!/usr/bin/env python3
"""GPU baselines for BENCHMARKS.md, on the GPU machine: torch peer copy GPU0->GPU1 and NCCL
send/recv through torch.distributed (two processes), for the same sizes as gpu-demo.
Usage: python3 bench/gpu/baselines.py SIZE_BYTES [SIZE_BYTES ...]"""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def peer_copy(size, reps=20):
    a = torch.empty(size, dtype=torch.uint8, device="cuda:0").fill_(7)
    b = torch.empty(size, dtype=torch.uint8, device="cuda:1")
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(0); torch.cuda.synchronize(1)
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize(0); torch.cuda.synchronize(1)
    return size * reps / (time.perf_counter() - t) / 1e9


def pinned_copy(size, reps=20):
    """Pinned host <-> GPU 1 copies (the ceiling of the host tier): (h2d GB/s, d2h GB/s)."""
    h = torch.empty(size, dtype=torch.uint8).pin_memory()
    d = torch.empty(size, dtype=torch.uint8, device="cuda:1")
    out = []
    for src, dst in ((h, d), (d, h)):
        for _ in range(3):
            dst.copy_(src)
        torch.cuda.synchronize(1)
        t = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        torch.cuda.synchronize(1)
        out.append(size * reps / (time.perf_counter() - t) / 1e9)
    return out


def nccl_worker(rank, size, reps, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("nccl", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    x = torch.empty(size, dtype=torch.uint8, device=f"cuda:{rank}")
    for _ in range(3):
        (dist.send if rank == 0 else dist.recv)(x, 1 - rank)
    torch.cuda.synchronize()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(reps):
        (dist.send if rank == 0 else dist.recv)(x, 1 - rank)
    torch.cuda.synchronize()
    if rank == 1:
        q.put(size * reps / (time.perf_counter() - t) / 1e9)
    dist.destroy_process_group()


def nccl(size, reps=20):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=nccl_worker, args=(r, size, reps, q)) for r in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
    return q.get(timeout=5)


if __name__ == "__main__":
    for s in map(int, sys.argv[1:]):
        h2d, d2h = pinned_copy(s)
        print(f"baseline size={s} torch_peer_copy_gbs={peer_copy(s):.1f} nccl_sendrecv_gbs={nccl(s):.1f} "
              f"pinned_h2d_gbs={h2d:.1f} pinned_d2h_gbs={d2h:.1f}", flush=True)
