"""A plain TRL SFT script, as a user would write it instead of the pipeline (bench/pipeline_vs_trl.py).

    torchrun --nproc_per_node 2 -m bench.trl_sft ROWS.jsonl MODEL_DIR OUT.json STEPS BATCH MAX_LENGTH

TRL's best packing configuration for this job: BFD packing, ``padding_free`` (one flattened
row per step, no padding), completion-only loss; LoRA r16 / alpha 32 / dropout 0 on all
linear layers as the pipeline's default. Rows are conversational prompt/completion pairs, so
TRL applies the model's chat template as the pipeline does. The only addition to a plain
script is the count of trained tokens (labels that carry loss) for the tokens/s figure.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    rows_path, model_dir, out_path, steps, batch, max_length = sys.argv[1:7]
    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(1)  # one core per process, as the pipeline's workers
    rows = [json.loads(line) for line in open(rows_path, encoding="utf-8")]
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trained = [0]

    class Counting(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                trained[0] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = SFTConfig(
        output_dir=os.path.dirname(out_path) + "/trl-out", max_steps=int(steps), per_device_train_batch_size=int(batch),
        learning_rate=1e-3, lr_scheduler_type="linear", logging_steps=5, save_strategy="no",
        report_to=[], use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0, disable_tqdm=True, seed=0,
        # as the pipeline's trainer: no extra graph walk per step under DDP (BENCH_TRL_FIND_UNUSED=1: the
        # Trainer's default for this model, True, to measure what it costs; bench/NOTES.md)
        ddp_find_unused_parameters=os.environ.get("BENCH_TRL_FIND_UNUSED") == "1",
        packing=True, packing_strategy="bfd", padding_free=True, completion_only_loss=True, max_length=int(max_length),
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = Counting(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    start = time.perf_counter()
    trainer.train()
    runtime = time.perf_counter() - start
    total = torch.tensor([trained[0]])
    if dist.is_initialized():
        dist.all_reduce(total)
    trainer.save_model(os.path.dirname(out_path) + "/trl-adapter")
    if int(os.environ.get("RANK", "0")) == 0:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        json.dump({"runtime_s": runtime, "trained_tokens": int(total), "steps": trainer.state.global_step,
                   "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None},
                  open(out_path, "w"))


if __name__ == "__main__":
    main()
