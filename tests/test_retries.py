"""Retries that fire on transient faults and never on bad input.

Propeller retries a task only when its error document says RECOVERABLE, and flytekit
writes that only for ``FlyteRecoverableException``. These tests run the tasks' own
container commands (``pyflyte-execute``, from the serialized templates, as a pod would)
and read the ``error.pb`` that propeller would read; the training test then plays the
retry the way propeller does (a new attempt whose previous checkpoint is the failed
attempt's) and compares the weights with an uninterrupted run.
"""

import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from llm_finetune.errors import ConfigError, DataError, TransientError, is_transient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --- classification ---------------------------------------------------------------------------


def _http_error(status: int):
    """An HTTP error as the hub client raises it, carrying the response (requests' Response, no network)."""
    import requests
    from huggingface_hub.errors import HfHubHTTPError

    response = requests.Response()
    response.status_code = status
    return HfHubHTTPError(f"{status}", response=response)


def test_transient_faults_are_told_apart_from_user_errors():
    import requests
    from torch.distributed import DistBackendError

    transient = [
        ConnectionResetError(104, "Connection reset by peer"), TimeoutError("read timed out"),
        requests.exceptions.ConnectionError("Max retries exceeded"), requests.exceptions.ReadTimeout("read timed out"),
        _http_error(503), _http_error(429), _http_error(408),
        DistBackendError("[Gloo] Connection closed by peer [10.0.0.2]:29500"),
        RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"),
        TransientError("hub did not answer"),
    ]
    permanent = [
        ConfigError(["train.method: 'lorra' is not one of lora, qlora, full"]), DataError("data.source: file not found"),
        _http_error(404), _http_error(401), ValueError("bad value"), KeyError("input_ids"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MemoryError(),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
    ]
    assert [e for e in transient if not is_transient(e)] == []
    assert [e for e in permanent if is_transient(e)] == []
    # a user-facing wrapper around a network fault is still transient (the cause decides)
    try:
        try:
            raise ConnectionResetError(104, "reset")
        except ConnectionResetError as e:
            raise DataError("data.source: cannot read s3://b/k") from e
    except DataError as wrapped:
        assert is_transient(wrapped)


# --- through the container command ----------------------------------------------------------


def _serialized_args(task) -> list[str]:
    from flytekit.configuration import ImageConfig, SerializationSettings
    from flytekit.tools.translator import get_serializable

    spec = get_serializable(OrderedDict(), SerializationSettings(image_config=ImageConfig.auto_default_image()), task)
    return list(spec.template.container.args)


def _execute(task, inputs: dict, out: Path, env: dict | None = None, prev_checkpoint: str = "", timeout: int = 600):
    """Run ``task``'s pyflyte-execute command on ``inputs`` like one attempt of a pod; returns (rc, log)."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine

    out.mkdir(parents=True)
    lm = TypeEngine.dict_to_literal_map(FlyteContextManager.current_context(), inputs, task.python_interface.inputs)
    (out / "inputs.pb").write_bytes(lm.to_flyte_idl().SerializeToString())
    values = {
        "{{.input}}": str(out / "inputs.pb"), "{{.outputPrefix}}": str(out / "out"), "{{.rawOutputDataPrefix}}": str(out / "raw"),
        "{{.checkpointOutputPrefix}}": str(out / "checkpoint"), "{{.prevCheckpointPrefix}}": prev_checkpoint,
    }
    args = [values.get(a, a) for a in _serialized_args(task)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "LLM_FINETUNE_DECK_DIR": str(out / "decks"),
                **(env or {})}
    with open(out / "log.txt", "w") as log:
        p = subprocess.run([BIN / args[0], *args[1:]], cwd=out, env=full_env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode, (out / "log.txt").read_text()


def _error_kind(out: Path) -> tuple[str, str]:
    from flyteidl.core import errors_pb2

    doc = errors_pb2.ErrorDocument()
    doc.ParseFromString((out / "out" / "error.pb").read_bytes())
    return errors_pb2.ContainerError.Kind.Name(doc.error.kind), doc.error.message


@pytest.mark.slow
def test_a_config_error_is_not_retried(tmp_path):
    from llm_finetune.config import FineTuneConfig, TrainConfig
    from tasks.validate import validate_config

    bad = FineTuneConfig(train=TrainConfig(method="lorra"))
    _execute(validate_config, {"config": bad}, tmp_path / "attempt0")
    kind, message = _error_kind(tmp_path / "attempt0")
    assert kind == "NON_RECOVERABLE"
    assert "train.method: 'lorra' is not one of sft, dpo, kto, orpo" in message


@pytest.mark.slow
def test_a_hub_outage_is_retried(tmp_path):
    """validate_config resolves the hub model's revision; a hub answering 503 makes the attempt RECOVERABLE."""
    from llm_finetune.config import FineTuneConfig, ModelConfig
    from tasks.validate import validate_config
    from tests.hub_standin import HubStandIn, Repo

    hub = HubStandIn({}).start()
    try:
        hub.repos["org/base"] = Repo("org/base", private=False, commits=[{"oid": "a" * 40, "title": "v1", "files": []}])
        hub.fail_next("GET", "/api/models/org/base", status=503, times=100)
        cfg = FineTuneConfig(model=ModelConfig(base_model="org/base"))
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
        _execute(validate_config, {"config": cfg}, tmp_path / "attempt0", env=env)
        kind, message = _error_kind(tmp_path / "attempt0")
        assert kind == "RECOVERABLE", message
        assert "model.revision: the hub did not answer for model org/base" in message
        # the next attempt, with the hub back, succeeds and pins main to the commit
        hub._faults.clear()
        rc, log = _execute(validate_config, {"config": cfg}, tmp_path / "attempt1", env=env)
        assert rc == 0 and not (tmp_path / "attempt1" / "out" / "error.pb").exists(), log[-3000:]
        assert f"model.revision: main -> {'a' * 40}" in log
    finally:
        hub.stop()


# A fault no test hook in the production code provides: this file, first on the workers'
# PYTHONPATH, makes rank 1 meet a connection reset in the middle of training (as a worker
# reading from a flaky store or a peer would), on the first attempt only.
FAULT = textwrap.dedent('''
    import os
    if os.environ.get("TEST_DIE_IN_STARTUP"):
        # rank 0 is killed as it starts to fetch the base model (a preemption during start-up)
        import signal
        from flytekit.types.directory import FlyteDirectory

        _download = FlyteDirectory.download

        def download(self):
            if os.environ.get("RANK") == "0":
                os.kill(os.getpid(), signal.SIGKILL)
            return _download(self)

        FlyteDirectory.download = download
    if os.environ.get("TEST_FAULT_AT_STEP"):
        import llm_finetune.training.trainer as _trainer

        _step = _trainer.FineTuneTrainer.training_step

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step == int(os.environ["TEST_FAULT_AT_STEP"]) and os.environ.get("RANK") == "1":
                raise ConnectionResetError(104, "injected: connection reset by peer")
            return _step(self, model, inputs, num_items_in_batch)

        _trainer.FineTuneTrainer.training_step = training_step
''')


def _weights(out: Path) -> dict:
    from flyteidl.core import literals_pb2
    from flytekit.models.literals import LiteralMap
    from safetensors.torch import load_file

    msg = literals_pb2.LiteralMap()
    msg.ParseFromString((out / "out" / "outputs.pb").read_bytes())
    literals = LiteralMap.from_flyte_idl(msg).literals
    model_dir = Path(literals["model"].scalar.blob.uri.removeprefix("file://"))
    resumed = literals["resumed_from_step"].scalar.primitive.integer
    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(f))
    return {"weights": weights, "resumed_from_step": resumed, "steps": literals["steps"].scalar.primitive.integer}


