"""The training loop shared by every stage: accelerate (devices, mixed precision, DDP across processes launched by
``accelerate launch`` or ``torchrun``), gradient accumulation, crash-safe checkpoints, exact resume, NaN stop,
progress bar, metrics (CSV, TensorBoard), validation clips and the final export.

Determinism: every random draw of micro-batch ``m`` of optimiser step ``s`` on process ``r`` comes from a generator
seeded by ``(seed, r, s, m)``, and the data order is a function of ``(seed, epoch)``; a resumed run therefore
repeats exactly what an uninterrupted run does from the checkpoint's step on.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch

from .config import ConfigError, RunConfig
from .data import DataError

CHECKPOINT_PREFIX = "checkpoint-"
TEXT_CACHE_SIZE = 4096


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run at a step boundary, after a checkpoint of that step (``--resume`` goes on)."""


class _StopAtStepBoundary:
    """While active in a single-process run: the first SIGINT (Ctrl-C) asks the loop to stop once the current
    optimiser step is complete, so the checkpoint written then is a consistent one and no finished step is lost;
    a second SIGINT interrupts at once. Multi-process runs keep the default (their processes would not agree on
    the step to stop at): they resume from the last periodic checkpoint."""

    def __init__(self, enabled: bool, announce):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.announce, self.requested, self._previous = announce, False, None

    def __enter__(self):
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.announce("\nstopping after this step, with a checkpoint (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)
        return False


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The CPU generator of one micro-batch (see the module docstring)."""
    digest = hashlib.sha256(f"{seed}/{rank}/{step}/{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless batches of dataset indices for process ``rank`` of ``world``, starting at batch ``start``.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``; process ``r`` takes positions ``r, r + world, ...`` of
    it (the remainder that does not divide evenly is dropped, so every process sees as many samples). Batch ``b`` of
    a process is a pure function of ``b``: resuming needs only the batch count.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int, start: int = 0):
        self.per_process = size // world
        if self.per_process < 1:
            raise DataError(f"the dataset has {size} item(s), fewer than the {world} training processes")
        self.size, self.batch_size, self.rank, self.world, self.seed, self.start = size, batch_size, rank, world, seed, start
        self._epoch, self._permutation = None, None

    def indices(self, batch: int) -> list[int]:
        result = []
        for k in range(batch * self.batch_size, (batch + 1) * self.batch_size):
            epoch, position = divmod(k, self.per_process)
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._epoch, self._permutation = epoch, torch.randperm(self.size, generator=generator).tolist()
            result.append(self._permutation[self.rank + self.world * position])
        return result

    def __iter__(self):
        batch = self.start
        while True:
            yield self.indices(batch)
            batch += 1


def build_dataset(run: RunConfig):
    """The run's dataset: items ``dict(pixel_values [F, 3, H, W] in [-1, 1], caption)`` (images have F = 1)."""
    from .data import ImageTextDataset, VideoTextDataset
    from .synthetic import MovingShapes

    data = run.data
    if data.kind == "synthetic":
        return MovingShapes(num_clips=data.num_clips, frames=data.frames, size=data.size, seed=run.seed)
    if data.kind == "video":
        return VideoTextDataset(data.source, frames=data.frames, stride=data.stride, size=data.size,
                                root=data.root, seed=run.seed, skip_unreadable=data.skip_unreadable)
    return _AsSingleFrames(ImageTextDataset(data.source, size=data.size, root=data.root,
                                            skip_unreadable=data.skip_unreadable))


class _AsSingleFrames(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        item = self.images[index]
        return dict(pixel_values=item["pixel_values"][None], caption=item["caption"])


def _collate(items: list[dict]) -> dict:
    batch = {"caption": [item["caption"] for item in items]}
    for key in ("pixel_values", "latent_mean", "latent_std"):
        if key in items[0]:
            batch[key] = torch.stack([item[key] for item in items])
    return batch


def _clip_fields(data) -> dict:
    """The data settings that decide the clips themselves (the latent cache's key); not how they are used."""
    ignored = ("uncond_prob", "image_frames", "num_workers", "cache_latents", "cache_dir")
    return {k: v for k, v in data.__dict__.items() if k not in ignored}


def _random_frames(raw: dict, count: int, generator: torch.Generator) -> dict:
    """``raw`` with ``count`` frames per clip (drawn without replacement) in its per-frame tensors ``[B, F, ...]``."""
    tensors = {k: v for k, v in raw.items() if k in ("pixel_values", "latent_mean", "latent_std")}
    batch, frames = next(iter(tensors.values())).shape[:2]
    if count >= frames:
        return raw
    picks = torch.stack([torch.randperm(frames, generator=generator)[:count] for _ in range(batch)])
    rows = torch.arange(batch)[:, None]
    return {**raw, **{k: v[rows, picks] for k, v in tensors.items()}}


class LatentCache(torch.utils.data.Dataset):
    """VAE latents of every clip, encoded once: ``dataset[i] = dict(latent_mean, latent_std [F, C, h, w] fp16,
    caption)``. Stored as shards of ``SHARD`` clips in ``directory/<fingerprint>/``; the fingerprint covers the data
    config and the VAE weights, so a changed dataset or VAE gets a fresh cache. Processes encode disjoint shards."""

    SHARD = 64

    def __init__(self, dataset, vae, directory: Path, fingerprint_source: dict, accelerator, batch_size: int = 8):
        vae_digest = hashlib.sha256()
        for name, tensor in sorted(vae.state_dict().items()):
            vae_digest.update(name.encode())
            vae_digest.update(tensor.detach().float().cpu().numpy().tobytes()[:4096])
        key = json.dumps(fingerprint_source, sort_keys=True) + vae_digest.hexdigest()
        self.directory = Path(directory) / hashlib.sha256(key.encode()).hexdigest()[:16]
        self.size = len(dataset)
        shards = math.ceil(self.size / self.SHARD)
        mine = [s for s in range(shards) if s % accelerator.num_processes == accelerator.process_index
                and not self._shard_path(s).exists()]
        if mine:
            self._encode(dataset, vae, mine, accelerator, batch_size)
        accelerator.wait_for_everyone()
        self._loaded = {}

    def _shard_path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}.pt"

    @torch.no_grad()
    def _encode(self, dataset, vae, shards, accelerator, batch_size):
        from tqdm.auto import tqdm

        self.directory.mkdir(parents=True, exist_ok=True)
        device, dtype = accelerator.device, next(vae.parameters()).dtype
        progress = tqdm(total=sum(min(self.SHARD, self.size - s * self.SHARD) for s in shards),
                        desc=f"caching latents (process {accelerator.process_index})", unit="clip")
        for shard in shards:
            indices = list(range(shard * self.SHARD, min(self.size, (shard + 1) * self.SHARD)))
            means, stds, captions = [], [], []
            for start in range(0, len(indices), batch_size):
                items = [dataset[i] for i in indices[start:start + batch_size]]
                pixels = torch.stack([item["pixel_values"] for item in items]).to(device, dtype)
                distribution = vae.encode(pixels.flatten(0, 1)).latent_dist
                shape = (len(items), pixels.shape[1], *distribution.mean.shape[1:])
                means.append(distribution.mean.reshape(shape).half().cpu())
                stds.append(distribution.std.reshape(shape).half().cpu())
                captions += [item["caption"] for item in items]
                progress.update(len(items))
            temporary = self._shard_path(shard).with_suffix(".tmp")
            torch.save({"mean": torch.cat(means), "std": torch.cat(stds), "caption": captions}, temporary)
            temporary.replace(self._shard_path(shard))
        progress.close()

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        shard, offset = divmod(index, self.SHARD)
        if shard not in self._loaded:
            if len(self._loaded) > 8:
                self._loaded.pop(next(iter(self._loaded)))
            self._loaded[shard] = torch.load(self._shard_path(shard), weights_only=True)
        data = self._loaded[shard]
        return dict(latent_mean=data["mean"][offset], latent_std=data["std"][offset], caption=data["caption"][offset])


class _StateHolder:
    """Something accelerate can checkpoint (``state_dict`` / ``load_state_dict``) wrapping a dict or an object."""

    def __init__(self, get, set_):
        self._get, self._set = get, set_

    def state_dict(self):
        return self._get()

    def load_state_dict(self, state):
        self._set(state)


class Trainer:
    """Runs one stage from a :class:`RunConfig`. ``Trainer(config).train()`` returns ``{name: path}`` of what the
    stage exported into ``OUTPUT/final`` (see the stage classes), or raises :class:`TrainingDiverged`."""

    def __init__(self, run: RunConfig, resume: bool = False):
        self.run, self.resume = run, resume
        self.output_dir = Path(run.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"

    # -- setup -------------------------------------------------------------------------------------------------
    def _setup(self):
        if getattr(self, "stage", None) is None:
            self._build()

    def _build(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import ProjectConfiguration
        from diffusers.optimization import get_scheduler

        from . import models
        from .stages import build_stage

        run, train = self.run, self.run.train
        if train.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ConfigError(f"{run.origin}: train.tensorboard is true but tensorboard is not installed "
                                  "(pip install tensorboard)") from None
        # Several processes without CUDA (torchrun / accelerate launch on CPUs): accelerate needs cpu=True to
        # form a gloo process group instead of running each process alone.
        cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        # accelerate keeps its precision settings process-wide; a second run in one process (several stages from
        # Python) may ask for other ones. The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        self.accelerator = accelerator = Accelerator(
            cpu=cpu_processes, mixed_precision=train.mixed_precision, log_with="tensorboard" if train.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "logs")))
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(train.mixed_precision, torch.float32)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.raw_dataset = dataset = build_dataset(run)  # data errors surface before any model is built
        self.parts = parts = models.load_components(run.model, video=run.is_video, seed=run.seed,
                                                    work_dir=self.output_dir, torch_dtype=None)
        device = accelerator.device
        for name in ("vae", "text_encoder"):
            models.cast(parts[name].to(device), self.weight_dtype)
        self.stage = stage = build_stage(run, parts, self.weight_dtype)
        stage.dataset = dataset
        if not stage.trainable_parameters():
            raise ConfigError(f"{run.origin}: stage {run.stage} has nothing to train with this configuration")
        if train.gradient_checkpointing:
            stage.enable_gradient_checkpointing()
        if stage.teacher is not None:
            stage.teacher.to(device)
        if run.data.cache_latents:
            dataset = LatentCache(dataset, parts["vae"], Path(run.data.cache_dir or self.output_dir / "latent_cache"),
                                  {**_clip_fields(run.data), "seed": run.seed}, accelerator)
        self.dataset = dataset
        optimizer = torch.optim.AdamW(stage.trainable_parameters(), lr=train.learning_rate,
                                      betas=(train.adam_beta1, train.adam_beta2),
                                      weight_decay=train.adam_weight_decay, eps=train.adam_epsilon)
        try:
            self.lr_scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=train.lr_warmup_steps,
                                              num_training_steps=train.max_steps)
        except ValueError as error:
            raise ConfigError(f"{run.origin}: train.lr_scheduler: {error}") from None
        self.student, self.optimizer = accelerator.prepare(stage.student, optimizer)
        self.step = 0
        accelerator.register_for_checkpointing(self.lr_scheduler)
        accelerator.register_for_checkpointing(_StateHolder(lambda: {"step": self.step}, self._set_step))
        if stage.ema is not None:
            accelerator.register_for_checkpointing(stage.ema)
        accelerator.register_save_state_pre_hook(self._save_trainable)
        accelerator.register_load_state_pre_hook(self._load_trainable)
        self._text_cache = {}

    def _set_step(self, state):
        self.step = int(state["step"])

    def _save_trainable(self, models_, weights, output_dir):
        """Checkpoints hold the trainable parameters only (a LoRA, motion modules, an adapter), not the frozen
        base, so they stay small."""
        from safetensors.torch import save_file

        weights.clear()
        if self.accelerator.is_main_process:
            state = {n: p.detach().contiguous().cpu() for n, p in self.stage.student.named_parameters()
                     if p.requires_grad}
            save_file(state, os.path.join(output_dir, "trainable.safetensors"))

    def _load_trainable(self, models_, input_dir):
        from safetensors.torch import load_file

        models_.clear()
        state = load_file(os.path.join(input_dir, "trainable.safetensors"))
        parameters = dict(self.stage.student.named_parameters())
        expected = {n for n, p in parameters.items() if p.requires_grad}
        if set(state) != expected:
            raise ConfigError(f"{input_dir}: the checkpoint trains other parameters than this configuration "
                              f"({len(state)} vs {len(expected)} tensors); resume with the config it was made with")
        with torch.no_grad():
            for name, value in state.items():
                parameters[name].copy_(value)

    # -- data --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_text(self, captions: list[str]) -> torch.Tensor:
        """Prompt embeddings ``[len(captions), L, D]``; up to ``TEXT_CACHE_SIZE`` distinct captions are kept."""
        tokenizer, text_encoder = self.parts["tokenizer"], self.parts["text_encoder"]
        missing = [c for c in dict.fromkeys(captions) if c not in self._text_cache]
        encoded = {}
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.accelerator.device)
            encoded = dict(zip(missing, text_encoder(ids)[0]))
            if len(self._text_cache) + len(encoded) <= TEXT_CACHE_SIZE:
                self._text_cache.update(encoded)
        return torch.stack([self._text_cache[c] if c in self._text_cache else encoded[c] for c in captions])

    @torch.no_grad()
    def _prepare_batch(self, raw: dict, generator: torch.Generator) -> dict:
        """Latents ``[B, C, F, h, w]`` (video stages) or ``[B*F, C, h, w]`` (image stages), and the conditions;
        for stages that train on pixels, only ``pixels [B*F, 3, H, W]``."""
        device, vae = self.accelerator.device, self.parts["vae"]
        if not self.stage.video and self.run.data.image_frames:
            raw = _random_frames(raw, self.run.data.image_frames, generator)
        if not self.stage.uses_latents:
            return {"pixels": raw["pixel_values"].to(device, self.weight_dtype).flatten(0, 1)}
        if "latent_mean" in raw:
            mean, std = raw["latent_mean"].float(), raw["latent_std"].float()
        else:
            pixels = raw["pixel_values"].to(device, self.weight_dtype)
            distribution = vae.encode(pixels.flatten(0, 1)).latent_dist
            mean = distribution.mean.float().reshape(*pixels.shape[:2], *distribution.mean.shape[1:])
            std = distribution.std.float().reshape(mean.shape)
        noise = torch.randn(mean.shape, generator=generator)
        latents = (mean.cpu() + std.cpu() * noise).to(device) * vae.config.scaling_factor
        batch_size, frames = latents.shape[:2]
        text = self._encode_text(raw["caption"]).float()
        empty = self._encode_text([""]).float().expand_as(text)
        if self.run.caption_drop_probability > 0:
            drop = torch.rand(batch_size, generator=generator) < self.run.caption_drop_probability
            text = torch.where(drop.to(device)[:, None, None], empty, text)
        if self.stage.video:
            latents = latents.permute(0, 2, 1, 3, 4).contiguous()
        else:
            latents = latents.flatten(0, 1)
            text, empty = text.repeat_interleave(frames, 0), empty.repeat_interleave(frames, 0)
        batch = {"latents": latents, "condition": {"text": text}, "uncondition": {"text": empty}}
        if "pixel_values" in raw:
            batch["pixels"] = raw["pixel_values"].to(device)
        return batch

    @torch.no_grad()
    def evaluate(self, batches: int = 4, seed: int = 12345) -> float:
        """Mean loss of the current networks over ``batches`` fixed micro-batches (the first items of the data
        order, random draws from ``seed``): the same numbers before and after training, so progress shows through
        the noise of the training loss. Builds the run if :meth:`train` has not."""
        self._setup()
        sampler = ResumableBatchSampler(len(self.dataset), self.run.train.batch_size, self.accelerator.process_index,
                                        self.accelerator.num_processes, self.run.seed)
        was_training = self.stage.student.training
        self.stage.student.eval()
        total = 0.0
        for index in range(batches):
            generator = step_generator(seed, self.accelerator.process_index, -1, index)
            raw = _collate([self.dataset[i] for i in sampler.indices(index)])
            with self.accelerator.autocast():
                total += float(self.stage.loss(self.stage.student, self._prepare_batch(raw, generator), generator))
        self.stage.student.train(was_training)
        return total / batches

    # -- checkpoints -------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints of this run, oldest first."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = [p for p in self.checkpoint_dir.iterdir()
                 if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))

    def _save_checkpoint(self):
        accelerator = self.accelerator
        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        temporary = self.checkpoint_dir / f".{final.name}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (temporary / "run_config.json").write_text(json.dumps(self.run.to_dict(), indent=1))
            if final.exists():
                shutil.rmtree(final)
            temporary.rename(final)
            for old in self.checkpoints()[:-self.run.train.checkpoints_kept]:
                shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def _restore(self):
        found = self.checkpoints()
        if not found:
            self.accelerator.print(f"--resume: no checkpoint in {self.checkpoint_dir}; starting from step 0")
            return
        latest = found[-1]
        saved = json.loads((latest / "run_config.json").read_text())
        if saved["stage"] != self.run.stage:
            raise ConfigError(f"{latest}: a checkpoint of stage {saved['stage']}, but this run is {self.run.stage}")
        self.accelerator.load_state(str(latest))
        changed = _changed_settings(saved, self.run.to_dict())
        self.accelerator.print(f"resumed from {latest} (step {self.step})" + (
            "; settings changed since that checkpoint (the run goes on with the new ones, so it will not match an "
            "uninterrupted run): " + ", ".join(changed) if changed else ""))

    # -- logging -----------------------------------------------------------------------------------------------
    def _open_metrics(self):
        path = self.output_dir / "metrics.csv"
        fields = ["step", "loss", "lr", "grad_norm", "seconds", "samples_per_second"]
        rows = []
        if path.exists():
            with path.open(newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= self.step]
        handle = path.open("w", newline="")
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        handle.flush()
        return handle, writer

    # -- main loop ---------------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run the stage to ``train.max_steps`` (from its latest checkpoint with ``resume``); returns what
        ``final/`` holds, by name."""
        self._setup()
        oneDNN = contextlib.nullcontext()
        if (self.accelerator.device.type == "cpu" and self.run.train.mixed_precision == "bf16"
                and torch.backends.mkldnn.enabled and onednn_bf16_weight_gradients_are_wrong()):
            self.accelerator.print(
                "NOTE: this PyTorch's oneDNN computes wrong, run-to-run different bfloat16 weight gradients for "
                "strided convolutions with one-pixel outputs (a downsampler at a small latent); training runs with "
                "PyTorch's own CPU convolutions instead (slower; or use mixed_precision: no on the CPU)")
            oneDNN = torch.backends.mkldnn.flags(enabled=False)
        with oneDNN:
            return self._train()

    def _train(self) -> dict:
        from tqdm.auto import tqdm

        run, train, accelerator = self.run, self.run.train, self.accelerator
        if self.resume:
            self._restore()
        elif self.checkpoints():
            raise ConfigError(f"{self.checkpoint_dir} already holds checkpoints: pass --resume to continue that "
                              "run, or choose another output_dir")
        if accelerator.is_main_process:
            import yaml

            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
        if train.tensorboard:
            accelerator.init_trackers(run.stage)
        per_step = train.batch_size * train.gradient_accumulation
        sampler = ResumableBatchSampler(len(self.dataset), train.batch_size, accelerator.process_index,
                                        accelerator.num_processes, run.seed, start=self.step * train.gradient_accumulation)
        loader = iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=_collate,
                                                  num_workers=run.data.num_workers))
        metrics_handle, metrics = self._open_metrics() if accelerator.is_main_process else (None, None)
        progress = tqdm(total=train.max_steps, initial=self.step, desc=run.stage, unit="step",
                        disable=not (accelerator.is_main_process and train.progress))
        if run.validation.every and self.step == 0:
            self._validate()
        started = time.perf_counter()
        stop = _StopAtStepBoundary(accelerator.num_processes == 1, accelerator.print)
        try:
            with stop:
                self._steps(stop, loader, metrics, metrics_handle, progress, per_step)
        finally:
            progress.close()
            if metrics_handle is not None:
                metrics_handle.close()
        if stop.requested:
            if not (self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{self.step}").exists():
                self._save_checkpoint()
            raise TrainingInterrupted(f"{run.stage}: interrupted after step {self.step}; checkpoint "
                                      f"{self.checkpoint_dir / f'{CHECKPOINT_PREFIX}{self.step}'} holds it (go on "
                                      "with --resume)")
        self._save_checkpoint()
        outputs = self._export()
        if train.tensorboard:
            accelerator.end_training()
        accelerator.print(f"{run.stage}: {self.step} steps on {accelerator.num_processes} process(es) "
                          f"({accelerator.device}) in {time.perf_counter() - started:.1f} s; "
                          f"outputs in {self.output_dir / 'final'}")
        return outputs

    def _steps(self, stop, loader, metrics, metrics_handle, progress, per_step):
        """Optimiser steps until ``train.max_steps``, or until ``stop`` is requested at a step boundary."""
        run, train, accelerator = self.run, self.run.train, self.accelerator
        while self.step < train.max_steps and not stop.requested:
            tick = time.perf_counter()
            loss_sum = 0.0
            self.student.train()
            for micro in range(train.gradient_accumulation):
                generator = step_generator(run.seed, accelerator.process_index, self.step, micro)
                batch = self._prepare_batch(next(loader), generator)
                last = micro == train.gradient_accumulation - 1
                context = accelerator.no_sync(self.student) if not last else contextlib.nullcontext()
                with context, accelerator.autocast():
                    loss = self.stage.loss(self.student, batch, generator) / train.gradient_accumulation
                self._check_finite(loss)
                accelerator.backward(loss)
                loss_sum += loss.detach().float()
            grad_norm = accelerator.clip_grad_norm_(self.stage.trainable_parameters(), train.max_grad_norm) \
                if train.max_grad_norm > 0 else torch.tensor(float("nan"))
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.stage.after_optimizer_step()
            self.step += 1
            mean_loss = accelerator.reduce(torch.as_tensor(loss_sum, device=accelerator.device), "mean").item()
            seconds = time.perf_counter() - tick
            lr = self.lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if accelerator.is_main_process and self.step % train.log_every == 0:
                metrics.writerow(dict(step=self.step, loss=f"{mean_loss:.6g}", lr=f"{lr:.6g}",
                                      grad_norm=f"{float(grad_norm):.6g}", seconds=f"{seconds:.4f}",
                                      samples_per_second=f"{per_step * accelerator.num_processes / seconds:.3f}"))
                metrics_handle.flush()
            if train.tensorboard:
                accelerator.log({"loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm)}, step=self.step)
            if train.checkpoint_every and self.step % train.checkpoint_every == 0 and self.step < train.max_steps:
                self._save_checkpoint()
            if run.validation.every and self.step % run.validation.every == 0:
                self._validate()

    def _check_finite(self, loss):
        finite = torch.isfinite(loss.detach()).float()
        if self.accelerator.reduce(finite, "sum").item() < self.accelerator.num_processes:
            last = self.checkpoints()
            raise TrainingDiverged(
                f"{self.run.stage}: the loss is not finite at step {self.step + 1}; stopped before the update. "
                f"Last good checkpoint: {last[-1] if last else 'none'} (resume from it with --resume after lowering "
                "train.learning_rate, using mixed_precision: no or bf16, or checking the data)")

    def _export(self) -> dict:
        accelerator = self.accelerator
        final = self.output_dir / "final"
        outputs = {}
        if accelerator.is_main_process:
            temporary = self.output_dir / ".final.tmp"
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            written = self.stage.export(temporary)
            (temporary / "config.yaml").write_text((self.output_dir / "config.yaml").read_text())
            if final.exists():
                shutil.rmtree(final)
            temporary.rename(final)
            outputs = {name: final / Path(path).relative_to(temporary) for name, path in written.items()}
        accelerator.wait_for_everyone()
        return outputs

    def _validate(self):
        if not self.accelerator.is_main_process:
            return
        from .validation import write_validation

        write_validation(self, self.output_dir / "validation" / f"step-{self.step:06d}")


def onednn_bf16_weight_gradients_are_wrong() -> bool:
    """Whether this process's oneDNN gets the bfloat16 weight gradient of a strided 3x3 convolution with a
    one-pixel output wrong. Measured with torch 2.13 on an AMD EPYC (Zen 4, AVX-512 BF16): under CPU autocast,
    ``conv2d(x [2, 32, 1, 1], w [32, 32, 3, 3], stride=2, padding=1)``'s weight gradient differed from run to run,
    up to 1e37, for inputs one pixel high or wide; PyTorch's own kernels (oneDNN off) gave the float32 answer to
    bfloat16 rounding. A tiny UNet's deepest downsampler at 32-pixel images sees such an input. The probe runs that
    convolution a few times (milliseconds)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 1, 1, generator=generator)
    weight = torch.randn(32, 32, 3, 3, generator=generator, requires_grad=True)
    (expected,) = torch.autograd.grad(torch.nn.functional.conv2d(x, weight, stride=2, padding=1).sum(), weight)
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.nn.functional.conv2d(x, weight, stride=2, padding=1)
        (got,) = torch.autograd.grad(out.float().sum(), weight)
        if not torch.allclose(got, expected, rtol=0.05, atol=0.05 * expected.abs().max().item()):
            return True
    return False


