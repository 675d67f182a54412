"""cuda_graph.graphed's schedule on CPU, with the CUDA parts replaced by recorders: warm-up calls run
the step and reset the grads, then ONE capture, then a replay on every call. (The graph itself is
tested on a GPU in tests/test_train.py::test_cuda_graph_replays_the_same_steps.)"""

import contextlib

import pytest
import torch

import cuda_graph


def test_graphed_warms_up_then_captures_once_then_replays(monkeypatch):
    log = []

    class FakeGraph:
        def replay(self):
            log.append("replay")

    def fake_capture(fn, pool=None, stream=None):
        log.append(("capture", pool, stream))
        return FakeGraph()

    monkeypatch.setattr(cuda_graph, "run_on_side_stream", lambda fn, side=None: (log.append(("side", side)), fn()))
    monkeypatch.setattr(cuda_graph, "capture", fake_capture)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)

    def step():
        log.append("step")
        w.sum().backward()
        opt.step()

    run = cuda_graph.graphed(step, opt, warmup=2, pool="P", stream="S")
    for i in range(2):
        run()
        assert w.grad is None  # reset to None after each warm-up: the capture allocates the grads
    run()
    run()
    # the warm-ups and the capture on the one stream given (DDP's rule: the stream DDP was built on)
    assert log == [("side", "S"), "step", ("side", "S"), "step", ("capture", "P", "S"), "replay", "replay"]
    assert torch.allclose(w.detach(), torch.full((3,), 0.8))  # only the warm-up steps ran for real


def test_release_frees_the_graph(monkeypatch):
    """release() resets the recorded graph once (before destroy_process_group under DDP); a run never captured
    has nothing to free."""
    log = []

    class FakeGraph:
        def replay(self):
            log.append("replay")

        def reset(self):
            log.append("reset")

    monkeypatch.setattr(cuda_graph, "run_on_side_stream", lambda fn, side=None: fn())
    monkeypatch.setattr(cuda_graph, "capture", lambda fn, pool=None, stream=None: FakeGraph())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    run = cuda_graph.graphed(lambda: None, opt, warmup=1)
    run.release()
    assert log == []  # nothing recorded yet
    run()
    run()
    run.release()
    run.release()
    assert log == ["replay", "sync", "reset"]


def test_failed_capture_raises_capture_error(monkeypatch):
    """bench.py tells a failed capture (which leaves the CUDA RNG unusable) from other errors by its type;
    train.py's user sees the same message as before (a RuntimeError)."""
    @contextlib.contextmanager
    def failing_graph(graph, pool=None, stream=None):
        raise RuntimeError("it->second->use_count > 0 INTERNAL ASSERT FAILED")
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", failing_graph)
    with pytest.raises(cuda_graph.CaptureError, match=r"capturing the training step as a CUDA graph failed \(RuntimeError: "
                       r"it->second->use_count > 0 INTERNAL ASSERT FAILED\)\. .*Run without --cuda-graph"):
        cuda_graph.capture(lambda: None)
    assert issubclass(cuda_graph.CaptureError, RuntimeError)
