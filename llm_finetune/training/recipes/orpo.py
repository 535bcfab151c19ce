"""Odds-ratio preference optimisation: SFT and preference tuning in one stage, with no reference model.

TRL's ``ORPOTrainer`` (``trl.experimental``) adds to the SFT loss on the chosen answer a term
that raises the odds of the chosen answer over the rejected one (weight ``train.orpo.beta``).
No reference model is held, so full-weight ORPO needs no second copy. Pairs arrive tokenized
by get_data (data/preference.py, as for DPO); ``tokenize_row`` lays them out as TRL's padding
collator takes them instead of tokenizing text again.
"""

from __future__ import annotations

import warnings

from llm_finetune.encoding import IGNORE_INDEX
from llm_finetune.training.trainer import all_reduce_sum
from llm_finetune.training.harness import StopAtNonFiniteLoss
from llm_finetune.training.recipes.dpo import PreferencePairs


def orpo_row(feature: dict) -> dict:
    """One pair as TRL's ORPO collator takes it: prompt, and prompt + answer with the answer's labels."""
    prompt, out = feature["prompt_ids"], {}
    out["prompt_input_ids"], out["prompt_attention_mask"] = prompt, [1] * len(prompt)
    for side in ("chosen", "rejected"):
        answer = feature[f"{side}_ids"]
        out[f"{side}_input_ids"] = prompt + answer
        out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
        out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
    return out


class ORPO(PreferencePairs):
    wraps_lora = True  # no reference model: the harness adds the adapters as for SFT

    def arguments(self, cfg):
        with warnings.catch_warnings():  # trl.experimental announces itself on import
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig

        return ORPOConfig, dict(beta=cfg.orpo.beta, max_length=1 << 30, disable_dropout=True)  # lengths: get_data's

    def trainer(self, *, model, args, train_dataset, eval_dataset, collator, tokenizer, peft_config, callbacks):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOTrainer

        class PairsORPOTrainer(StopAtNonFiniteLoss, ORPOTrainer):
            nonfinite_hint = "Lower train.learning_rate or train.orpo.beta, or check the pairs for empty answers"
            trained_tokens_local = 0

            def tokenize_row(self, feature, model=None):
                return orpo_row(feature)  # tokenized with our chat/named templates (data/preference.py)

            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
                if model.training:
                    self.trained_tokens_local += int((inputs["chosen_labels"] != IGNORE_INDEX).sum()
                                                     + (inputs["rejected_labels"] != IGNORE_INDEX).sum())
                return out

        return PairsORPOTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                processing_class=tokenizer, callbacks=callbacks)

    def label(self, cfg):
        return f"orpo ({cfg.weights}, beta {cfg.orpo.beta})"

    def trained_tokens(self, trainer) -> int:
        return int(all_reduce_sum(trainer.trained_tokens_local))


RECIPE = ORPO()
