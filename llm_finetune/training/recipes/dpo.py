"""Direct preference optimisation, and TRL's loss variants (IPO, hinge, robust, APO, ...), on chosen/rejected pairs.

TRL's ``DPOTrainer`` computes the loss, the reference log-probabilities and the reward metrics.
The reference (``train.dpo.reference: auto``) is the adapter-disabled policy for LoRA/QLoRA
(TRL wraps the model with the LoRA config itself, so no second copy is loaded) and a frozen copy
of the starting model for full weights (under ZeRO wrapped in an inference engine, sharded like
the policy). Pairs arrive tokenized by get_data with the same templates as SFT
(data/preference.py), so TRL's own tokenization is skipped.
"""

from __future__ import annotations

from llm_finetune.data.preference import PAIR_COLUMNS, pair_examples, pair_sample_prompts
from llm_finetune.training.harness import Recipe, StopAtNonFiniteLoss


class PreferencePairs(Recipe):
    """Pairs as TRL's preference trainers take them (shared by DPO and ORPO)."""

    wraps_lora = False  # the trainer wraps the model: its reference is the adapter-disabled base

    def examples(self, tokenizer, frame, data_cfg):
        from datasets import Dataset

        return Dataset.from_list(pair_examples(tokenizer, frame, data_cfg))

    def sample_prompts(self, tokenizer, frame, data_cfg, n):
        return pair_sample_prompts(tokenizer, frame, data_cfg, n)


class DPO(PreferencePairs):
    def arguments(self, cfg):
        from trl import DPOConfig

        return DPOConfig, dict(
            beta=cfg.dpo.beta,
            loss_type=[cfg.dpo.loss_type],
            label_smoothing=cfg.dpo.label_smoothing,
            max_length=None,  # lengths were validated (or truncated) by get_data
            precompute_ref_log_probs=False,
            disable_dropout=True,
        )

    def trainer(self, *, model, args, train_dataset, eval_dataset, collator, tokenizer, peft_config, callbacks):
        from trl import DPOTrainer

        class PairsDPOTrainer(StopAtNonFiniteLoss, DPOTrainer):
            nonfinite_hint = "Lower train.learning_rate or raise train.dpo.beta, or check the pairs for empty answers"

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                if set(PAIR_COLUMNS) <= set(dataset.column_names):
                    return dataset  # tokenized with our chat/named templates (data/preference.py)
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        return PairsDPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                               processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)

    def label(self, cfg):
        return f"dpo ({cfg.weights}, loss {cfg.dpo.loss_type}, beta {cfg.dpo.beta})"


RECIPE = DPO()
