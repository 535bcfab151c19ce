"""The train task as the pipeline runs it, against a plain TRL script, on the same rows.

    .venv/bin/python -m bench.pipeline_vs_trl [--rows 800 --steps 20 --batch 2]

``make bench`` compares the training loops inside one process. This compares whole jobs the
way users run them on a 2-core machine: 2 gloo processes with one core each, LoRA (r16,
alpha 32, dropout 0, all linear layers), examples packed into 512-token rows, completion-only
loss, the same rows, rows per step, learning rate and steps, no validation.

- ours: the Flyte task ``train_elastic`` executed locally, as ``pyflyte run`` executes it:
  flytekit's Elastic plugin starts the worker processes, which read the token rows
  ``get_data`` wrote (packed by the pipeline), train with ``FineTuneTrainer``, merge the
  adapter and save the model and adapter;
- trl: ``bench/trl_sft.py`` under ``torchrun``: ``SFTTrainer`` with BFD packing,
  ``padding_free`` and completion-only loss on the same rows as prompt/completion
  conversations, saving the adapter.

Reported per system: wall time from the call to the saved model (process start-up, model
load and save included), the training loop's time, trained tokens (labels that carry loss,
all ranks) and trained tokens/s over the loop. Results: bench/results/pipeline_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLYTE_LOCAL_CACHE_ENABLED", "false")  # measure training, not the local cache

from bench.common import embedded_model_dir, environment, print_table, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=800)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2, help="packed rows per process per step")
    ap.add_argument("--max-length", type=int, default=512)
    a = ap.parse_args()

    import pandas as pd
    from flytekit.types.directory import FlyteDirectory

    from bench.alpaca_like import write_jsonl
    from llm_finetune.config import DataConfig, TrainConfig, TrainOps
    from tasks.data import get_data
    from tasks.train import train_elastic

    model_dir = embedded_model_dir()
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-vs-trl-"))
    src = write_jsonl(tmp / "rows.jsonl", a.rows)
    data = DataConfig(source=str(src), packing=True, max_length=a.max_length, validation_fraction=0.02, test_fraction=0.02)
    train = TrainConfig(max_steps=a.steps, per_device_batch_size=a.batch, eval_steps=0, save_steps=0, learning_rate=1e-3)
    base = FlyteDirectory(str(model_dir))
    splits = get_data(data=data, base_model=base, train=train, train_ops=TrainOps())

    canonical = splits.train.open(pd.DataFrame).all()  # the rows get_data packed into train_tokens
    trl_rows = tmp / "train_rows.jsonl"
    trl_rows.write_text("".join(json.dumps({"messages": json.loads(m)}) + "\n" for m in canonical["messages"]), encoding="utf-8")

    results = []
    start = time.perf_counter()
    ours = train_elastic(base_model=base, train_data=splits.train_tokens, eval_data=splits.validation,
                         data=data, train=train, train_ops=TrainOps())
    results.append({"system": "ours (train task)", "wall_s": time.perf_counter() - start, "loop_s": ours.runtime_s,
                    "steps": ours.steps, "trained_tokens": ours.trained_tokens, "final_loss": ours.final_loss})

    out = tmp / "trl.json"
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "bench.trl_sft",
                    str(trl_rows), str(model_dir), str(out), str(a.steps), str(a.batch), str(a.max_length)], check=True)
    trl = json.loads(out.read_text())
    results.append({"system": "trl (plain script)", "wall_s": time.perf_counter() - start, "loop_s": trl["runtime_s"],
                    "steps": trl["steps"], "trained_tokens": trl["trained_tokens"], "final_loss": trl["final_loss"]})
    for r in results:
        r["trained_tok_s"] = r["trained_tokens"] / r["loop_s"]
    print_table(results, ["system", "wall_s", "loop_s", "steps", "trained_tokens", "trained_tok_s", "final_loss"])
    ratio = results[0]["trained_tok_s"] / results[1]["trained_tok_s"]
    print(f"ours / trl trained tokens/s: {ratio:.2f}x; wall {results[0]['wall_s']:.0f} s vs {results[1]['wall_s']:.0f} s")
    write_result("pipeline_vs_trl", {
        **environment(), "rows": a.rows, "train_rows": len(canonical), "steps": a.steps, "rows_per_step_per_process": a.batch,
        "max_length": a.max_length, "processes": 2, "results": results, "ours_over_trl_trained_tok_s": ratio,
    })
    for folder in (tmp, Path(ours.model.path).parent):  # rows, TRL's output, our train dir: ~0.7 GB
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
