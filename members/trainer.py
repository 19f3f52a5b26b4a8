"""One Lightning Fabric loop for every member.

``FabricTrainer.fit`` trains a trainable member: precision (``32-true``, ``bf16-mixed``,
``16-mixed``), gradient accumulation, accelerator and devices, the member's optimizer and
scheduler, epochs or steps, a validation hook, per-step and per-epoch history in CSV, a progress
bar on rank 0, a checkpoint every N optimizer steps and an exact ``resume``.

``FabricTrainer.gather`` runs a feature pass for feature members: every rank takes the samples
``rank, rank + world, ...`` of the dataset, and the outputs come back concatenated in dataset
order on every rank, so a memory bank built on two processes equals the one built on one.
``gather_to_zero`` brings them to rank 0 alone, for work done once there (PatchCore's coreset),
whose result ``broadcast_tensor`` shares with the other ranks.

Exact resume: the sample order of epoch ``e`` is drawn from ``seed + e`` (not from a global
random state), checkpoints are taken after optimizer steps only, and they carry the model,
optimizer, scheduler, the random states and the position inside the epoch.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric import Fabric
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from artifacts.io import (
    atomic_torch_save,
    atomic_write_csv,
    fault_point,
    torch_load,
)

log = logging.getLogger(__name__)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "32", "bf16-true", "64-true")
CHECKPOINT_NAME = "last.ckpt"


class ShardedEpochSampler(Sampler[int]):
    """Indices ``rank::world`` of a permutation drawn from ``seed + epoch`` (or of the identity).

    ``pad=True`` repeats leading indices so every rank gets the same count (needed for DDP
    training, where ranks must step together); ``pad=False`` gives each sample exactly once over
    all ranks (needed for feature collection). ``start`` skips that many samples of this rank's
    shard, for resuming inside an epoch.
    """

    def __init__(
        self, size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1, pad: bool = True
    ) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world, self.pad = rank, world, pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _shard(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.world > 1:
            total = math.ceil(self.size / self.world) * self.world
            order = order + order[: total - self.size]
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self._shard()) - self.start)


def launched_as_rank_zero() -> bool:
    """Whether this process is rank 0 of a distributed run, or a process on its own, by what
    launchers put in its environment: ``RANK`` (torchrun), ``SLURM_PROCID``, or ``NODE_RANK``
    and ``LOCAL_RANK`` (set by Fabric for the processes it starts). Known before Fabric
    launches: the process that will start the other ranks has none of them."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name):
            return int(os.environ[name]) == 0
    return all(int(os.environ.get(name) or 0) == 0 for name in ("NODE_RANK", "LOCAL_RANK"))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class FabricTrainer:
    """The shared training loop and feature pass.

    Args:
        accelerator, devices, strategy, num_nodes, precision: passed to ``Fabric``.
        max_epochs: epochs to train; ``max_steps`` (optimizer steps), if set, stops earlier.
        accumulate_grad_batches: micro-batches per optimizer step.
        gradient_clip_val: max gradient norm, or None.
        val_every_n_epochs: run the validation hook every N epochs (0: never).
        checkpoint_every_n_steps: write ``out_dir/checkpoints/last.ckpt`` every N optimizer steps
            (0: only at the end of each epoch when ``out_dir`` is set).
        out_dir: where ``history.csv`` and checkpoints go; None keeps history in memory only.
        resume: False, True (continue from ``out_dir/checkpoints/last.ckpt`` if it exists) or a
            checkpoint path.
        progress: show a progress bar on rank 0.
        seed: seeds everything, and the per-epoch sample order.
    """

    def __init__(
        self,
        accelerator: str = "cpu",
        devices: int | str = 1,
        strategy: str = "auto",
        num_nodes: int = 1,
        precision: str = "32-true",
        max_epochs: int = 1,
        max_steps: int | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        val_every_n_epochs: int = 1,
        checkpoint_every_n_steps: int = 0,
        out_dir: str | os.PathLike | None = None,
        resume: bool | str | os.PathLike = False,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        for key, value in (
            ("max_epochs", max_epochs),
            ("accumulate_grad_batches", accumulate_grad_batches),
        ):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
        self.fabric = Fabric(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            precision=precision,
        )
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.val_every_n_epochs = val_every_n_epochs
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume = resume
        self.progress = progress
        self.seed = seed
        self.history: list[dict[str, Any]] = []
        self._launched = False

    # --- distributed helpers ---------------------------------------------------------------

    def launch(self) -> None:
        """Start the other processes (DDP); idempotent."""
        if not self._launched:
            self.fabric.launch()
            self._launched = True

    @property
    def is_global_zero(self) -> bool:
        return self.fabric.is_global_zero

    def _loader(
        self, loader: DataLoader, shuffle: bool, pad: bool
    ) -> tuple[DataLoader, ShardedEpochSampler]:
        if not isinstance(loader, DataLoader):
            raise TypeError(f"expected a torch DataLoader, got {type(loader).__name__}")
        sampler = ShardedEpochSampler(
            len(loader.dataset),
            shuffle=shuffle,
            seed=self.seed,
            rank=self.fabric.global_rank,
            world=self.fabric.world_size,
            pad=pad,
        )
        rebuilt = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            drop_last=loader.drop_last,
            pin_memory=loader.pin_memory,
        )
        # A plain loader (batches are moved with ``fabric.to_device``): Fabric's wrapper creates
        # the underlying iterator lazily, which would draw from the global generator after a
        # resume restored it.
        return rebuilt, sampler

    def _feature_pass(
        self, fn: Callable[[dict[str, Any]], torch.Tensor], loader: DataLoader
    ) -> torch.Tensor:
        """This rank's outputs of ``fn`` over its shard of ``loader``'s dataset."""
        self.launch()
        shard_loader, _ = self._loader(loader, shuffle=False, pad=False)
        outputs = []
        with torch.no_grad(), self.fabric.autocast():
            for batch in tqdm(
                shard_loader, desc="features", disable=not (self.progress and self.is_global_zero)
            ):
                outputs.append(fn(self.fabric.to_device(batch)).float())
        if not outputs:
            raise ValueError("the feature pass got no samples: the dataset is empty")
        return torch.cat(outputs)

    def _padded(self, local: torch.Tensor, size: int) -> torch.Tensor:
        """``local`` padded to the longest shard's length: collectives need equal shapes."""
        per_rank = math.ceil(size / self.fabric.world_size)
        padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        return padded

    @staticmethod
    def _in_dataset_order(shards: list[torch.Tensor], size: int) -> torch.Tensor:
        """The padded shards of every rank (rank ``r`` holds samples ``r, r + world, ...``)
        put back into dataset order."""
        world, first = len(shards), shards[0]
        result = torch.empty((size, *first.shape[1:]), dtype=first.dtype, device=first.device)
        for rank in range(world):
            result[rank::world] = shards[rank][: len(range(rank, size, world))]
        return result

    def gather(
        self, fn: Callable[[dict[str, Any]], torch.Tensor], loader: DataLoader
    ) -> torch.Tensor:
        """``fn(batch) -> [b, ...]`` over every sample once, sharded over ranks; returns the
        outputs of the whole dataset concatenated in dataset order, on every rank."""
        local = self._feature_pass(fn, loader)
        if self.fabric.world_size == 1:
            return local
        size = len(loader.dataset)
        gathered = self.fabric.all_gather(self._padded(local, size))  # [world, per_rank, ...]
        return self._in_dataset_order(list(gathered), size)

    def gather_to_zero(
        self, fn: Callable[[dict[str, Any]], torch.Tensor], loader: DataLoader
    ) -> torch.Tensor | None:
        """As ``gather``, but the whole dataset's outputs come back on rank 0 only (None on
        the others): work done once, on rank 0, needs no copy of them on every rank."""
        local = self._feature_pass(fn, loader)
        if self.fabric.world_size == 1:
            return local
        size = len(loader.dataset)
        padded = self._padded(local, size)
        zero = self.is_global_zero
        shards = [torch.empty_like(padded) for _ in range(self.fabric.world_size)] if zero else None
        torch.distributed.gather(padded, shards, dst=0)
        return self._in_dataset_order(shards, size) if zero else None

    def broadcast_tensor(self, tensor: torch.Tensor | None) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank, on this rank's device (the others pass None)."""
        if self.fabric.world_size == 1:
            return tensor
        zero = self.is_global_zero
        shape, dtype = self.fabric.broadcast((tuple(tensor.shape), tensor.dtype) if zero else None)
        device = self.fabric.device
        if zero:
            buffer = tensor.to(device).contiguous()
        else:
            buffer = torch.empty(shape, dtype=dtype, device=device)
        torch.distributed.broadcast(buffer, src=0)
        return buffer

    def accumulate(
        self, fn: Callable[[dict[str, Any]], dict[str, torch.Tensor]], loader: DataLoader
    ) -> dict[str, torch.Tensor]:
        """Sum ``fn(batch)`` (a dict of tensors) over every sample once, sharded over ranks and
        summed over them: statistics in bounded memory, whatever the dataset size."""
        self.launch()
        shard_loader, _ = self._loader(loader, shuffle=False, pad=False)
        totals: dict[str, torch.Tensor] = {}
        with torch.no_grad(), self.fabric.autocast():
            for batch in tqdm(
                shard_loader, desc="statistics", disable=not (self.progress and self.is_global_zero)
            ):
                for key, value in fn(self.fabric.to_device(batch)).items():
                    totals[key] = totals[key] + value if key in totals else value.clone()
        if not totals:
            raise ValueError("the statistics pass got no samples: the dataset is empty")
        return {key: self.all_reduce_sum(value) for key, value in totals.items()}

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (itself on one process)."""
        if self.fabric.world_size == 1:
            return tensor
        return self.fabric.all_reduce(tensor, reduce_op="sum")

    # --- training --------------------------------------------------------------------------

    def _checkpoint_path(self) -> Path | None:
        if isinstance(self.resume, (str, os.PathLike)) and not isinstance(self.resume, bool):
            return Path(self.resume)
        if self.out_dir is None:
            return None
        return self.out_dir / "checkpoints" / CHECKPOINT_NAME

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint ``fit`` will continue from, or None when it starts afresh."""
        path = self._checkpoint_path()
        return path if self.resume and path is not None and path.is_file() else None

    def fit(
        self,
        member: torch.nn.Module,
        train_loader: DataLoader,
        val_loader: DataLoader | None = None,
    ) -> list[dict[str, Any]]:
        """Train ``member`` and return the history rows (also written to ``history.csv``)."""
        self.launch()
        fabric = self.fabric
        fabric.seed_everything(self.seed, verbose=False)
        opt_cfg = member.configure_optimizers()
        if isinstance(opt_cfg, torch.optim.Optimizer):
            opt_cfg = {"optimizer": opt_cfg}
        scheduler = opt_cfg.get("scheduler")
        interval = opt_cfg.get("interval", "epoch")
        model, optimizer = fabric.setup(member, opt_cfg["optimizer"])
        model.mark_forward_method("training_step")
        model.mark_forward_method("validation_step")
        loader, sampler = self._loader(train_loader, shuffle=_shuffles(train_loader), pad=True)

        epoch, step, batch_in_epoch = 0, 0, 0
        resumed_rng = None
        self.history = []
        ckpt_path = self._checkpoint_path()
        if self.resume_checkpoint() is not None:
            state = torch_load(ckpt_path)
            member.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scheduler is not None and state.get("scheduler") is not None:
                scheduler.load_state_dict(state["scheduler"])
            epoch, step, batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
            self.history = list(state["history"])
            resumed_rng = state["rng"]
            if fabric.is_global_zero:
                log.info("resuming from %s (epoch %d, step %d)", ckpt_path, epoch + 1, step)
        elif self.resume and not isinstance(self.resume, bool):
            raise FileNotFoundError(f"resume checkpoint not found: {ckpt_path}")

        def save_checkpoint() -> None:
            if ckpt_path is None:
                return
            state = {
                "model": member.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "epoch": epoch,
                "step": step,
                "batch_in_epoch": batch_in_epoch,
                "history": self.history,
                "rng": _rng_state(),
            }
            if fabric.is_global_zero:
                atomic_torch_save(state, ckpt_path)
            fabric.barrier()

        accumulate = self.accumulate_grad_batches
        done = self.max_steps is not None and step >= self.max_steps
        while epoch < self.max_epochs and not done:
            sampler.set_epoch(epoch, start=batch_in_epoch * (train_loader.batch_size or 1))
            n_batches = batch_in_epoch + len(loader)
            model.train()
            epoch_losses: list[float] = []
            started = time.perf_counter()
            bar = tqdm(
                total=n_batches,
                initial=batch_in_epoch,
                desc=f"{_name(member)} epoch {epoch + 1}/{self.max_epochs}",
                disable=not (self.progress and fabric.is_global_zero),
                leave=False,
            )
            # Creating the iterator draws from the global generator. A checkpoint taken inside
            # an epoch was taken after that draw, one taken at an epoch's end before it.
            if resumed_rng is not None and batch_in_epoch == 0:
                _set_rng_state(resumed_rng)
            batches = iter(loader)
            if resumed_rng is not None and batch_in_epoch > 0:
                _set_rng_state(resumed_rng)
            resumed_rng = None
            for batch in batches:
                batch = fabric.to_device(batch)
                batch_in_epoch += 1
                is_last = batch_in_epoch == n_batches
                stepping = batch_in_epoch % accumulate == 0 or is_last
                with fabric.no_backward_sync(model, enabled=not stepping):
                    out = model.training_step(batch)
                    loss = out["loss"] if isinstance(out, dict) else out
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {step}"
                        )
                    fabric.backward(loss / accumulate)
                epoch_losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4g}")
                if not stepping:
                    continue
                if self.gradient_clip_val:
                    fabric.clip_gradients(model, optimizer, max_norm=self.gradient_clip_val)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if scheduler is not None and interval == "step":
                    scheduler.step()
                row = {"scope": "step", "epoch": epoch, "step": step, "loss": loss.item()}
                row["lr"] = optimizer.param_groups[0]["lr"]
                if isinstance(out, dict):
                    row.update({k: float(v) for k, v in out.items() if k != "loss"})
                self.history.append(row)
                if self.checkpoint_every_n_steps and step % self.checkpoint_every_n_steps == 0:
                    save_checkpoint()
                fault_point(f"train_step_{step}")
                if self.max_steps is not None and step >= self.max_steps:
                    done = True
                    break
            bar.close()
            if done and batch_in_epoch < n_batches:
                # Stopped by max_steps inside the epoch: keep the position for a resume.
                save_checkpoint()
                break
            if scheduler is not None and interval == "epoch":
                scheduler.step()
            row = {
                "scope": "epoch",
                "epoch": epoch,
                "step": step,
                "loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
            }
            if (
                val_loader is not None
                and self.val_every_n_epochs
                and (epoch + 1) % self.val_every_n_epochs == 0
            ):
                row.update(self._validate(model, val_loader))
            self.history.append(row)
            epoch += 1
            batch_in_epoch = 0
            if self.out_dir is not None:
                save_checkpoint()
                self.write_history()
        self.write_history()
        return self.history

    def _validate(self, model: Any, val_loader: DataLoader) -> dict[str, float]:
        model.eval()
        sums: dict[str, float] = {}
        count = 0
        with torch.no_grad():
            for batch in val_loader:
                out = model.validation_step(self.fabric.to_device(batch))
                for key, value in out.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                count += 1
        model.train()
        return {key: value / max(count, 1) for key, value in sums.items()}

    def write_history(self) -> Path | None:
        """Write ``history.csv`` (one row per optimizer step and per epoch) on rank 0."""
        if self.out_dir is None or not self.fabric.is_global_zero:
            return None
        return atomic_write_csv(self.out_dir / "history.csv", self.history)


def _name(member: torch.nn.Module) -> str:
    return getattr(member, "member_name", type(member).__name__)


def _shuffles(loader: DataLoader) -> bool:
    return isinstance(loader.sampler, torch.utils.data.RandomSampler)