# Learning-rate schedules whose rates do not depend on train.max_steps (diffusers' get_scheduler names).
STEP_COUNT_FREE_SCHEDULES = ("constant", "constant_with_warmup", "piecewise_constant")


def _changed_settings(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each setting (dotted key) that differs between two run configs' dicts. Another
    ``train.max_steps``, what resuming is mostly for, is listed only where the learning-rate schedule spans it (a
    decaying one: the rates from the checkpoint on follow the new length, so neither run length's would match)."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(old, dict) and isinstance(new, dict):
            changes += _changed_settings(old, new, f"{name}.")
        elif old != new and name == "train.max_steps":
            if current.get("lr_scheduler") not in STEP_COUNT_FREE_SCHEDULES:
                changes.append(f"{name}: {old!r} -> {new!r} (the {current.get('lr_scheduler')} learning-rate "
                               "schedule now spans the new length)")
        elif old != new and name != "output_dir":
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


def train(config, overrides: dict | None = None, resume: bool = False) -> dict:
    """Python API: run one stage from a YAML path, a dict or a :class:`RunConfig` (``overrides`` as in
    :func:`~animatelcm.training.config.load_config`). Returns the exported files ``{name: path}``."""
    from .config import load_config

    run = config if isinstance(config, RunConfig) else load_config(config, overrides)
    return Trainer(run, resume=resume).train()