@pytest.mark.slow
def test_a_transient_fault_mid_training_is_retried_and_the_retry_resumes_even_after_an_attempt_dies_in_start_up(tmp_path, tokenizer):
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.structured import StructuredDataset

    from llm_finetune.config import DataConfig, TrainConfig, split_train
    from llm_finetune.data.prepare import prepare
    from tasks.train import train_elastic
    from tests.tiny import save_tiny_llama

    base = save_tiny_llama(tmp_path / "tiny", tokenizer)
    prepared = prepare(DataConfig(), tokenizer)
    train_cfg = TrainConfig(weights="full", max_steps=12, save_steps=4, eval_steps=0, per_device_batch_size=4,
                            learning_rate=3e-3, logging_steps=1, warmup_ratio=0.1, nproc_per_node=2)
    train, ops = split_train(train_cfg)
    inputs = {
        "base_model": FlyteDirectory(str(base)), "train_data": StructuredDataset(dataframe=prepared.train_tokens),
        "eval_data": StructuredDataset(dataframe=prepared.validation.head(8)), "data": DataConfig(), "train": train, "train_ops": ops,
    }
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULT)
    fault_env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "fault"), str(ROOT)]), "TEST_FAULT_AT_STEP": "6"}

    rc, log = _execute(train_elastic, inputs, tmp_path / "clean")
    assert rc == 0, log[-4000:]
    clean = _weights(tmp_path / "clean")

    # attempt 0: rank 1 loses its connection at step 7, after checkpoint-4 was stored
    _execute(train_elastic, inputs, tmp_path / "attempt0", env=fault_env)
    kind, message = _error_kind(tmp_path / "attempt0")
    assert kind == "RECOVERABLE", message  # propeller spends one of train.retries on it
    # torchelastic reports the first failure it observed: rank 1's injected reset, or rank 0's
    # gloo collective seeing its peer vanish (a race); both must be classified as transient
    assert "transient failure, Flyte will retry" in message, message
    assert "injected: connection reset by peer" in message or "Connection closed by peer" in message, message
    assert (tmp_path / "attempt0" / "checkpoint" / "checkpoint-4").is_dir()

    # attempt 1: propeller hands it the failed attempt's checkpoint prefix; it is killed in start-up
    die_env = {**fault_env, "TEST_FAULT_AT_STEP": "", "TEST_DIE_IN_STARTUP": "1"}
    _, log = _execute(train_elastic, inputs, tmp_path / "attempt1", env=die_env,
                      prev_checkpoint=str(tmp_path / "attempt0" / "checkpoint"))
    assert (tmp_path / "attempt1" / "out" / "error.pb").exists(), log[-4000:]
    kind, message = _error_kind(tmp_path / "attempt1")
    assert kind == "RECOVERABLE" and "killed by SIGKILL" in message, message
    # it carried checkpoint-4 into its own prefix first, so ...
    assert sorted(p.name for p in (tmp_path / "attempt1" / "checkpoint").iterdir()) == ["checkpoint-4"]

    # attempt 2, given only attempt 1's prefix, resumes from attempt 0's checkpoint
    rc, log = _execute(train_elastic, inputs, tmp_path / "attempt2", prev_checkpoint=str(tmp_path / "attempt1" / "checkpoint"))
    assert rc == 0, log[-4000:]
    resumed = _weights(tmp_path / "attempt2")
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == clean["steps"] == 12
    assert resumed["weights"].keys() == clean["weights"].keys()
    for name, w in clean["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], w, rtol=1e-4, atol=1e-5, msg=name)
    # control: the weights did move, so equality above is not the base model twice
    start = _weights_of_dir(base)
    assert any(not torch.allclose(start[n], w) for n, w in clean["weights"].items() if n in start)


def _weights_of_dir(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out
