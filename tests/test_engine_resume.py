"""A run folder as a user reads it: resume applies or refuses changed settings, a finished run
is replaced only when asked, the seed fixes initialisation, signals save a checkpoint, stale
temporaries are cleaned."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from saffnet_fast.cli.main import main
from saffnet_fast.data import build_dataset
from saffnet_fast.engine.tiny import TinyPoseNet
from saffnet_fast.engine.trainer import ResumeError, RunExistsError, Trainer

from engine_utils import steps_per_epoch, synthetic_overrides, tiny_config, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _log_rows(folder):
    with open(os.path.join(folder, "train_log.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def _stopped_run(tmp_path, name, steps, *extra):
    """A run stopped (with its checkpoint saved) after global step ``steps``."""
    cfg = tiny_config(tmp_path, name, *extra)
    train_set = build_dataset(cfg, "train")
    Trainer(cfg, tiny_model(), train_set, log=lambda s: None).fit(stop_after_steps=steps)
    return cfg, train_set


def test_resume_applies_a_changed_lr_schedule_and_epochs(tmp_path):
    cfg, train_set = _stopped_run(tmp_path, "run", 3)
    per_epoch = steps_per_epoch(len(train_set), 4)
    assert per_epoch < 3 < 2 * per_epoch  # stopped in epoch 2, past the milestone at 1
    # a step the killed process logged after its last checkpoint
    with open(tmp_path / "run" / "train_log.csv", "a", newline="") as handle:
        csv.writer(handle).writerow([1, 4, "0.5", "0.0001", "9.0"])
    lines = []
    resumed = Trainer(tiny_config(tmp_path, "run", "train.lr=0.0005", "train.epochs=3"),
                      tiny_model(), train_set, log=lines.append)
    assert resumed.global_step == 3
    lr_lines = [line for line in lines if line.startswith("resume: train.lr ")]
    assert len(lr_lines) == 1 and "0.001 -> 0.0005" in lr_lines[0]
    assert any(line.startswith("resume: train.epochs 2 -> 3") for line in lines)
    # the scheduler's epoch is 1, past the milestone: the new base lr times lr_factor
    assert resumed.scheduler.base_lrs == [pytest.approx(5e-4)]
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(5e-5, rel=1e-12)
    assert resumed.optimizer.param_groups[0]["initial_lr"] == pytest.approx(5e-4)
    resumed.fit()
    assert resumed.epoch == 3 and resumed.global_step == 3 * per_epoch
    rows = _log_rows(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == list(range(1, 3 * per_epoch + 1))
    assert [float(r["lr"]) for r in rows[3:]] == pytest.approx([5e-5] * (len(rows) - 3))


def test_resume_refuses_settings_it_cannot_apply(tmp_path):
    _cfg, train_set = _stopped_run(tmp_path, "run", 1)
    for override, expected in [
            ("train.batch_size=2", "train.batch_size is 4 in the checkpoint and 2 now"),
            ("train.optimizer=sgd", "train.optimizer is adam in the checkpoint and sgd now"),
            ("seed=6", "seed is 5 in the checkpoint and 6 now"),
            ("data.sigma=3.0", "data.sigma is 2.0 in the checkpoint and 3.0 now")]:
        with pytest.raises(ResumeError) as info:
            Trainer(tiny_config(tmp_path, "run", override), tiny_model(), train_set,
                    log=lambda s: None)
        message = str(info.value)
        assert expected in message and "--force" in message and "\n" not in message
        assert isinstance(info.value, ValueError)  # the CLI prints it as one line, exit 2


def test_resume_in_a_folder_of_another_model_says_so_in_one_line(tmp_path):
    _cfg, train_set = _stopped_run(tmp_path, "run", 1)
    with pytest.raises(ResumeError) as info:
        Trainer(tiny_config(tmp_path, "run", "model.name=hrnet_w32"), tiny_model(), train_set,
                log=lambda s: None)
    message = str(info.value)
    assert "'tiny'" in message and "'hrnet_w32'" in message
    assert "another output_dir" in message and "--force" in message
    assert "\n" not in message and len(message) < 400
    # same config, other weights (a model passed through the Python API)
    torch.manual_seed(0)
    with pytest.raises(ResumeError) as info:
        Trainer(tiny_config(tmp_path, "run"), TinyPoseNet(17, width=16), train_set,
                log=lambda s: None)
    message = str(info.value)
    assert "another model" in message and "have another shape" in message
    assert "\n" not in message and len(message) < 700


def test_a_finished_run_is_not_overwritten_without_force(tmp_path):
    cfg = tiny_config(tmp_path, "run")
    train_set = build_dataset(cfg, "train")
    Trainer(cfg, tiny_model(), train_set, log=lambda s: None).fit()
    out = tmp_path / "run"
    (out / "best.pth").write_bytes(b"an older best checkpoint")
    old_steps = len(_log_rows(out))
    assert old_steps > 1
    fresh = tiny_config(tmp_path, "run", "train.resume=false", "train.max_steps=1")
    with pytest.raises(RunExistsError) as info:
        Trainer(fresh, tiny_model(), train_set, log=lambda s: None)
    message = str(info.value)
    assert str(out) in message and "--force" in message and "train.resume=true" in message
    assert torch.load(out / "checkpoint.pth", weights_only=True)["global_step"] == old_steps

    lines = []
    Trainer(fresh, tiny_model(), train_set, log=lines.append, overwrite=True).fit()
    assert any(line.startswith("overwrite: removed") for line in lines)
    assert [int(r["step"]) for r in _log_rows(out)] == [1]  # replaced, not appended to
    assert not (out / "best.pth").exists()
    assert torch.load(out / "checkpoint.pth", weights_only=True)["global_step"] == 1


def test_saffnet_train_same_seed_same_start_and_force(tmp_path):
    overrides = synthetic_overrides(tmp_path, "unused") + [
        "train.max_steps=1", "train.epochs=1", "train.tensorboard=false"]

    def train(name, *extra):
        assert main(["train", "synthetic_quick", *overrides, f"output_dir={tmp_path / name}",
                     *extra]) == 0
        state = torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)
        return float(_log_rows(tmp_path / name)[0]["loss"]), state["model"]

    torch.manual_seed(1)  # the global RNG differs between the runs: only `seed` may matter
    loss_a, weights_a = train("a")
    torch.manual_seed(2)
    loss_b, weights_b = train("b")
    assert loss_a == loss_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # --force replaces the finished run "a" with a new one
    loss_c, _ = train("a", "train.resume=false", "--force")
    assert loss_c == loss_a and len(_log_rows(tmp_path / "a")) == 1


def test_stale_temporaries_are_removed_with_one_line(tmp_path):
    cfg = tiny_config(tmp_path, "run")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pth.k2x_9a.tmp", "model.safetensors.7q1.tmp", "notes.tmp"):
        (out / name).write_bytes(b"x" * 10)
    lines = []
    Trainer(cfg, tiny_model(), build_dataset(cfg, "train"), log=lines.append)
    assert sorted(os.listdir(out)) == ["notes.tmp"]
    stale_lines = [line for line in lines if "stale temporary" in line]
    assert len(stale_lines) == 1 and "removed 2 " in stale_lines[0]


class _SignalAtStep(TinyPoseNet):
    """Sends ``signum`` to this process from inside training step ``step``."""

    def __init__(self, step, signum):
        torch.manual_seed(0)
        super().__init__(17, width=8, dropout=0.2)
        self.step, self.signum, self.calls = step, signum, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.step:
                os.kill(os.getpid(), self.signum)
        return super().forward(x)


def test_sigint_saves_after_the_step_then_raises_and_restores_handlers(tmp_path):
    cfg = tiny_config(tmp_path, "run")
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    lines = []
    trainer = Trainer(cfg, _SignalAtStep(2, signal.SIGINT), build_dataset(cfg, "train"),
                      log=lines.append)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    state = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert state["global_step"] == 2  # the step in progress finished and was saved
    assert any(line.startswith("SIGINT: saved") for line in lines)


SIGTERM_SCRIPT = textwrap.dedent("""
    import json, os, sys, time, torch
    from saffnet_fast.data import build_dataset
    from saffnet_fast.engine.config import load_config
    from saffnet_fast.engine.tiny import TinyPoseNet
    from saffnet_fast.engine.trainer import Trainer

    cfg = load_config(None, json.loads(sys.argv[1]))
    go = sys.argv[2]

    class WaitInStepTwo(TinyPoseNet):
        calls = 0

        def forward(self, x):
            if self.training:
                self.calls += 1
                while self.calls == 2 and not os.path.exists(go):
                    time.sleep(0.01)  # step 2 is in progress when the signal arrives
            return super().forward(x)

    torch.manual_seed(0)
    model = WaitInStepTwo(17, width=8, dropout=0.2)
    Trainer(cfg, model, build_dataset(cfg, "train"), log=print).fit()
