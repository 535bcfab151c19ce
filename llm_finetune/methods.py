"""The method registry: the one place a training objective is chosen.

``train.method`` names the objective (what the loss rewards), ``train.weights`` which weights
train (``lora``, ``qlora``, ``full``). Each objective is one ``Method`` entry here, saying what
the rest of the pipeline must know about it without importing any trainer:

- ``data``: the shape of rows get_data prepares (``sft``: prompt/completion, chat or text;
  ``preference``: prompt/chosen/rejected pairs; ``unpaired``: prompt/completion with a
  boolean label), which config validation checks against ``data.format``;
- ``reference_copy``: full-weight training holds a frozen copy of the starting model
  (LoRA uses the adapter-disabled base instead); the memory check and the pod's disk count it;
- ``sequences_per_row``: sequences each row sends through the backward (pairs: two), for
  the memory estimate that fits ``data.max_length``;
- ``can_pack``: whether rows may be packed into shared sequences;
- ``deck_metrics``: the trainer's logged metrics the train deck plots beside the loss;
- ``recipe``: the module that builds the trainer (``training/recipes/``), imported only when
  a run trains.

Adding a method is one recipe file and one entry in ``METHODS`` (docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass

WEIGHTS = ("lora", "qlora", "full")
DATA_FORMATS = {  # data.format values each kind of rows accepts (auto: detected from the columns)
    "sft": ("auto", "alpaca", "dolly", "chat", "text"),
    "preference": ("auto", "preference"),
    "unpaired": ("auto", "unpaired"),
}


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    data: str  # a key of DATA_FORMATS
    recipe: str  # module path of the recipe (training/recipes/)
    reference_copy: bool = False
    sequences_per_row: int = 1
    can_pack: bool = False
    deck_metrics: tuple[str, ...] = ()
    deck_note: str = ""


_REWARDS = ("rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies")
_REWARD_NOTE = ("rewards = beta x (policy - reference) log-probability of an answer; accuracy = share of pairs whose "
                "chosen reward beats the rejected one; margin = chosen - rejected reward. Rising margins and accuracy "
                "mean the policy is learning the preferences.")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", "supervised fine-tuning or continued pre-training (next-token loss on the answers or the text)",
           data="sft", recipe="llm_finetune.training.recipes.sft", can_pack=True),
    Method("dpo", "direct preference optimisation on chosen/rejected pairs (TRL's DPOTrainer and its loss variants)",
           data="preference", recipe="llm_finetune.training.recipes.dpo", reference_copy=True, sequences_per_row=2,
           deck_metrics=_REWARDS, deck_note=_REWARD_NOTE),
    Method("kto", "Kahneman-Tversky optimisation on single answers labelled desirable or not (thumbs up/down data)",
           data="unpaired", recipe="llm_finetune.training.recipes.kto", reference_copy=True,
           deck_metrics=("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"),
           deck_note="rewards = beta x (policy - reference) log-probability of the desirable (chosen) and undesirable "
                     "(rejected) answers of a batch; margin = their difference; kl = the policy's estimated divergence "
                     "from the reference on mismatched prompt/answer pairs (clamped at 0). Rising desirable rewards "
                     "over undesirable ones mean the policy is learning the ratings."),
    Method("orpo", "odds-ratio preference optimisation: SFT and preference in one stage, no reference model",
           data="preference", recipe="llm_finetune.training.recipes.orpo", sequences_per_row=2,
           deck_metrics=("rewards/margins", "rewards/accuracies", "log_odds_ratio", "nll_loss"),
           deck_note="nll_loss = the SFT loss on the chosen answers; log_odds_ratio = log odds of chosen over rejected; "
                     "rewards = beta x average log-probability; accuracy = share of pairs with the chosen answer ahead."),
)}

# train.method's old spelling: the weights alone meant supervised fine-tuning of those weights
DEPRECATED_METHODS = {"lora": "lora", "qlora": "qlora", "full": "full"}


def method_spec(name: str) -> Method:
    """The registry entry for ``train.method``; an unknown name lists the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"train.method: {name!r} is not one of {', '.join(METHODS)}") from None


def load_recipe(name: str):
    """The recipe module of ``name`` (imported here, when a run trains)."""
    import importlib

    return importlib.import_module(method_spec(name).recipe)
