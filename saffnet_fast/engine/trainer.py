"""The training loop: Adam + MultiStepLR, JointsMSELoss, mixed precision, channels_last,
atomic resumable checkpoints, CSV/TensorBoard logs, DDP (torchrun; gloo on CPU)."""
from __future__ import annotations

import csv
import math
import os
import random
import time
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.sampler import ResumableSampler
from ..data.topdown import TopDownDataset
from .checkpoint import (atomic_save, capture_rng_state, load_checkpoint, restore_rng_state,
                         save_safetensors)
from .config import dump_config
from .inference import autocast_context, evaluate_model
from .loss import JointsMSELoss

CHECKPOINT_NAME = "checkpoint.pth"


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


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


def _train_collate(batch):
    return (torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch]),
            torch.stack([b[2] for b in batch]))


class Trainer:
    """Train ``model`` on ``train_set`` as ``config`` says.

    ``fit(stop_after_steps=N)`` saves a checkpoint after global step N and returns, as if the
    process had been stopped there; a new Trainer with ``train.resume`` continues exactly.
    """

    def __init__(self, config: dict[str, Any], model: torch.nn.Module,
                 train_set: TopDownDataset, val_set: TopDownDataset | None = None,
                 log: Callable[[str], None] = print):
        self.config = config
        self.train_cfg = config["train"]
        self.output_dir = config["output_dir"]
        self.log = log
        self.rank, self.world_size, local_rank = distributed_context()
        self.is_main = self.rank == 0
        self.device = resolve_device(self.train_cfg["device"])
        if self.device.type == "cuda" and self.world_size > 1:
            self.device = torch.device("cuda", local_rank)
        seed_everything(int(config["seed"]), bool(self.train_cfg["deterministic"]))
        self.channels_last = bool(config["model"]["channels_last"])
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
        self.train_set = train_set
        self.val_set = val_set
        self.criterion = JointsMSELoss(use_target_weight=True)
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=[int(s) for s in self.train_cfg["lr_steps"]],
            gamma=float(self.train_cfg["lr_factor"]))
        self.amp = self.train_cfg["amp"]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "float16")
        self.sampler = ResumableSampler(len(train_set), seed=int(config["seed"]), shuffle=True,
                                        rank=self.rank, world_size=self.world_size)
        self.batch_size = int(self.train_cfg["batch_size"])
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.metrics: dict[str, Any] = {}
        self.checkpoint_path = os.path.join(self.output_dir, CHECKPOINT_NAME)
        if self.train_cfg["resume"] and os.path.isfile(self.checkpoint_path):
            self.resume(self.checkpoint_path)

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

    # ------------------------------------------------------------------ state
    def _optimizer(self) -> torch.optim.Optimizer:
        name = self.train_cfg["optimizer"]
        lr, wd = float(self.train_cfg["lr"]), float(self.train_cfg["weight_decay"])
        params = self.model.parameters()
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=wd)
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
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
        }

    def save(self, path: str | None = None) -> str | None:
        path = path or self.checkpoint_path
        if self.is_main:
            atomic_save(self.state_dict(), path)
        if self.world_size > 1:
            torch.distributed.barrier()
        return path

    def resume(self, path: str) -> None:
        state = load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.metrics = dict(state.get("metrics") or {})
        restore_rng_state(state["rng"])
        self.log(f"resumed from {path}: epoch {self.epoch}, step {self.global_step}")

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
                          pin_memory=self.device.type == "cuda")

    def _drops_last_batch(self) -> bool:
        """A trailing batch of a single sample is dropped: BatchNorm cannot train on one value
        per channel (AFF's global branch normalises N pooled 1×1 maps, so N = 1 raises).
        Any larger remainder is kept, as in the official HRNet loader."""
        return self.batch_size > 1 and self.sampler.per_rank % self.batch_size == 1

    def _steps_per_epoch(self) -> int:
        if self._drops_last_batch():
            return self.sampler.per_rank // self.batch_size
        return math.ceil(self.sampler.per_rank / self.batch_size)

    def _csv_writer(self):
        path = os.path.join(self.output_dir, "train_log.csv")
        new = not os.path.isfile(path)
        handle = open(path, "a", newline="", encoding="utf-8")
        writer = csv.writer(handle)
        if new:
            writer.writerow(["epoch", "step", "loss", "lr", "seconds"])
        return handle, writer

    def _tensorboard(self):
        if not self.train_cfg.get("tensorboard"):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:
            return None
        return SummaryWriter(os.path.join(self.output_dir, "tensorboard"))

    def train_step(self, images, targets, weights) -> float:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(self.device, non_blocking=True)
        weights = weights.to(self.device, non_blocking=True)
        with autocast_context(self.device, self.amp):
            output = self.ddp_model(images)
            if isinstance(output, (list, tuple)):
                output = output[-1]
        loss = self.criterion(output.float(), targets, weights)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite training loss {value} at epoch {self.epoch + 1}, step "
                f"{self.global_step + 1} (step {self.step_in_epoch + 1} of the epoch; both "
                "counted from 1); lower train.lr, try train.amp=null, or check the data")
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
        if self.is_main:
            os.makedirs(self.output_dir, exist_ok=True)
            dump_config(self.config, os.path.join(self.output_dir, "config.yaml"))
            csv_handle, csv_writer = self._csv_writer()
            tensorboard = self._tensorboard()
        else:
            csv_handle = csv_writer = tensorboard = None
        self.ddp_model.train()
        start = time.time()
        losses: list[float] = []
        stopped = interrupted = False
        try:
            while self.epoch < epochs and not stopped:
                loader = self._loader(self.epoch)
                steps_per_epoch = self._steps_per_epoch()
                iterator = loader
                if cfg.get("progress") and self.is_main:
                    from tqdm import tqdm

                    iterator = tqdm(loader, desc=f"epoch {self.epoch + 1}/{epochs}",
                                    initial=self.step_in_epoch, total=steps_per_epoch,
                                    leave=False, dynamic_ncols=True)
                for images, targets, weights in iterator:
                    loss = self.train_step(images, targets, weights)
                    losses.append(loss)
                    self.global_step += 1
                    self.step_in_epoch += 1
                    lr = self.optimizer.param_groups[0]["lr"]
                    if csv_writer is not None:
                        csv_writer.writerow([self.epoch, self.global_step, f"{loss:.8g}",
                                             f"{lr:.6g}", f"{time.time() - start:.2f}"])
                        csv_handle.flush()  # readable while training runs
                    if tensorboard is not None:
                        tensorboard.add_scalar("train/loss", loss, self.global_step)
                    if hasattr(iterator, "set_postfix"):
                        iterator.set_postfix(loss=f"{loss:.3e}")
                    if stop_after_steps is not None and self.global_step >= stop_after_steps:
                        interrupted = stopped = True
                        break
                    if max_steps is not None and self.global_step >= int(max_steps):
                        stopped = True  # the configured end of a short run
                        break
                    if every and self.global_step % every == 0:
                        self.save()
                if not stopped:
                    self.epoch += 1
                    self.step_in_epoch = 0
                    self.scheduler.step()
                    last = self.epoch >= epochs
                    if self.val_set is not None and self.is_main and (
                            last or (eval_every and self.epoch % eval_every == 0)):
                        self.metrics = self.evaluate()
                        if tensorboard is not None and "AP" in self.metrics:
                            tensorboard.add_scalar("val/AP", self.metrics["AP"], self.epoch)
                        self.log(f"epoch {self.epoch}: {self._metric_line(self.metrics)}")
                self.save()
        finally:
            if csv_handle is not None:
                csv_handle.close()
            if tensorboard is not None:
                tensorboard.close()
        if stopped and not interrupted and self.val_set is not None and self.is_main:
            self.metrics = self.evaluate()  # train.max_steps ended the run mid-epoch
            self.log(f"step {self.global_step}: {self._metric_line(self.metrics)}")
        if self.is_main and not interrupted:
            save_safetensors(self.model, os.path.join(self.output_dir, "model.safetensors"),
                             metadata={"name": str(self.config["model"]["name"])})
        return {"losses": losses, "metrics": self.metrics, "global_step": self.global_step,
                "checkpoint": self.checkpoint_path, "seconds": time.time() - start}

    def evaluate(self) -> dict[str, Any]:
        return evaluate_model(self.model, self.val_set, self.config, self.device,
                              output_dir=self.output_dir)

    @staticmethod
    def _metric_line(metrics: dict[str, Any]) -> str:
        if "AP" in metrics:
            return f"AP {metrics['AP']:.4f}"
        if "pckh" in metrics:
            return f"PCKh@0.5 mean {metrics['pckh']['Mean']:.2f}"
        return str(metrics)