""")


def test_sigterm_saves_a_checkpoint_and_resume_continues_exactly(tmp_path):
    overrides = synthetic_overrides(tmp_path, "killed") + ["train.tensorboard=false"]
    cfg = tiny_config(tmp_path, "killed", "train.tensorboard=false")
    train_set = build_dataset(cfg, "train")  # generated once, before the subprocess reads it
    script, go = tmp_path / "train.py", tmp_path / "go"
    script.write_text(SIGTERM_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(overrides), str(go)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "killed" / "train_log.csv"
    deadline = time.monotonic() + 240  # a safety net for a hung child, not a measurement
    while not (log.exists() and len(_log_rows(tmp_path / "killed")) >= 1):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the child logged no step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    go.write_text("")
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM: saved" in stdout
    assert torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=True)[
        "global_step"] == 2

    full_cfg = tiny_config(tmp_path, "full", "train.tensorboard=false")
    full = Trainer(full_cfg, tiny_model(), train_set, log=lambda s: None).fit()["losses"]
    torch.manual_seed(999)  # the checkpoint restores every RNG
    rest = Trainer(cfg, tiny_model(), train_set, log=lambda s: None).fit()["losses"]
    assert rest == pytest.approx(full[2:], rel=1e-6, abs=0)
    logged = [float(r["loss"]) for r in _log_rows(tmp_path / "killed")]
    assert logged == pytest.approx(full, rel=1e-6, abs=0)
