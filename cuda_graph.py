"""
A whole training step as one CUDA graph (train.py --cuda-graph, bench.py --cuda-graph).

Why: a compiled GPT-2 124M step launches about a thousand kernels. Where the host launches them
slower than the GPU runs them, the GPU waits, by an amount that depends on the host (measurements
in docs/bench.md). Captured once, the step is replayed with one launch: its time is the GPU's, on
any host.

The rules of a captured step (see torch.cuda.graphs):
  * nothing in it may synchronize the host (no .item(), no data-dependent Python branches);
  * it works on fixed tensors: copy each new batch into the same input buffers, read results
    (loss, grad norm) out of buffers that the step fills in place;
  * the optimizer must be capturable, with its learning rate a device tensor (lr.fill_ between
    replays), and the grads must not be reset (the replay's first backward overwrites them);
  * Python-side decisions are frozen at capture: anything that changes between steps has to
    live in a tensor (ra_headsel's routing is a buffer that set_step updates on the device);
  * the first steps run normally, on a side stream (run_on_side_stream), so that compilation,
    autotuning and lazy allocations happen before the capture.
Under DDP (train.py --cuda-graph under torchrun) the gradients' all-reduce is captured with the rest:
NCCL collectives can be recorded, and every rank replays the same graph, so the collectives stay
matched. DDP's own rules: build DDP on the stream that then warms up and captures the step (autograd
runs each gradient's accumulation on the stream its parameter's hooks were made on), and warm up for
at least 11 steps (DDP times its first 10 iterations with events the host waits for).
graphed() applies these to a training step: trainer/step.py's launcher, for train.py and bench.py.
"""

import torch


def run_on_side_stream(fn, side=None):
    """fn() on a side stream (a new one, or `side`), ordered after the current stream's work and before its
    next."""
    side, main = side or torch.cuda.Stream(), torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn()
    main.wait_stream(side)
    return out


class CaptureError(RuntimeError):
    """The capture failed. It can leave the CUDA RNG unusable for the rest of the process (bench.py then
    captures nothing more and builds its models on the CPU)."""


def capture(fn, pool=None, stream=None):
    """Record fn's kernels as one torch.cuda.CUDAGraph and return it; nothing runs until .replay().
    pool: a torch.cuda.graph_pool_handle() shared by graphs that are never replayed concurrently and stay
    alive together (capturing into a pool whose graphs were all freed trips an allocator assert).
    stream: the stream to capture on (default: torch's own side stream). Raises CaptureError."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            fn()
    except RuntimeError as e:
        raise CaptureError(
            f"capturing the training step as a CUDA graph failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}). "
            "Usually something in the step synchronizes the host (.item(), a data-dependent branch). Run without "
            "--cuda-graph.") from e
    return graph


def graphed(step, optimizer, warmup=3, pool=None, stream=None):
    """step() (one training step, ending in optimizer.step()) as a callable for every training step:
    the first `warmup` calls run it on a side stream (`stream` if given, which the capture then uses too)
    and then reset the grads to None, so that the capture allocates them in the graph's memory; the next
    call records it and replays it, and every later call replays it. Between calls, refill the step's
    inputs in place. run.release() frees the graph: under DDP call it before destroy_process_group, which
    otherwise hangs in NCCL while a graph holds captured collectives (pytorch/pytorch#115388)."""
    graph, calls = None, 0

    def run():
        nonlocal graph, calls
        if calls < warmup:
            run_on_side_stream(step, stream)
            optimizer.zero_grad(set_to_none=True)
        else:
            if graph is None:
                graph = capture(step, pool, stream)  # records the kernels; runs nothing
            graph.replay()
        calls += 1

    def release():
        nonlocal graph
        if graph is not None:
            torch.cuda.synchronize()
            graph.reset()
            graph = None

    run.release = release
    return run
