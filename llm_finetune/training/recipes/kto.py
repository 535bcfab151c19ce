"""Kahneman-Tversky optimisation: single answers labelled desirable or not (thumbs up / down data).

TRL's ``KTOTrainer`` computes the loss, the reference log-probabilities (LoRA: the
adapter-disabled base; full weights: a frozen copy) and the KL estimate from mismatched
prompt/answer pairs of a batch. Rows arrive tokenized by get_data with the same templates
as SFT (data/unpaired.py), in a seeded shuffled order TRL reads sequentially.
"""

from __future__ import annotations

from llm_finetune.config import micro_batch
from llm_finetune.data.unpaired import UNPAIRED_COLUMNS, unpaired_examples, unpaired_sample_prompts
from llm_finetune.errors import ConfigError
from llm_finetune.training.harness import Recipe, StopAtNonFiniteLoss


class KTO(Recipe):
    wraps_lora = False  # TRL wraps the model: its reference is the adapter-disabled base

    def examples(self, tokenizer, frame, data_cfg):
        from datasets import Dataset

        return Dataset.from_list(unpaired_examples(tokenizer, frame, data_cfg))

    def sample_prompts(self, tokenizer, frame, data_cfg, n):
        return unpaired_sample_prompts(tokenizer, frame, data_cfg, n)

    def arguments(self, cfg):
        from trl import KTOConfig

        if cfg.kto.loss_type == "kto" and micro_batch(cfg) < 2:
            raise ConfigError([f"train.per_device_batch_size: KTO estimates its KL term from the other rows of a "
                               f"micro-batch and needs at least 2, got {micro_batch(cfg)}; raise it (and lower "
                               "train.gradient_accumulation_steps), or set train.kto.loss_type: apo_zero_unpaired"])
        return KTOConfig, dict(
            beta=cfg.kto.beta,
            loss_type=cfg.kto.loss_type,
            desirable_weight=cfg.kto.desirable_weight,
            undesirable_weight=cfg.kto.undesirable_weight,
            max_length=None,  # lengths were validated by get_data
            precompute_ref_log_probs=False,
            disable_dropout=True,
        )

    def trainer(self, *, model, args, train_dataset, eval_dataset, collator, tokenizer, peft_config, callbacks):
        from trl import KTOTrainer

        class RowsKTOTrainer(StopAtNonFiniteLoss, KTOTrainer):
            nonfinite_hint = "Lower train.learning_rate or raise train.kto.beta, or check the rows for empty answers"

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                if not set(UNPAIRED_COLUMNS) <= set(dataset.column_names):
                    return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
                if not self.calculate_KL:  # tokenized with our chat/named templates (data/unpaired.py)
                    return dataset

                def mismatched(rows):  # TRL's KL rows: each prompt with its batch neighbour's answer
                    rows["KL_completion_ids"] = [rows["completion_ids"][-1]] + rows["completion_ids"][:-1]
                    return rows

                return dataset.map(mismatched, batched=True, batch_size=args.per_device_train_batch_size)

        return RowsKTOTrainer(model=model, ref_model=None, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)

    def label(self, cfg):
        return f"kto ({cfg.weights}, loss {cfg.kto.loss_type}, beta {cfg.kto.beta})"


RECIPE = KTO()
