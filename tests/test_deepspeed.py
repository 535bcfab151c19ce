"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (torchrun, gloo) with the tiny model.

Checks that the loss falls, that ``auto`` values were filled from the training config,
and that the saved outputs load with ``from_pretrained`` (ZeRO-3 weights gathered).
"""

import json

import pytest
import torch

from tests.tiny import run_torchrun, save_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("stage,method", [("zero2", "lora"), ("zero3", "full"), ("zero3", "lora")])
def test_deepspeed_two_process_cpu_training(stage, method, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    train = {"weights": method, "max_steps": 12, "per_device_batch_size": 4, "gradient_accumulation_steps": 2,
             "learning_rate": 3e-3 if method == "full" else 2e-2, "logging_steps": 2, "warmup_ratio": 0.0, "save_steps": 0, "eval_steps": 6,
             "eval_max_samples": 8, "sample_prompts": 2, "sample_max_new_tokens": 4, "lora": {"r": 8}}
    out = tmp_path / "out"
    proc = run_torchrun({"model_dir": str(tiny_dir), "out_dir": str(out), "train": train, "deepspeed": stage}, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    s = json.loads((out / "train_summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 12
    assert s["final_loss"] < s["first_loss"] - 0.2
    ds = s["deepspeed_config"]
    assert ds["zero_optimization"]["stage"] == int(stage[-1])
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 2, 16)
    assert "auto" not in json.dumps(ds)
    assert len(s["samples"]) == 2 * 2  # ZeRO-3 generation runs on all ranks in step (synced_gpus)
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # merged or full weights, gathered
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    changed = [n for (n, p), q in zip(model.state_dict().items(), base.state_dict().values()) if not torch.equal(p, q)]
    assert changed and model.model.embed_tokens.weight.shape == base.model.embed_tokens.weight.shape
    if method == "lora":
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(base, out / "adapter")
        ids = torch.randint(0, 500, (1, 10))
        with torch.no_grad():
            assert torch.allclose(adapted(ids).logits, model(ids).logits, atol=1e-4)


@pytest.mark.slow
def test_zero3_offload_trains_with_deepspeed_cpu_adam(tiny_dir, tmp_path):
    """deepspeed_configs/zero3_offload.json as shipped: 2 CPU processes, 2 full fine-tuning steps;
    DeepSpeed's own CPU Adam (built with gcc) steps the offloaded optimizer states."""
    from safetensors.torch import load_file

    train = {"weights": "full", "max_steps": 2, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
             "learning_rate": 1e-3, "logging_steps": 1, "warmup_ratio": 0.0, "save_steps": 0, "eval_steps": 0}
    out = tmp_path / "out"
    proc = run_torchrun({"model_dir": str(tiny_dir), "out_dir": str(out), "train": train, "deepspeed": "zero3_offload"},
                        tmp_path, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next((x for x in proc.stdout.splitlines() if x.startswith("[optimizer]")), "")
    assert "DeepSpeedZeroOptimizer_Stage3 > DeepSpeedCPUAdam" in line, proc.stdout[-3000:]
    s = json.loads((out / "train_summary.json").read_text())
    assert s["world_size"] == 2 and s["steps"] == 2
    ds = s["deepspeed_config"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["lr"] == 1e-3  # "auto" filled from train.learning_rate
    trained, base = load_file(out / "model" / "model.safetensors"), load_file(tiny_dir / "model.safetensors")
    assert any(not torch.equal(trained[k].float(), base[k].float()) for k in base)  # the steps changed the weights
