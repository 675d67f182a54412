"""Where a training step's GPU time goes (bench.py --profile): kernel time per category from torch.profiler."""

import torch


# kernel name -> category, first match wins (cuBLAS/CUTLASS GEMMs, SDPA's and our attention kernels,
# the optimizer's multi-tensor kernels, then torch.compile's generated Triton kernels)
KERNEL_CATEGORIES = [
    ("attention", ("flash", "fmha", "cudnn", "attn", "attention", "_ctr_")),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "wgmma", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("compiled", ("triton_",)),
]


def kernel_category(name):
    low = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def profile_kernels(fn, steps):
    """GPU kernel time per call of fn, from torch.profiler over `steps` calls: {category: ms}, the top
    kernels [(ms per call, launches per call, name)] (and all of them), and the kernel-time total. The step's own
    ms minus that total is time the GPU sat idle (waiting on the host)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    cats, kernels = {}, []
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us <= 0:
            continue
        ms = us / 1e3 / steps
        cats[kernel_category(e.key)] = cats.get(kernel_category(e.key), 0.0) + ms
        kernels.append((ms, e.count / steps, e.key))
    kernels.sort(reverse=True)
    # every kernel goes into the JSON (so two variants can be diffed by name); tables print the top
    return dict(categories=cats, top=kernels[:12], kernels=kernels, total_ms=sum(cats.values()))
