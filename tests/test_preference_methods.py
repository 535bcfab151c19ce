"""KTO and ORPO through the one harness, on the tiny random Llama (a minute per run on CPU).

Each method is a recipe (llm_finetune/training/recipes/) behind the registry; these tests check what
users rely on, measured from outside the trainer: after training, the model gives the desirable (KTO)
or chosen (ORPO) held-out answers more probability relative to the undesirable / rejected ones than
the starting model did (log-probabilities from a plain forward pass here, not TRL's own metrics);
the reference model is loaded exactly when the method needs one.
"""

import math

import pytest
import torch

from llm_finetune.config import EMBEDDED_UNPAIRED_DATASET, DataConfig, PreferenceDataConfig, TrainConfig, from_dict
from llm_finetune.data.preference import encode_pairs
from llm_finetune.data.prepare import prepare
from llm_finetune.data.unpaired import encode_rows
from llm_finetune.training.harness import train
from tests.tiny import save_tiny_llama

UNPAIRED = DataConfig(source=EMBEDDED_UNPAIRED_DATASET, format="unpaired", max_length=128)
PAIRS = PreferenceDataConfig(max_length=128)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


def _cfg(method: str, weights: str, **kw) -> TrainConfig:
    base = {"method": method, "weights": weights, "max_steps": 24, "per_device_batch_size": 8, "learning_rate": 2e-3,
            "logging_steps": 4, "warmup_ratio": 0.0, "save_steps": 0, "eval_steps": 0, "lora": {"r": 8}}
    return from_dict(TrainConfig, {**base, **kw})


def answer_logprob(model_dir, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """log p(answer | prompt), summed over the answer's tokens: an independent forward pass."""
    from transformers import AutoModelForCausalLM

    model = _models.setdefault(str(model_dir), AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval())
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return float(logp[len(prompt_ids) - 1 :].gather(1, targets[len(prompt_ids) - 1 :, None]).sum())


_models: dict = {}


@pytest.fixture
def reference_loads(monkeypatch):
    """Counts TRL's loads of a separate reference model in the KTO trainer (the real function still runs)."""
    import trl.trainer.kto_trainer as kto

    calls = []
    real = kto.create_model_from_path

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(kto, "create_model_from_path", spy)
    return calls


@pytest.mark.slow
def test_kto_learns_to_prefer_the_desirable_answers(tiny_dir, tokenizer, reference_loads, tmp_path):
    data = prepare(UNPAIRED, tokenizer, kind="unpaired")
    out = train(tiny_dir, data.train_tokens, UNPAIRED, _cfg("kto", "full"), tmp_path / "out")
    assert out.summary.method == "kto (full, loss kto, beta 0.1)" and out.summary.steps == 24
    assert len(reference_loads) == 1  # full weights: one frozen copy of the starting model is the reference
    assert out.summary.trained_tokens > 0 and out.adapter_dir is None
    # held out, measured here: (tuned - base) log-probability of desirable answers minus that of undesirable ones.
    # Calibrated on this tiny model (24 steps): TRL's validation rewards were +0.82 vs +0.17 at beta 0.1, i.e. about
    # +6.5 nats between the two; an untrained model (or a reference equal to the policy) gives 0.
    rows = encode_rows(tokenizer, data.validation.head(48), UNPAIRED)
    shift = {True: [], False: []}
    for r in rows:
        shift[r["label"]].append(answer_logprob(out.model_dir, r["prompt_ids"], r["completion_ids"])
                                 - answer_logprob(tiny_dir, r["prompt_ids"], r["completion_ids"]))
    gap = sum(shift[True]) / len(shift[True]) - sum(shift[False]) / len(shift[False])
    assert gap > 2.0, f"desirable answers gained {gap:.2f} nats over undesirable ones"
    losses = [h["loss"] for h in out.summary.log_history if "loss" in h]
    assert losses[0] == pytest.approx(0.5, abs=0.01) and min(losses[-3:]) < 0.45  # 1 - sigmoid(0) at the start


@pytest.mark.slow
def test_lora_kto_loads_no_reference_copy(tiny_dir, tokenizer, reference_loads, tmp_path):
    data = prepare(UNPAIRED, tokenizer, kind="unpaired")
    out = train(tiny_dir, data.train_tokens, UNPAIRED, _cfg("kto", "lora", max_steps=2), tmp_path / "out")
    assert reference_loads == []  # the adapter-disabled policy is the reference
    assert (out.adapter_dir / "adapter_config.json").is_file() and (out.model_dir / "config.json").is_file()


@pytest.mark.slow
def test_orpo_raises_the_chosen_answers_over_the_rejected_without_a_reference(tiny_dir, tokenizer, tmp_path, monkeypatch):
    import transformers

    loads = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    data = prepare(PAIRS, tokenizer)
    out = train(tiny_dir, data.train_tokens, PAIRS, _cfg("orpo", "full"), tmp_path / "out")
    assert len(loads) == 1  # the policy alone: ORPO holds no reference model
    assert out.summary.method == "orpo (full, beta 0.1)" and out.summary.trained_tokens > 0
    logs = [h for h in out.summary.log_history if "nll_loss" in h]
    assert logs[-1]["nll_loss"] < logs[0]["nll_loss"] - 1.0  # the SFT half: chosen answers become likely
    # held out, measured here with ORPO's own scale (log-probability per answer token, which its odds ratio compares):
    # the chosen answers become likelier, and more so than the rejected ones. Calibrated on this tiny model (24 steps,
    # 64 pairs): chosen -10.71 -> -7.78 nats per token; chosen-minus-rejected margin +0.057 -> +0.265.
    margin_gain, chosen_gain = [], []
    for p in encode_pairs(tokenizer, data.validation.head(64), PAIRS):
        c = [answer_logprob(m, p["prompt_ids"], p["chosen_ids"]) / len(p["chosen_ids"]) for m in (tiny_dir, out.model_dir)]
        r = [answer_logprob(m, p["prompt_ids"], p["rejected_ids"]) / len(p["rejected_ids"]) for m in (tiny_dir, out.model_dir)]
        chosen_gain.append(c[1] - c[0])
        margin_gain.append((c[1] - r[1]) - (c[0] - r[0]))
    assert sum(chosen_gain) / len(chosen_gain) > 1.5
    assert sum(margin_gain) / len(margin_gain) > 0.1 and not math.isnan(sum(margin_gain))


def test_a_non_finite_preference_loss_stops_training_with_step_rank_and_fix():
    """The guard the DPO, KTO and ORPO trainers share (harness.StopAtNonFiniteLoss), on a stand-in parent trainer."""
    from types import SimpleNamespace

    from llm_finetune.training.harness import StopAtNonFiniteLoss

    class Parent:
        loss = torch.tensor(float("nan"))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return (self.loss, {}) if return_outputs else self.loss

    class KTOConfig:  # named like TRL's: the message names the method from it
        process_index = 1

    class Guarded(StopAtNonFiniteLoss, Parent):
        nonfinite_hint = "Lower train.learning_rate"
        args, state = KTOConfig(), SimpleNamespace(global_step=6)

    training, evaluating = SimpleNamespace(training=True), SimpleNamespace(training=False)
    with pytest.raises(FloatingPointError, match=r"KTO loss is nan at step 7 \(rank 1\); stopped at the first non-finite "
                                                 r"loss\. Lower train\.learning_rate"):
        Guarded().compute_loss(training, {}, return_outputs=True)
    assert torch.isnan(Guarded().compute_loss(evaluating, {}))  # evaluation is reported, not stopped
    Guarded.loss = torch.tensor(0.5)
    assert Guarded().compute_loss(training, {}) == 0.5
