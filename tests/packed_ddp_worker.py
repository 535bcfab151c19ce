"""torchrun worker: packed logits under DDP (gloo) equal per-example logits.

    python -m torch.distributed.run --nproc_per_node 2 tests/packed_ddp_worker.py spec.json

Production pieces only: get_data's packed token rows (``prepare``), the train task's
dataset/collator (the SFT recipe's ``examples`` and ``collator``), its model loader (``training.weights.load_model``: LoRA via PEFT),
the model wrapped in ``DistributedDataParallel`` as the Trainer wraps it on 2 processes,
``model_inputs`` and ``FineTuneTrainer.compute_loss`` on the wrapped model. The reference
is each example alone through the unwrapped model with a plain forward and
``F.cross_entropy``. Each rank writes its largest differences to ``out_dir/rank<r>.json``.

spec: model_dir, out_dir, attn (attention implementation the model is loaded with).
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from llm_finetune.training.collate import model_inputs
from llm_finetune.config import DataConfig, TrainConfig
from llm_finetune.data.prepare import prepare
from llm_finetune.model import load_tokenizer
from llm_finetune.training.recipes.sft import RECIPE
from llm_finetune.training.weights import load_model
from llm_finetune.training.trainer import FineTuneTrainer


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    with tempfile.TemporaryDirectory() as tmp:  # initialises the gloo group as the train task does
        args = TrainingArguments(output_dir=tmp, use_cpu=True, ddp_backend="gloo", report_to=[],
                                 remove_unused_columns=False, label_names=["labels"])
    import torch.distributed as dist

    assert dist.is_initialized() and dist.get_world_size() == 2
    rank = dist.get_rank()
    tok = load_tokenizer(spec["model_dir"])
    data_cfg = DataConfig(max_length=160, packing=True, eval_fraction=0.1)
    prepared = prepare(data_cfg, tok)
    examples = RECIPE.examples(tok, prepared.train_tokens, data_cfg)
    collator = RECIPE.collator(tok, examples, data_cfg)
    assert collator.packed
    rows = examples[rank * 2 : rank * 2 + 2]  # each rank its own 2 packed rows
    assert all(len(r["seq_lens"]) >= 2 for r in rows), [r["seq_lens"] for r in rows]

    torch.manual_seed(0)
    model = load_model(Path(spec["model_dir"]), TrainConfig(weights="lora"), bf16=False, attn_implementation=spec["attn"])[0]
    for n, p in model.named_parameters():  # non-zero adapters, so LoRA changes the logits
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()  # no dropout: packed and per-example passes must see the same function
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    trainer = FineTuneTrainer(model=model, args=args, data_collator=collator)

    batch = collator(rows)
    with torch.no_grad():  # flex attention has no backward on CPU
        packed = ddp(**model_inputs(ddp, batch)).logits
        loss = trainer.compute_loss(ddp, batch)
        worst, nll, n_trained = 0.0, torch.zeros((), dtype=torch.float64), 0
        for r, row in enumerate(rows):
            pos = 0
            for n in row["seq_lens"]:
                ids = torch.tensor([row["input_ids"][pos : pos + n]])
                ref = model(input_ids=ids).logits[0]  # the example alone, unwrapped, no packing
                worst = max(worst, float((packed[r, pos : pos + n] - ref).abs().max()))
                labels = torch.tensor(row["labels"][pos : pos + n])
                nll += F.cross_entropy(ref[:-1], labels[1:], ignore_index=-100, reduction="sum").double()
                n_trained += int((labels[1:] != -100).sum())
                pos += n
    out = {"rank": rank, "max_logit_diff": worst, "loss": float(loss), "ref_loss": float(nll / n_trained),
           "seq_lens": [r["seq_lens"] for r in rows]}
    Path(spec["out_dir"], f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
