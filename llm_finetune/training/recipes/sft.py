"""Supervised fine-tuning and continued pre-training: next-token loss on the answers (or the whole text).

Rows are get_data's token rows (packed or not, with ``seq_lens``); the trainer is ours
(trainer.py: the loss over labelled positions only, normalised by the trained tokens across
gradient accumulation and ranks, stopping at the first non-finite loss).
"""

from __future__ import annotations

import json

from llm_finetune.training.collate import TokenCollator
from llm_finetune.encoding import encode_frame, prompt_and_reference
from llm_finetune.training.trainer import FineTuneTrainer, all_reduce_sum
from llm_finetune.training.harness import Recipe


class SFT(Recipe):
    """``examples`` and ``collator`` are the one place rows become SFT training examples and batches."""

    def examples(self, tokenizer, frame, data_cfg):
        return encode_frame(tokenizer, frame, data_cfg)

    def collator(self, tokenizer, examples, data_cfg):
        return TokenCollator(tokenizer.pad_token_id, packed=bool(data_cfg.packing and examples and "seq_lens" in examples[0]))

    def packed(self, collator) -> bool:
        return collator.packed

    def sample_prompts(self, tokenizer, frame, data_cfg, n):
        """(prompt, reference) for the first ``n`` held-out rows; raw text rows give their first 32 tokens."""
        out = []
        for row in frame.head(n).to_dict(orient="records"):
            if row.get("messages"):
                out.append(prompt_and_reference(tokenizer, json.loads(row["messages"]), data_cfg.prompt_template))
            else:
                ids = tokenizer(row.get("text", ""), add_special_tokens=False)["input_ids"]
                out.append((tokenizer.decode(ids[:32]), tokenizer.decode(ids[32:64])))
        return out

    def arguments(self, cfg):
        from transformers import TrainingArguments

        return TrainingArguments, {"label_names": ["labels"]}

    def trainer(self, *, model, args, train_dataset, eval_dataset, collator, tokenizer, peft_config, callbacks):
        return FineTuneTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                               data_collator=collator, callbacks=callbacks)

    def trained_tokens(self, trainer) -> int:
        return int(all_reduce_sum(trainer.trained_tokens_local))


RECIPE = SFT()
