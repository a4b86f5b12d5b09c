"""The training loop: Adam + MultiStepLR, JointsMSELoss, mixed precision, channels_last,
atomic resumable checkpoints (also written on SIGINT / SIGTERM), a best checkpoint, CSV /
TensorBoard logs, DDP (torchrun; gloo on CPU)."""
from __future__ import annotations

import bisect
import contextlib
import csv
import glob
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.sampler import ResumableSampler
from ..data.topdown import TopDownDataset
from .checkpoint import (atomic_save, capture_rng_state, load_checkpoint, restore_rng_state,
                         save_safetensors)
from .config import changed_settings, dump_config
from .inference import autocast_context, evaluate_model, resolve_amp, resolve_flag
from .loss import JointsMSELoss
from .modeling import first_names, load_pretrained

CHECKPOINT_NAME = "checkpoint.pth"
BEST_NAME = "best.pth"
WEIGHTS_NAME = "model.safetensors"
LOG_NAME = "train_log.csv"
TENSORBOARD_DIR = "tensorboard"
# The files a run leaves in its output_dir: another run there replaces them only when asked.
RUN_FILES = (CHECKPOINT_NAME, BEST_NAME, WEIGHTS_NAME, LOG_NAME)

# Settings that define the model's tensors: a checkpoint of another architecture is not resumed.
ARCHITECTURE_KEYS = ("model.name", "model.num_joints", "model.input_size", "model.extra")
# Settings a resumed run cannot change, with the reason given to the user.
_DATA_CHANGES = "the training data would change under the run"
FIXED_ON_RESUME = {
    "seed": "every epoch's data order follows the seed",
    "train.batch_size": "the data order and the position in the epoch are counted in batches",
    "train.optimizer": "the saved optimizer state belongs to the old optimizer",
    **{f"data.{key}": _DATA_CHANGES
       for key in ("type", "root", "train_annotations", "train_images", "synthetic",
                   "dataset_info", "sigma", "unbiased_encoding", "augment")},
}
# Settings that say where the run is and how it starts, not how it trains.
NOT_COMPARED_ON_RESUME = ("output_dir", "train.resume", "model.pretrained")
SCHEDULE_KEYS = ("train.lr", "train.lr_steps", "train.lr_factor")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class ResumeError(ValueError):
    """The checkpoint in output_dir cannot be resumed with this model or config."""


