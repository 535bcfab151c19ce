"""A background sampler of the machine's resources while training runs.

GPU utilisation and memory per device come from NVML (``pynvml``, package nvidia-ml-py)
when a GPU is visible; CPU and RAM from psutil always. Samples are plain dicts so they go
into the JSON summary and the Flyte deck as they are. It runs on global rank 0 only and
samples the whole node (all local ranks share the GPUs and RAM it sees).
"""

from __future__ import annotations

import threading
import time


def _nvml_handles():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no NVML library or no driver: CPU-only sampling
        return None, []


class ResourceSampler:
    """``with ResourceSampler(2.0) as s: ...`` then ``s.samples`` (one dict per period)."""

    def __init__(self, interval_s: float = 2.0):
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)
        self._start = 0.0

    def __enter__(self) -> "ResourceSampler":
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psutil

        nvml, handles = _nvml_handles()
        psutil.cpu_percent(interval=None)  # the first call only sets the reference point
        while True:
            sample = {
                "t_s": round(time.perf_counter() - self._start, 2),
                "cpu_percent": psutil.cpu_percent(interval=None),
                "ram_used_gb": round(psutil.virtual_memory().used / 2**30, 3),
            }
            for i, h in enumerate(handles):
                try:
                    sample[f"gpu{i}_util_percent"] = nvml.nvmlDeviceGetUtilizationRates(h).gpu
                    sample[f"gpu{i}_mem_used_gb"] = round(nvml.nvmlDeviceGetMemoryInfo(h).used / 2**30, 3)
                except Exception:
                    pass
            self.samples.append(sample)
            if self._stop.wait(self.interval_s):
                break


def memory_snapshot() -> dict:
    """Memory in use now, the profiler's RAM and per-GPU readings, for streaming next to the loss."""
    import psutil

    out = {"ram_used_gb": round(psutil.virtual_memory().used / 2**30, 3),
           "process_rss_gb": round(psutil.Process().memory_info().rss / 2**30, 3)}
    nvml, handles = _nvml_handles()
    for i, h in enumerate(handles):
        try:
            out[f"gpu{i}_mem_used_gb"] = round(nvml.nvmlDeviceGetMemoryInfo(h).used / 2**30, 3)
        except Exception:
            pass
    return out
