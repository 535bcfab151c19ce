"""Load a GGUF file in llama.cpp (llama-cpp-python), the runtime users run exports in.

llama.cpp's CPU backend moves weights into "extra buffer types" (AMX / repacked layouts)
when the CPU advertises them. On virtual machines that advertise AMX without enabling it
(observed on this project's CI machine: q8_0 matmuls died with SIGILL) that crashes the
process, so extra buffer types are turned off: the plain CPU kernels compute the same
results. llama-cpp-python 0.3.36 exposes no argument for it, hence the default-params hook.
"""

from __future__ import annotations

from pathlib import Path


def _no_extra_buffer_types() -> None:
    import llama_cpp.llama_cpp as low

    if getattr(low.llama_model_default_params, "_no_extra_bufts", False):
        return
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params._no_extra_bufts = True
    low.llama_model_default_params = params


def load_gguf(path: str | Path, n_ctx: int = 2048, n_threads: int | None = None):
    """A ``llama_cpp.Llama`` with logits for every position (for scoring as well as generation).

    ``n_threads`` None: one thread per CPU the container may use (llm_finetune/cpus.py).
    llama-cpp-python's own default is half of ``os.cpu_count()``: one thread on a 2-core
    machine, and dozens inside a 2-CPU pod on a large node, throttled by its CPU quota.
    """
    import llama_cpp

    from llm_finetune.cpus import available_cpus

    _no_extra_buffer_types()
    n_threads = n_threads or available_cpus()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=n_threads,
                           n_threads_batch=n_threads, verbose=False, seed=0)
