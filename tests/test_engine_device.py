"""The Trainer's device settings: what ``auto`` resolves to, what a CUDA graph needs, and the
graphed step against the eager one (on a GPU)."""
import pytest
import torch

from saffnet_fast.data import build_dataset
from saffnet_fast.engine.config import ConfigError, load_config
from saffnet_fast.engine.inference import resolve_amp, resolve_flag
from saffnet_fast.engine.trainer import Trainer

from engine_utils import tiny_config, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_settings_per_device():
    assert resolve_amp("auto", "cpu") is None
    assert resolve_amp("float16", "cpu") == "float16" and resolve_amp(None, "cuda") is None
    assert resolve_flag("auto", "cpu") is False and resolve_flag("auto", "cuda") is True
    assert resolve_flag(True, "cpu") is True and resolve_flag(False, "cuda") is False


@pytest.mark.parametrize("override, needle", [
    ("train.amp=half", "train.amp: expected auto, null, float16 or bfloat16, got 'half'"),
    ("model.channels_last=sometimes", "model.channels_last: expected true, false or auto"),
    ("train.cudnn_benchmark=1", "train.cudnn_benchmark: expected true, false or auto, got 1"),
    ("train.compile=yes please", "train.compile: expected true or false"),
    ("train.cuda_graph=3", "train.cuda_graph: expected true or false, got 3"),
])
def test_device_settings_are_checked_where_they_enter(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(None, [override])


def test_cpu_defaults_train_in_float32_nchw(tmp_path):
    config = tiny_config(tmp_path, "cpu", "train.max_steps=1")
    assert config["train"]["amp"] == "auto" and config["model"]["channels_last"] == "auto"
    trainer = Trainer(config, tiny_model(), build_dataset(config, "train"), log=lambda _: None)
    assert trainer.amp is None and trainer.channels_last is False
    assert not trainer.scaler.is_enabled() and not trainer.cuda_graph
    assert trainer.model.features[0].weight.is_contiguous()
    trainer.fit()


def test_cuda_graph_refuses_what_cannot_be_captured(tmp_path):
    config = tiny_config(tmp_path, "graph", "train.cuda_graph=true", "train.device=cpu")
    with pytest.raises(ValueError, match="train.cuda_graph: it needs a CUDA device, got cpu"):
        Trainer(config, tiny_model(), build_dataset(config, "train"), log=lambda _: None)


@cuda
@pytest.mark.parametrize("amp", ["null", "bfloat16"])
def test_cuda_graph_step_matches_the_eager_step(tmp_path, amp):
    """Four graphed steps give the losses and weights of four eager steps (dropout off; with
    dropout the masks differ between the two runs' RNG use but each is checked elsewhere)."""
    runs = {}
    for graphed in (False, True):
        config = tiny_config(tmp_path, f"g{graphed}{amp}", f"train.amp={amp}",
                             f"train.cuda_graph={str(graphed).lower()}", "train.max_steps=4",
                             "train.device=cuda", "train.cudnn_benchmark=false",
                             "train.batch_size=3",  # 6 samples: no partial batch to drop
                             "train.deterministic=false")
        trainer = Trainer(config, tiny_model(dropout=0.0), build_dataset(config, "train"),
                          log=lambda _: None)
        result = trainer.fit()
        runs[graphed] = (result["losses"], [p.detach().float().cpu()
                                             for p in trainer.model.parameters()])
    (eager_losses, eager_weights), (graph_losses, graph_weights) = runs[False], runs[True]
    tol = 1e-5 if amp == "null" else 2e-2
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses),
                               rtol=tol, atol=tol)
    for a, b in zip(graph_weights, eager_weights):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@cuda
def test_cuda_graph_refuses_float16_amp(tmp_path):
    config = tiny_config(tmp_path, "fp16", "train.cuda_graph=true", "train.amp=float16",
                         "train.device=cuda")
    with pytest.raises(ValueError, match="GradScaler checks for infinities on the host"):
        Trainer(config, tiny_model(), build_dataset(config, "train"), log=lambda _: None)