class RunExistsError(ValueError):
    """output_dir holds a run that this Trainer would overwrite without being asked to."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device: {name!r} requested but no CUDA device is available")
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _ignore_terminal_interrupt(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops after the current
    step and saves; a worker killed by the terminal's SIGINT would end the run without it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _describe_model(model_cfg: dict) -> str:
    size = model_cfg.get("input_size") or ["?", "?"]
    extra = f", extra {model_cfg['extra']}" if model_cfg.get("extra") else ""
    return (f"{model_cfg.get('name')!r} (input {size[0]}x{size[1]}, "
            f"{model_cfg.get('num_joints')} joints{extra})")


def _train_collate(batch):
    return (torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch]),
            torch.stack([b[2] for b in batch]))


class Trainer:
    """Train ``model`` on ``train_set`` as ``config`` says.

    ``fit(stop_after_steps=N)`` saves a checkpoint after global step N and returns, as if the
    process had been stopped there; a new Trainer with ``train.resume`` continues exactly.
    SIGINT / SIGTERM during ``fit`` do the same at the end of the current step, then raise
    ``KeyboardInterrupt`` / ``SystemExit(128 + signal)``.

    Resuming applies the settings that can change under a run (learning-rate schedule, epochs,
    weight decay, logging, evaluation), one log line each, and refuses the others with a
    :class:`ResumeError`. A run already in ``output_dir`` is replaced only with
    ``overwrite=True`` (``saffnet train --force``): its checkpoint, best checkpoint, weights,
    CSV log and TensorBoard events are removed and a new run starts, whatever ``train.resume``
    says; otherwise starting afresh there raises :class:`RunExistsError`.
    """

    def __init__(self, config: dict[str, Any], model: torch.nn.Module,
                 train_set: TopDownDataset, val_set: TopDownDataset | None = None,
                 log: Callable[[str], None] = print, overwrite: bool = False):
        self.config = config
        self.train_cfg = config["train"]
        self.output_dir = config["output_dir"]
        self.log = log
        self.overwrite = bool(overwrite)
        self.rank, self.world_size, local_rank = distributed_context()
        self.is_main = self.rank == 0
        self.device = resolve_device(self.train_cfg["device"])
        if self.device.type == "cuda" and self.world_size > 1:
            self.device = torch.device("cuda", local_rank)
        seed_everything(int(config["seed"]), bool(self.train_cfg["deterministic"]))
        self.checkpoint_path = os.path.join(self.output_dir, CHECKPOINT_NAME)
        self.best_path = os.path.join(self.output_dir, BEST_NAME)
        if self.is_main:
            self._remove_stale_temporaries()
        # Before the process group and DDP exist, so a refusal leaves nothing to tear down.
        resume_state = self._prepare_output_dir(model)
        pretrained = config["model"].get("pretrained")
        if pretrained and resume_state is None:
            self.log(load_pretrained(model, str(pretrained)))
        elif pretrained:
            self.log(f"model.pretrained {pretrained}: not loaded, the run resumes from "
                     f"{self.checkpoint_path}")
        self._set_up_device()
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.ddp_model = model
        # A process group this Trainer created is destroyed by close(): left to interpreter
        # exit, gloo's worker threads can be torn down while still joinable, and the rank dies
        # with SIGABRT ("terminate called without an active exception") after a good run.
        self._owns_process_group = False
        if self.world_size > 1:
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group(
                    "nccl" if self.device.type == "cuda" else "gloo")
                self._owns_process_group = True
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.train_cfg["compile"]:
            # reduce-overhead: torch.compile captures forward and backward in CUDA graphs
            # itself (the optimizer step stays eager)
            self.ddp_model = torch.compile(
                self.ddp_model, mode="reduce-overhead" if self.cuda_graph else None)
        self.train_set = train_set
        self.val_set = val_set
        self.criterion = JointsMSELoss(use_target_weight=True)
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=[int(s) for s in self.train_cfg["lr_steps"]],
            gamma=float(self.train_cfg["lr_factor"]))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "float16")
        self._graphed_step: GraphedTrainStep | None = None
        self.sampler = ResumableSampler(len(train_set), seed=int(config["seed"]), shuffle=True,
                                        rank=self.rank, world_size=self.world_size)
        self.batch_size = int(self.train_cfg["batch_size"])
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.metrics: dict[str, Any] = {}
        self.best: dict[str, Any] | None = None  # metric, value, epoch, global_step
        self.resumed = resume_state is not None
        self._stop_signal: int | None = None
        self._tensorboard_notice_given = False
        self._log_started = False
        if resume_state is not None:
            self._restore(resume_state, self.checkpoint_path)

    def _set_up_device(self) -> None:
        """Resolve the ``auto`` settings for this device and check the CUDA-graph ones; on
        CUDA that is what a GPU user expects by default: AMP (bfloat16 where the GPU has it,
        float16 with the GradScaler otherwise), channels_last, cudnn.benchmark."""
        cfg = self.train_cfg
        self.amp = resolve_amp(cfg["amp"], self.device)
        self.channels_last = resolve_flag(self.config["model"]["channels_last"], self.device)
        benchmark = (resolve_flag(cfg["cudnn_benchmark"], self.device)
                     and not bool(cfg["deterministic"]))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = benchmark
        self.cuda_graph = bool(cfg["cuda_graph"])
        if self.cuda_graph:
            why = None
            if self.device.type != "cuda":
                why = f"it needs a CUDA device, got {self.device}"
            elif self.amp == "float16":
                why = ("float16 AMP's GradScaler checks for infinities on the host every step; "
                       "use train.amp=bfloat16 or null")
            elif self.world_size > 1:
                why = "capturing a DistributedDataParallel step is not supported"
            elif cfg["optimizer"] not in ("adam", "adamw") and not cfg["compile"]:
                why = (f"train.optimizer {cfg['optimizer']!r} has no capturable form; use adam "
                       "or adamw")
            if why:
                raise ValueError(f"train.cuda_graph: {why}")
        if self.device.type == "cuda" and self.is_main:
            self.log(f"{self.device}: AMP {self.amp or 'off'}, "
                     f"{'channels_last' if self.channels_last else 'NCHW'}, cudnn.benchmark "
                     f"{'on' if benchmark else 'off'}"
                     + (", torch.compile" if cfg["compile"] else "")
                     + (", CUDA graph" if self.cuda_graph else ""))

    def close(self) -> None:
        """Release the distributed process group if this Trainer created it (idempotent).
        ``with Trainer(...) as trainer:`` calls it on the way out."""
        if self._owns_process_group and torch.distributed.is_initialized():
            torch.distributed.barrier()  # no rank leaves while another still communicates
            torch.distributed.destroy_process_group()
        self._owns_process_group = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ output_dir
    def _remove_stale_temporaries(self) -> None:
        """Temporaries of a save that was killed (atomic_save renames them into place when it
        completes, so any left over belong to no running save of this folder's run)."""
        folder = glob.escape(self.output_dir)
        stale = sorted(path for name in (CHECKPOINT_NAME, BEST_NAME, WEIGHTS_NAME)
                       for path in glob.glob(os.path.join(folder, f"{name}.*.tmp")))
        for path in stale:
            os.unlink(path)
        if stale:
            self.log(f"removed {len(stale)} stale temporary file(s) of an interrupted save "
                     f"from {self.output_dir}: {', '.join(os.path.basename(p) for p in stale)}")

    def _prepare_output_dir(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """The checkpoint state to resume from (checked against ``model`` and the config), or
        None for a new run, after clearing the old one when ``overwrite`` asks for it."""
        present = [name for name in RUN_FILES
                   if os.path.isfile(os.path.join(self.output_dir, name))]
        if self.overwrite:
            tensorboard = os.path.join(self.output_dir, TENSORBOARD_DIR)
            if self.is_main and (present or os.path.isdir(tensorboard)):
                for name in present:
                    os.unlink(os.path.join(self.output_dir, name))
                if os.path.isdir(tensorboard):
                    shutil.rmtree(tensorboard)
                    present.append(TENSORBOARD_DIR + "/")
                self.log(f"overwrite: removed the previous run's {', '.join(present)} from "
                         f"{self.output_dir}; starting a new run")
            return None
        resume = bool(self.train_cfg["resume"])
        if resume and CHECKPOINT_NAME in present:
            state = load_checkpoint(self.checkpoint_path, map_location=self.device)
            self._check_resumable(state, model)
            return state
        if present:
            why = ("train.resume=false would overwrite it" if not resume else
                   f"it has no {CHECKPOINT_NAME} to resume from")
            raise RunExistsError(
                f"output_dir {self.output_dir} already holds a run ({', '.join(present)}) and "
                f"{why}: use another output_dir"
                f"{'' if resume else ', train.resume=true to continue it'}, or replace it "
                "with saffnet train --force (Trainer(..., overwrite=True))")
        return None

    def _resume_changes(self, saved: dict[str, Any]) -> list[tuple[str, Any, Any]]:
        """(key, checkpoint value, config value) for every setting that differs."""
        return [change for change in changed_settings(saved, self.config)
                if change[0] not in NOT_COMPARED_ON_RESUME]

    def _check_resumable(self, state: dict[str, Any], model: torch.nn.Module) -> None:
        saved_cfg = state.get("config")
        where = self.checkpoint_path
        force = ("use another output_dir, or --force (Trainer(..., overwrite=True)) to replace "
                 "that run")
        if isinstance(saved_cfg, dict):
            changes = self._resume_changes(saved_cfg)
            if any(key in ARCHITECTURE_KEYS for key, _, _ in changes):
                raise ResumeError(
                    f"{where} is a checkpoint of model {_describe_model(saved_cfg['model'])}, "
                    f"but this run builds {_describe_model(self.config['model'])}: {force}")
            refused = [(key, old, new) for key, old, new in changes if key in FIXED_ON_RESUME]
            if refused:
                details = "; ".join(f"{key} is {old} in the checkpoint and {new} now "
                                    f"({FIXED_ON_RESUME[key]})" for key, old, new in refused)
                raise ResumeError(
                    f"{where} cannot be resumed with these settings: {details}. Set them back "
                    f"to resume, or {force}")
        ours, theirs = model.state_dict(), state["model"]
        missing = [k for k in ours if k not in theirs]
        unexpected = [k for k in theirs if k not in ours]
        reshaped = [k for k in ours if k in theirs and ours[k].shape != theirs[k].shape]
        if missing or unexpected or reshaped:
            saved_name = (saved_cfg or {}).get("model", {}).get("name", "unknown")
            raise ResumeError(
                f"{where} holds weights of another model (checkpoint model {saved_name!r}, this "
                f"model {type(model).__name__}): of this model's {len(ours)} tensors "
                f"{len(missing)} are missing{first_names(missing)} and {len(reshaped)} have "
                f"another shape{first_names(reshaped)}; {len(unexpected)} are unexpected"
                f"{first_names(unexpected)}: {force}")

    # ------------------------------------------------------------------ state
    def _optimizer(self) -> torch.optim.Optimizer:
        name = self.train_cfg["optimizer"]
        lr, wd = float(self.train_cfg["lr"]), float(self.train_cfg["weight_decay"])
        params = self.model.parameters()
        if name in ("adam", "adamw"):
            cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
            # fused: one kernel over all parameters. On the CPU torch otherwise runs Adam
            # tensor by tensor (~10 ATen calls for each of SAFFNet's ~1,150 parameter
            # tensors): the SAFFNet step at 64×48, batch 8, 1 thread took 1056 → 991 ms.
            if self.cuda_graph:
                # A captured step replays its kernels with the values they were captured
                # with: the learning rate lives in a device tensor the scheduler fills in
                # place, and the optimizer keeps its step count on the device (capturable).
                return cls(params, lr=torch.tensor(lr, device=self.device), weight_decay=wd,
                           fused=True, capturable=True)
            return cls(params, lr=lr, weight_decay=wd,
                       fused=self.device.type in ("cpu", "cuda"))
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd, nesterov=False)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "rng": capture_rng_state(),
            "config": self.config,
            "metrics": self.metrics,
            "best": self.best,
        }

    def save(self, path: str | None = None) -> str | None:
        path = path or self.checkpoint_path
        if self.is_main:
            atomic_save(self.state_dict(), path)
        if self.world_size > 1:
            torch.distributed.barrier()
        return path

    def resume(self, path: str) -> None:
        """Continue the run saved in ``path`` (checked and applied as in ``__init__``)."""
        state = load_checkpoint(path, map_location=self.device)
        self._check_resumable(state, self.model)
        self._restore(state, path)

    def _restore(self, state: dict[str, Any], path: str) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])  # else: AMP float16 starts here
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.metrics = dict(state.get("metrics") or {})
        self.best = state.get("best")
        restore_rng_state(state["rng"])
        self.resumed = True
        self.log(f"resumed from {path}: epoch {self.epoch}, step {self.global_step}")
        if isinstance(state.get("config"), dict):
            self._apply_changes(self._resume_changes(state["config"]))

    def _apply_changes(self, changes: list[tuple[str, Any, Any]]) -> None:
        """Apply the settings that changed since the checkpoint (the others were refused)."""
        if any(key in SCHEDULE_KEYS for key, _, _ in changes):
            self._rebuild_schedule()
        lr = float(self.optimizer.param_groups[0]["lr"])
        for key, old, new in changes:
            if key in SCHEDULE_KEYS:
                how = (f"the optimizer and scheduler follow the new schedule: lr {lr:.3g} in "
                       f"epoch {self.epoch + 1}")
            elif key == "train.weight_decay":
                for group in self.optimizer.param_groups:
                    group["weight_decay"] = float(new)
                how = "applied to the optimizer"
            elif key == "train.epochs":
                how = (f"the run continues to epoch {int(new)}" if int(new) > self.epoch else
                       f"the checkpoint has completed {self.epoch} epochs, none is left")
            elif key == "train.amp" and new == "float16":
                how = "applied, with a new gradient scaler"
            else:
                how = "applied"
            self.log(f"resume: {key} {old} -> {new}: {how}")

    def _rebuild_schedule(self) -> None:
        """Point the MultiStepLR at the configured lr / steps / factor and set the current lr
        to what the new schedule gives at the scheduler's epoch, so the remaining epochs
        follow it. (Only on a change: the closed form can differ from the accumulated
        product in the last bit, which would break an exact resume.)"""
        lr = float(self.train_cfg["lr"])
        steps = sorted(int(s) for s in self.train_cfg["lr_steps"])
        factor = float(self.train_cfg["lr_factor"])
        groups = self.optimizer.param_groups
        current = lr * factor ** bisect.bisect_right(steps, self.scheduler.last_epoch)
        self.scheduler.base_lrs = [lr] * len(groups)
        self.scheduler.milestones = Counter(steps)
        self.scheduler.gamma = factor
        self.scheduler._last_lr = [current] * len(groups)  # what get_last_lr() reports
        for group in groups:
            group["initial_lr"] = lr
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(current)  # a captured step reads this tensor
            else:
                group["lr"] = current

    # ------------------------------------------------------------------ loop
    def _loader(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.sampler.set_position(self.step_in_epoch * self.batch_size)
        # A private generator keeps worker seeding from consuming the global torch RNG
        # (which dropout uses), so resuming mid-epoch reproduces the same random stream.
        generator = torch.Generator()
        generator.manual_seed(int(self.config["seed"]) * 7919 + epoch)
        workers = int(self.config["data"]["num_workers"])
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler,
                          num_workers=workers, collate_fn=_train_collate,
                          drop_last=self._drops_last_batch(),
                          generator=generator, persistent_workers=False,
                          worker_init_fn=_ignore_terminal_interrupt if workers else None,
                          pin_memory=self.device.type == "cuda")

    def _drops_last_batch(self) -> bool:
        """A trailing batch of a single sample is dropped: BatchNorm cannot train on one value
        per channel (AFF's global branch normalises N pooled 1×1 maps, so N = 1 raises).
        Any larger remainder is kept, as in the official HRNet loader, except under a CUDA
        graph, which is captured for one batch shape."""
        remainder = self.sampler.per_rank % self.batch_size
        if self.cuda_graph and not self.train_cfg["compile"]:
            return remainder != 0
        return self.batch_size > 1 and remainder == 1

    def _steps_per_epoch(self) -> int:
        if self._drops_last_batch():
            return self.sampler.per_rank // self.batch_size
        return math.ceil(self.sampler.per_rank / self.batch_size)

    def _csv_writer(self):
        """The step log: a new run starts it afresh; a resumed one continues it, without the
        rows a killed process logged after its last checkpoint."""
        path = os.path.join(self.output_dir, LOG_NAME)
        if self.resumed and os.path.isfile(path):
            self._trim_log(path)
        new = not (self.resumed or self._log_started) or not os.path.isfile(path)
        self._log_started = True  # a second fit() on this Trainer continues the same log
        handle = open(path, "w" if new else "a", newline="", encoding="utf-8")
        writer = csv.writer(handle)
        if new:
            writer.writerow(["epoch", "step", "loss", "lr", "seconds"])
        return handle, writer

    def _trim_log(self, path: str) -> None:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))

        def before_checkpoint(row):
            try:
                return int(row[1]) <= self.global_step
            except (IndexError, ValueError):
                return False  # a line cut short by the kill

        kept = rows[:1] + [row for row in rows[1:] if before_checkpoint(row)]
        if len(kept) < len(rows):
            with open(path, "w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows(kept)
            self.log(f"{path}: dropped {len(rows) - len(kept)} row(s) logged after the "
                     f"checkpoint's step {self.global_step}")

    def _tensorboard(self):
        if not self.train_cfg.get("tensorboard"):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:
            if not self._tensorboard_notice_given:
                reason = ("the tensorboard package is not installed (pip install tensorboard)"
                          if isinstance(exc, ImportError) else
                          f"torch.utils.tensorboard failed to import ({type(exc).__name__}: "
                          f"{exc})")
                self.log(f"train.tensorboard: TensorBoard logging is off: {reason}; "
                         "train.tensorboard=false silences this")
                self._tensorboard_notice_given = True
            return None
        return SummaryWriter(os.path.join(self.output_dir, TENSORBOARD_DIR))

    @contextlib.contextmanager
    def _checkpoint_on_signals(self):
        """While training, SIGINT / SIGTERM ask the loop to save and stop after the current
        step; a second one stops at once. Only the main thread can install handlers; the
        previous ones are restored on the way out."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
            self._stop_signal = signum

        previous = {sig: signal.signal(sig, request_stop)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _stop_requested(self) -> int:
        """The signal that asked to stop (0: none), agreed on by every rank so that all of
        them stop after the same step."""
        signum = self._stop_signal or 0
        if self.world_size > 1:
            flag = torch.tensor([signum], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def _stop_for_signal(self, signum: int) -> None:
        """Called with the checkpoint saved: end the process as the signal asked."""
        self.log(f"{signal.Signals(signum).name}: saved {self.checkpoint_path} at step "
                 f"{self.global_step}; train.resume continues from there")
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def _loss(self, images, targets, weights) -> torch.Tensor:
        with autocast_context(self.device, self.amp):
            output = self.ddp_model(images)
            if isinstance(output, (list, tuple)):
                output = output[-1]
        return self.criterion(output.float(), targets, weights)

    def _check_finite(self, value: float) -> None:
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite training loss {value} at epoch {self.epoch + 1}, step "
                f"{self.global_step + 1} (step {self.step_in_epoch + 1} of the epoch; both "
                "counted from 1); lower train.lr, try train.amp=null, or check the data")

    def train_step(self, images, targets, weights) -> float:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(self.device, non_blocking=True)
        weights = weights.to(self.device, non_blocking=True)
        if self.cuda_graph and not self.train_cfg["compile"]:
            if self._graphed_step is None or not self._graphed_step.fits(images):
                self._graphed_step = GraphedTrainStep(self, images, targets, weights)
            value = self._graphed_step.replay(images, targets, weights)
            self._check_finite(value)  # after the update: a replay cannot stop half-way
            return value
        loss = self._loss(images, targets, weights)
        value = float(loss.detach())
        self._check_finite(value)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value

    def fit(self, stop_after_steps: int | None = None) -> dict[str, Any]:
        """Train to ``train.epochs`` (or ``train.max_steps``); returns the step losses of this
        call and the final metrics."""
        cfg = self.train_cfg
        epochs = int(cfg["epochs"])
        max_steps = cfg.get("max_steps")
        every = int(cfg["checkpoint_every_steps"])
        eval_every = int(cfg["eval_every_epochs"])
        # Bars only on a terminal: in a log file each redraw would be a line.
        progress = bool(cfg.get("progress")) and self.is_main and sys.stderr.isatty()
        start = time.time()
        losses: list[float] = []
        stopped = interrupted = False
        with contextlib.ExitStack() as cleanup:
            csv_handle = csv_writer = tensorboard = None
            if self.is_main:
                os.makedirs(self.output_dir, exist_ok=True)
                dump_config(self.config, os.path.join(self.output_dir, "config.yaml"))
                csv_handle, csv_writer = self._csv_writer()
                cleanup.callback(csv_handle.close)
                tensorboard = self._tensorboard()
                if tensorboard is not None:
                    cleanup.callback(tensorboard.close)
            cleanup.enter_context(self._checkpoint_on_signals())
            self.ddp_model.train()
            while self.epoch < epochs and not stopped:
                loader = self._loader(self.epoch)
                iterator = loader
                if progress:
                    from tqdm import tqdm

                    iterator = tqdm(loader, desc=f"epoch {self.epoch + 1}/{epochs}",
                                    initial=self.step_in_epoch, total=self._steps_per_epoch(),
                                    leave=False, dynamic_ncols=True)
                epoch_start, epoch_losses, images_seen = time.time(), [], 0
                lr = float(self.optimizer.param_groups[0]["lr"])
                for images, targets, weights in iterator:
                    loss = self.train_step(images, targets, weights)
                    losses.append(loss)
                    epoch_losses.append(loss)
                    images_seen += images.shape[0] * self.world_size
                    self.global_step += 1
                    self.step_in_epoch += 1
                    if csv_writer is not None:
                        csv_writer.writerow([self.epoch, self.global_step, f"{loss:.8g}",
                                             f"{lr:.6g}", f"{time.time() - start:.2f}"])
                        csv_handle.flush()  # readable while training runs
                    if tensorboard is not None:
                        tensorboard.add_scalar("train/loss", loss, self.global_step)
                    if progress:
                        iterator.set_postfix(loss=f"{loss:.3e}")
                    signum = self._stop_requested()
                    if signum:
                        self.save()
                        self._stop_for_signal(signum)
                    if stop_after_steps is not None and self.global_step >= stop_after_steps:
                        interrupted = stopped = True
                        break
                    if max_steps is not None and self.global_step >= int(max_steps):
                        stopped = True  # the configured end of a short run
                        break
                    if every and self.global_step % every == 0:
                        self.save()
                if progress:
                    iterator.close()
                if epoch_losses and self.is_main:
                    self._log_epoch(epochs, epoch_losses, lr, images_seen,
                                    time.time() - epoch_start)
                if not stopped:
                    self._end_epoch()
                    last = self.epoch >= epochs
                    if self.val_set is not None and self.is_main and (
                            last or (eval_every and self.epoch % eval_every == 0)):
                        self._evaluated(self.evaluate(), f"epoch {self.epoch}", tensorboard)
                self.save()
                signum = self._stop_requested()
                if signum:
                    self._stop_for_signal(signum)
            if stopped and not interrupted and self.val_set is not None and self.is_main:
                # train.max_steps ended the run mid-epoch
                self._evaluated(self.evaluate(), f"step {self.global_step}", tensorboard)
            if self.is_main and not interrupted:
                save_safetensors(self.model, os.path.join(self.output_dir, WEIGHTS_NAME),
                                 metadata={"name": str(self.config["model"]["name"])})
            if self._stop_signal:  # arrived after the last step: everything is saved
                self._stop_for_signal(self._stop_signal)
        return {"losses": losses, "metrics": self.metrics, "global_step": self.global_step,
                "checkpoint": self.checkpoint_path, "seconds": time.time() - start}

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        with warnings.catch_warnings():
            # A run resumed from a checkpoint saved at an epoch's last step steps the
            # scheduler first; its optimizer did step, before the checkpoint.
            warnings.filterwarnings(
                "ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            self.scheduler.step()

    def _log_epoch(self, epochs: int, losses: list[float], lr: float, images: int,
                   seconds: float) -> None:
        """One line per epoch, the log's record of progress (bars are only for terminals)."""
        self.log(f"epoch {self.epoch + 1}/{epochs}  loss {sum(losses) / len(losses):.2e}  "
                 f"lr {lr:.1e}  {images / max(seconds, 1e-9):.0f} img/s  {seconds:.1f} s")

    def evaluate(self) -> dict[str, Any]:
        return evaluate_model(self.model, self.val_set, self.config, self.device,
                              output_dir=self.output_dir)

    def _evaluated(self, metrics: dict[str, Any], when: str, tensorboard) -> None:
        """Record an evaluation; keep ``best.pth`` (the model, its epoch and metric) when it
        improves on the best so far."""
        self.metrics = metrics
        name, value = self._main_metric(metrics)
        if tensorboard is not None and name is not None:
            tensorboard.add_scalar(f"val/{name}", value, self.epoch)
        line = f"{when}: {self._metric_line(metrics)}"
        if name is not None and math.isfinite(value) and (
                self.best is None or value > float(self.best["value"])):
            self.best = {"metric": name, "value": float(value), "epoch": self.epoch,
                         "global_step": self.global_step}
            atomic_save({"model": self.model.state_dict(), **self.best, "config": self.config},
                        self.best_path)
            line += f" (best so far: {self.best_path})"
        elif self.best is not None:
            line += f" (best {self.best['value']:.4f} at epoch {self.best['epoch']})"
        self.log(line)

    @staticmethod
    def _main_metric(metrics: dict[str, Any]) -> tuple[str | None, float]:
        """The metric a best checkpoint is chosen by: COCO AP, or MPII's mean PCKh."""
        if "AP" in metrics:
            return "AP", float(metrics["AP"])
        if "pckh" in metrics:
            return "PCKh", float(metrics["pckh"]["Mean"])
        return None, float("nan")

    @staticmethod
    def _metric_line(metrics: dict[str, Any]) -> str:
        if "AP" in metrics:
            return f"AP {metrics['AP']:.4f}"
        if "pckh" in metrics:
            return f"PCKh@0.5 mean {metrics['pckh']['Mean']:.2f}"
        return str(metrics)


class GraphedTrainStep:
    """The whole training step (forward, loss, backward, optimizer step) captured in one CUDA
    graph for one batch shape, then replayed: one launch of ~2k kernels per step instead of
    ~2k launches from Python (``train.cuda_graph``; the pattern of PyTorch's "whole network
    capture").

    Capturing needs a few real steps first (cuDNN autotuning, lazy optimizer state, the
    graph's memory pool), on a side stream; they run on the first batch, so the model,
    optimizer and RNG states from before them are put back, in place (the graph holds those
    tensors' addresses), and the first replay is the run's first real step. Everything the
    step reads from the host is on the device: the learning rate (a tensor the scheduler
    fills), Adam's step count (``capturable``) and the dropout RNG of the fused ops.
    """

    WARMUP_STEPS = 3

    def __init__(self, trainer: Trainer, images, targets, weights):
        self.trainer = trainer
        self.inputs = [t.detach().clone() for t in (images, targets, weights)]
        model, optimizer = trainer.model, trainer.optimizer
        saved = self._snapshot(model, optimizer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                optimizer.zero_grad(set_to_none=True)
                trainer._loss(*self.inputs).backward()
                optimizer.step()
        torch.cuda.current_stream().wait_stream(side)
        optimizer.zero_grad(set_to_none=True)  # backward allocates .grad from the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = trainer._loss(*self.inputs)
            self.loss.backward()
            optimizer.step()
        self._restore(model, optimizer, saved)

    @staticmethod
    def _snapshot(model, optimizer) -> dict:
        return {"model": [t.detach().clone() for t in _state_tensors(model)],
                "optimizer": {id(p): {k: (v.clone() if torch.is_tensor(v) else v)
                                      for k, v in st.items()}
                              for p, st in optimizer.state.items()},
                "cuda_rng": torch.cuda.get_rng_state(), "cpu_rng": torch.get_rng_state()}

    @staticmethod
    @torch.no_grad()
    def _restore(model, optimizer, saved: dict) -> None:
        for tensor, value in zip(_state_tensors(model), saved["model"]):
            tensor.copy_(value)
        for p, state in optimizer.state.items():
            before = saved["optimizer"].get(id(p))
            for key, value in state.items():
                if torch.is_tensor(value):
                    # state the warm-up created starts at zero, as a fresh optimizer's would
                    value.copy_(before[key]) if before is not None else value.zero_()
        torch.cuda.set_rng_state(saved["cuda_rng"])
        torch.set_rng_state(saved["cpu_rng"])

    def fits(self, images: torch.Tensor) -> bool:
        return images.shape == self.inputs[0].shape and images.dtype == self.inputs[0].dtype

    def replay(self, images, targets, weights) -> float:
        for static, batch in zip(self.inputs, (images, targets, weights)):
            static.copy_(batch, non_blocking=True)
        self.graph.replay()
        return float(self.loss)


def _state_tensors(model: torch.nn.Module):
    """Every parameter and buffer (BN running statistics, batch counters) of ``model``."""
    yield from model.parameters()
    yield from model.buffers()
