"""The GPU's SM clock and power while a block of work runs (bench.py --clocks), sampled by nvidia-smi in the
background. On an H200 the training step runs at the 700 W power cap (docs/bench.md, session 12): the clock,
and with it every kernel's time, then depends on how much power the work draws, so two variants with the same
kernels can differ in step time. Sampling the timed rounds and the profiled steps separately shows whether
they ran at the same clock."""

import shutil
import statistics
import subprocess

QUERY = "clocks.sm,power.draw,utilization.gpu"
BUSY = 90  # % utilization: samples below it caught the GPU between rounds (warm-up, start, stop)


def gpu_id(device):
    """nvidia-smi's -i for a torch CUDA device: its UUID, which names the same GPU under any
    CUDA_VISIBLE_DEVICES (an index would not). None if torch does not give one."""
    import torch

    uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "") or "")
    if not uuid:
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else "GPU-" + uuid


def parse(text):
    """nvidia-smi's csv,noheader,nounits lines of QUERY -> [(sm MHz, W, util %)]; lines that are not three
    numbers ([N/A], warnings) are skipped."""
    out = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            out.append((float(parts[0]), float(parts[1]), float(parts[2])))
        except ValueError:
            continue
    return out


def summary(samples):
    """{'sm_mhz', 'power_w': medians over the busy samples, 'n': how many} or None without any."""
    busy = [s for s in samples if s[2] >= BUSY]
    if not busy:
        return None
    return {"sm_mhz": statistics.median(s[0] for s in busy), "power_w": statistics.median(s[1] for s in busy),
            "n": len(busy)}


class Sampler:
    """with sampler: ...  runs `nvidia-smi -i GPU --query-gpu=QUERY -lms period_ms` for the block and adds its
    samples to sampler.samples (several blocks accumulate). gpu: nvidia-smi's -i (gpu_id(device)); None, or no
    nvidia-smi on the PATH: a sampler that records nothing (sampler.enabled is False)."""

    def __init__(self, gpu, period_ms=100):
        smi = shutil.which("nvidia-smi")
        self.cmd = None if (gpu is None or smi is None) else [
            smi, "-i", gpu, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits", "-lms", str(period_ms)]
        self.enabled = self.cmd is not None
        self.samples, self.proc = [], None

    def __enter__(self):
        if self.cmd:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                out, _ = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
            self.samples += parse(out)
            self.proc = None
        return False
