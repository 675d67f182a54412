"""Timing for bench.py: inputs drawn on the CPU, median ms over CUDA events (wall clock on CPU),
CUDA-graph replays of a call, and freeing memory between rows."""

import gc
import itertools
import statistics
import time

import torch


INPUT_GEN = torch.Generator().manual_seed(0)  # CPU generator for every benchmark input


def randn(*shape, device, dtype, requires_grad=False):
    """Random inputs drawn on the CPU and copied over: the CUDA RNG is left alone, since a CUDA-graph
    capture that fails (see time_graph_ms) leaves it unusable for the rest of the process."""
    return torch.randn(*shape, generator=INPUT_GEN).to(device=device, dtype=dtype).requires_grad_(requires_grad)


def cycle(items):
    it = itertools.cycle(items)
    return lambda: next(it)


def free_memory(device):
    if device.type == "cuda":  # on CPU the refcounts free it; a gc pass per row only costs time
        gc.collect()


def time_ms(fn, warmup, reps, device):
    """Median ms of `reps` calls after `warmup` calls: CUDA events on a GPU, wall clock on CPU."""
    for _ in range(max(warmup, 1)):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class HostSync(RuntimeError):
    """The timed call synchronizes the host with the GPU, so it cannot be a CUDA graph."""


def time_graph_ms(fn, n_graphs, warmup, reps):
    """Median ms of `reps` CUDA-graph replays of fn. One graph per input set (fn rotates its inputs, so
    n_graphs consecutive captures cover them all), replayed in turn. A replay launches the whole call
    at once, so the time is the GPU's: timed eagerly, a call made of many short kernels measures how
    fast Python can launch them. Raises what the capture raises (e.g. a host sync inside fn)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, lazy init, allocator) off the capture
        for _ in range(max(warmup, 2)):
            fn()
        # a host sync cannot be captured; find it here, where failing costs nothing
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as e:
            raise HostSync(" ".join(str(e).split())[:160]) from None
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    pool, graphs = torch.cuda.graph_pool_handle(), []
    for _ in range(n_graphs):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            fn()
        graphs.append(g)
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        start.record()
        graphs[i % n_graphs].replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)
