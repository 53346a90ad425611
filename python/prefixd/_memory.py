"""Memory of tensors and arrays as (address, bytes, device) triples for the extension.

torch tensors (CUDA or CPU) and anything with the NumPy array interface are accepted; they must
be C-contiguous, and writable where data is written into them. device is the CUDA ordinal, or -1
for host memory.
"""

import sys


def _is_torch(obj):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def describe(obj, *, writable=False, what="tensor"):
    """(address, nbytes, device) of a contiguous tensor or array; raises TypeError/ValueError."""
    if _is_torch(obj):
        if not obj.is_contiguous():
            raise ValueError(f"{what} is not contiguous (call .contiguous() first)")
        n = obj.numel() * obj.element_size()
        if n == 0:
            raise ValueError(f"{what} is empty")
        dev = obj.device
        if dev.type == "cuda":
            device = dev.index if dev.index is not None else 0
        elif dev.type == "cpu":
            device = -1
        else:
            raise ValueError(f"{what} is on {dev}; prefixd moves CUDA and CPU tensors")
        return obj.data_ptr(), n, device
    ai = getattr(obj, "__array_interface__", None)
    if ai is not None:
        ptr, readonly = ai["data"]
        if writable and readonly:
            raise ValueError(f"{what} is read-only")
        itemsize = int(ai["typestr"][2:])
        n = itemsize
        for d in ai["shape"]:
            n *= d
        strides = ai.get("strides")
        if strides is not None:
            expect, ok = itemsize, True
            for d, s in zip(reversed(ai["shape"]), reversed(strides)):
                if d > 1 and s != expect:
                    ok = False
                expect *= d
            if not ok:
                raise ValueError(f"{what} is not C-contiguous")
        if n == 0:
            raise ValueError(f"{what} is empty")
        return ptr, n, -1
    raise TypeError(f"{what}: expected a torch.Tensor or a NumPy array, got {type(obj).__name__}")


def shape_and_itemsize(obj):
    """(shape as a list, bytes per element) of a torch tensor or NumPy array."""
    if _is_torch(obj):
        return list(obj.shape), obj.element_size()
    ai = getattr(obj, "__array_interface__", None)
    if ai is not None:
        return list(ai["shape"]), int(ai["typestr"][2:])
    raise TypeError(f"expected a torch.Tensor or a NumPy array, got {type(obj).__name__}")


def split(desc, parts, what="tensor"):
    """Splits one (address, nbytes, device) evenly into `parts` pieces."""
    ptr, n, dev = desc
    if parts <= 0:
        return []
    if n % parts:
        raise ValueError(f"{what} of {n} bytes does not split evenly over {parts} chunks")
    size = n // parts
    return [(ptr + i * size, size, dev) for i in range(parts)]


def synchronize(descs):
    """Waits for the current CUDA stream of each device involved, so that data the caller's
    kernels wrote is complete before another engine reads it."""
    devices = {d for _, _, d in descs if d >= 0}
    if not devices:
        return
    torch = sys.modules.get("torch")
    if torch is None:
        return
    for d in devices:
        torch.cuda.current_stream(d).synchronize()
