"""Evaluation of text-to-video models on the moving-shapes world (issue 6), reusable on any model that makes
clips of the prompts ``"a {colour} {shape} moving {direction}"``:

- FVD analogue: Frechet distance between features of real and generated clips, from :class:`AttributeNet`, a small
  video network trained on real clips to recognise colour, shape and direction;
- CLIPSIM analogue: that network's accuracy on the prompted attributes of the generated clips;
- teacher fidelity: mean squared error (pixels in [-1, 1]) to a reference sample from the same initial noise
  (the teacher's 50-step DDIM sample);
- real FVD: Frechet distance of I3D features when the user supplies an I3D TorchScript file (:func:`i3d_features`);
- motion: whether the shape glides as one object (:func:`motion_metrics`: displacement and straightness of the
  track of the saturated pixels), whatever its direction;
- flicker: whether the frames keep the shape's colour and the background (:func:`frame_consistency`).

Clips are ``[B, F, 3, H, W]`` floats in [-1, 1] (the datasets' ``pixel_values`` layout). ``animatelcm eval`` is
the command-line front end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from .training.synthetic import COLOURS, COMBINATIONS, DIRECTIONS, SHAPES, MovingShapes, caption

ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "direction": DIRECTIONS}


class AttributeNet(nn.Module):
    """Spatio-temporal conv net: ``forward(clips [B, F, 3, H, W]) -> {attribute: logits [B, n]}``;
    ``features(clips) -> [B, feature_dim]`` (the FVD-analogue embedding)."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim)

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(block(3, width, (1, 2, 2)), block(width, width, (2, 2, 2)),
                                  block(width, 2 * width, (2, 2, 2)), block(2 * width, 2 * width, (1, 2, 2)))
        self.project = nn.Linear(2 * width, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.dim() != 5 or clips.shape[2] != 3:
            raise ValueError(f"AttributeNet expects clips [B, F, 3, H, W], got {tuple(clips.shape)}")
        x = self.body(clips.permute(0, 2, 1, 3, 4).float())
        return self.project(x.mean(dim=(2, 3, 4)))

    def forward(self, clips: torch.Tensor) -> dict:
        features = torch.nn.functional.silu(self.features(clips))
        return {name: head(features) for name, head in self.heads.items()}


def attribute_labels(dataset, indices) -> dict:
    """``{attribute: int64 [len(indices)]}`` for clips of a :class:`MovingShapes` dataset."""
    triples = [dataset.attributes(i) for i in indices]
    return {name: torch.tensor([ATTRIBUTES[name].index(t[k]) for t in triples])
            for k, name in enumerate(ATTRIBUTES)}


def train_attribute_net(dataset, steps: int = 300, batch_size: int = 16, learning_rate: float = 2e-3,
                        seed: int = 0, progress: bool = True) -> AttributeNet:
    """Train an :class:`AttributeNet` on clips of ``dataset`` (a MovingShapes) with cross-entropy on the three
    attributes."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    net = AttributeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="attribute net", disable=not progress):
        indices = torch.randint(0, len(dataset), (batch_size,), generator=generator).tolist()
        clips = torch.stack([dataset[i]["pixel_values"] for i in indices])
        labels = attribute_labels(dataset, indices)
        logits = net(clips)
        loss = sum(nn.functional.cross_entropy(logits[name], labels[name]) for name in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def attribute_accuracy(net: AttributeNet, clips: torch.Tensor, labels: dict, batch_size: int = 32) -> dict:
    """Fraction of ``clips`` whose predicted attribute equals ``labels[attribute]`` (int64 ``[B]``), per attribute
    given; the CLIPSIM analogue when ``labels`` are the prompted attributes of generated clips."""
    predictions = {name: [] for name in labels}
    for part in clips.split(batch_size):
        logits = net(part)
        for name in labels:
            predictions[name].append(logits[name].argmax(dim=1))
    return {name: (torch.cat(predictions[name]) == labels[name]).float().mean().item() for name in labels}


@torch.no_grad()
def clip_features(net: AttributeNet, clips: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``[B, feature_dim]`` float64 features of ``clips``."""
    return torch.cat([net.features(part).double() for part in clips.split(batch_size)])


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (FVD's formula), in float64."""
    if features_a.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with one D; got {tuple(features_a.shape)} and "
                         f"{tuple(features_b.shape)}")
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrt_psd(matrix):
        values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
        return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T

    root_a = sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def teacher_fidelity(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error between samples and the teacher's reference samples from the same noise."""
    if samples.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(samples.shape)} vs {tuple(reference.shape)}")
    return float((samples.float() - reference.float()).pow(2).mean())


def save_attribute_net(net: AttributeNet, path, info: dict | None = None) -> Path:
    """Write ``net`` as safetensors; its sizes and ``info`` (e.g. held-out accuracy, data) go in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"animatelcm_attribute_net": json.dumps({"config": net.config, "info": info or {}})}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=metadata)
    return path


def load_attribute_net(path) -> tuple[AttributeNet, dict]:
    """``(net, info)`` from a file written by :func:`save_attribute_net`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attribute network {path} not found; train one with `animatelcm eval "
                                "--train-attribute-net {path}`")
    with safe_open(str(path), "pt") as handle:
        raw = (handle.metadata() or {}).get("animatelcm_attribute_net")
    if raw is None:
        raise ValueError(f"{path} is not an attribute network written by animatelcm (no metadata)")
    saved = json.loads(raw)
    net = AttributeNet(**saved["config"])
    net.load_state_dict(load_file(str(path)))
    return net.eval(), saved["info"]


def real_clips(num_clips: int, frames: int, size: int, seed: int) -> tuple[torch.Tensor, dict]:
    """``num_clips`` real MovingShapes clips ``[N, F, 3, H, W]`` and their attribute labels."""
    dataset = MovingShapes(num_clips=num_clips, frames=frames, size=size, seed=seed)
    clips = torch.stack([dataset[i]["pixel_values"] for i in range(num_clips)])
    return clips, attribute_labels(dataset, range(num_clips))


def evaluation_prompts(num_clips: int) -> tuple[list[str], dict]:
    """Prompts for ``num_clips`` generated clips, cycling through every (colour, shape, direction), and their
    attribute labels ``{attribute: int64 [num_clips]}``."""
    triples = [COMBINATIONS[i % len(COMBINATIONS)] for i in range(num_clips)]
    labels = {name: torch.tensor([ATTRIBUTES[name].index(t[k]) for t in triples])
              for k, name in enumerate(ATTRIBUTES)}
    return [caption(*t) for t in triples], labels


def clip_noise(num_clips: int, shape: tuple, seed: int) -> torch.Tensor:
    """Initial latents ``[num_clips, *shape]`` (shape ``(C, F, h, w)``); clip ``i``'s noise depends only on
    ``(seed, i)``, so every model and step count starts clip ``i`` from the same noise."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                        for i in range(num_clips)])


def sampling_scheduler(pipe, kind: str, lcm_original_steps: int | None = None):
    """The scheduler for ``kind``: ``lcm`` (the pipeline's own LCM scheduler; ``lcm_original_steps`` sets the
    distillation grid), ``ddim`` or ``dpmsolver`` (diffusers' DDIM / DPM-Solver++ multistep, on the pipeline's noise
    schedule, with trailing timestep spacing so that few-step sampling starts from pure noise)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from .schedulers import lcm_scheduler_like

    if kind == "lcm":
        overrides = {} if lcm_original_steps is None else {"original_inference_steps": lcm_original_steps}
        return lcm_scheduler_like(pipe.scheduler, **overrides)
    config = dict(pipe.scheduler.config)
    config = {k: v for k, v in config.items() if k not in ("original_inference_steps", "timestep_scaling")}
    if kind == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing", steps_offset=0, clip_sample=False,
                                         set_alpha_to_one=True)
    if kind == "dpmsolver":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       timestep_spacing="trailing", steps_offset=0)
    raise ValueError(f"scheduler kind must be lcm, ddim or dpmsolver; got {kind!r}")


@torch.no_grad()
def generate_clips(pipe, prompts: list[str], noise: torch.Tensor, steps: int, guidance_scale: float = 1.0,
                   batch_size: int = 32, progress: bool = True, images: torch.Tensor | None = None,
                   control: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Sample one clip per prompt from ``noise`` ``[N, C, F, h, w]`` with ``pipe`` (any AnimateDiff-style
    pipeline, its scheduler as set). ``images`` ``[N, 3, H, W]`` in [0, 1]: each clip's first frame, for an
    :class:`~animatelcm.AnimateLCMPipeline` with an image adapter. ``control`` ``[N, F, 3, H, W]`` in [0, 1]: each
    clip's control images, for an :class:`~animatelcm.AnimateLCMControlNetPipeline` (one clip per call: the
    pipeline takes one control clip). Returns ``(clips [N, F, 3, H, W] in [-1, 1] float32 on the CPU, seconds per
    clip)``; the time covers text encoding, (image encoding,) denoising and decoding."""
    from tqdm.auto import tqdm

    for name, given in (("images", images), ("control clips", control)):
        if len(prompts) != len(noise) or (given is not None and len(given) != len(noise)):
            raise ValueError(f"{len(prompts)} prompts, {len(noise)} noise tensors and "
                             f"{'no' if given is None else len(given)} {name}: give one of each per clip")
    if control is not None:
        batch_size = 1
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    pipe.set_progress_bar_config(disable=True)
    factor = pipe.vae_scale_factor
    frames, height, width = noise.shape[2], noise.shape[3] * factor, noise.shape[4] * factor
    clips, seconds = [], 0.0
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"{steps} step(s)", disable=not progress,
                      unit="batch"):
        latents = noise[start:start + batch_size].to(device, dtype)
        tick = time.perf_counter()
        conditions = {} if images is None else {"image": images[start:start + batch_size]}
        if control is not None:
            conditions["conditioning_frames"] = list(control[start])
        video = pipe(prompt=prompts[start:start + batch_size], latents=latents, num_frames=frames, height=height,
                     width=width, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                     **conditions).frames
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - tick
        clips.append(video.float().cpu() * 2 - 1)
    return torch.cat(clips), seconds / len(prompts)


@torch.no_grad()
def i3d_features(detector, clips: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Features ``[N, 400]`` of ``clips`` from an I3D TorchScript module with the StyleGAN-V interface
    (``detector(videos [B, 3, F, H, W] in [-1, 1], rescale=False, resize=True, return_features=True)``; the file
    commonly distributed as ``i3d_torchscript.pt``). FVD = :func:`frechet_distance` of real and generated
    features."""
    parameter = next(detector.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    features = [detector(part.permute(0, 2, 1, 3, 4).contiguous().to(device), rescale=False, resize=True,
                         return_features=True).double().cpu() for part in clips.split(batch_size)]
    return torch.cat(features)


def shape_tracks(clips: torch.Tensor, saturation: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid ``[B, F, 2]`` (x, y in pixels) of the saturated pixels of each frame (the shapes are saturated,
    the backgrounds are not: channel max - min above ``saturation`` in [-1, 1] units) and whether the frame has
    any ``[B, F]``, for clips ``[B, F, 3, H, W]``."""
    mask = (clips.amax(2) - clips.amin(2)) > saturation
    weight = mask.float()
    count = weight.sum((2, 3))
    ys = torch.arange(clips.shape[3], dtype=torch.float32) + 0.5
    xs = torch.arange(clips.shape[4], dtype=torch.float32) + 0.5
    x = (weight * xs).sum((2, 3)) / count.clamp(min=1)
    y = (weight * ys[:, None]).sum((2, 3)) / count.clamp(min=1)
    return torch.stack([x, y], -1), count > 0


def motion_metrics(clips: torch.Tensor) -> dict:
    """Whether the shape of each clip ``[B, F, 3, H, W]`` moves as one object, from :func:`shape_tracks`:
    ``motion_displacement`` (distance from the first to the last frame with a shape, as a fraction of the frame
    width; the real clips travel 0.5) and ``motion_straightness`` (that distance over the length of the path
    through every frame with a shape: 1 for a steady glide, near 0 for a shape that jumps around), means over
    the clips that show a shape in at least two frames (``motion_tracked``: their share)."""
    centres, found = shape_tracks(clips.float())
    displacement, straightness = [], []
    for track, present in zip(centres, found):
        points = track[present]
        if points.shape[0] < 2:
            continue
        net = float((points[-1] - points[0]).norm())
        path = float((points[1:] - points[:-1]).norm(dim=-1).sum())
        displacement.append(net / clips.shape[4])
        straightness.append(net / path if path > 0 else 0.0)
    tracked = len(displacement)
    return {"motion_displacement": sum(displacement) / max(tracked, 1),
            "motion_straightness": sum(straightness) / max(tracked, 1),
            "motion_tracked": tracked / clips.shape[0]}


def frame_consistency(clips: torch.Tensor, saturation: float = 0.8) -> dict:
    """Whether the frames of each clip ``[B, F, 3, H, W]`` show one scene, means over the clips:
    ``colour_agreement``, the share of a clip's frames with a shape (saturated pixels, as :func:`shape_tracks`)
    whose shape colour (the palette colour nearest to the mean saturated pixel) is the clip's most common one (real
    clips 1.0; over the clips with a shape in at least two frames), and ``background_change``, the mean distance
    between consecutive frames' mean background colours (RGB in [-1, 1]; real clips 0)."""
    clips = clips.float()
    mask = (clips.amax(2) - clips.amin(2)) > saturation  # [B, F, H, W]
    shape_weight = mask.unsqueeze(2).float()
    shape_colour = (clips * shape_weight).sum((3, 4)) / shape_weight.sum((3, 4)).clamp(min=1)  # [B, F, 3]
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 127.5 - 1
    nearest = torch.cdist(shape_colour, palette.expand(clips.shape[0], -1, -1)).argmin(-1)  # [B, F]
    present = mask.flatten(2).any(-1)
    agreement = [float((colours[seen] == colours[seen].mode().values).float().mean())
                 for colours, seen in zip(nearest, present) if int(seen.sum()) >= 2]
    background_weight = (~mask).unsqueeze(2).float()
    background = (clips * background_weight).sum((3, 4)) / background_weight.sum((3, 4)).clamp(min=1)
    change = (background[:, 1:] - background[:, :-1]).norm(dim=-1).mean()
    return {"colour_agreement": sum(agreement) / max(len(agreement), 1), "background_change": float(change)}


def clip_metrics(clips: torch.Tensor, labels: dict, net: AttributeNet, real_features: torch.Tensor,
                 reference: torch.Tensor | None = None, i3d=None, real_i3d_features: torch.Tensor | None = None) -> dict:
    """The metrics of generated ``clips`` (see the module docstring): ``fvd_analogue``, ``accuracy_{colour,
    shape,direction}`` and their mean ``accuracy``, ``teacher_mse`` (with ``reference``), ``fvd_i3d`` (with
    ``i3d`` and the real clips' I3D features), and :func:`motion_metrics`."""
    metrics = {"fvd_analogue": frechet_distance(real_features, clip_features(net, clips))}
    accuracy = attribute_accuracy(net, clips, labels)
    metrics.update({f"accuracy_{name}": value for name, value in accuracy.items()})
    metrics["accuracy"] = sum(accuracy.values()) / len(accuracy)
    if reference is not None:
        metrics["teacher_mse"] = teacher_fidelity(clips, reference)
    if i3d is not None:
        metrics["fvd_i3d"] = frechet_distance(real_i3d_features, i3d_features(i3d, clips))
    metrics.update(motion_metrics(clips))
    metrics.update(frame_consistency(clips))
    return metrics


def train_evaluation_net(path, frames: int, size: int, steps: int = 600, num_clips: int = 4800,
                         held_out: int = 512, seed: int = 0, progress: bool = True) -> tuple[AttributeNet, dict]:
    """Train an :class:`AttributeNet` on real clips (dataset seed ``seed + 100``, apart from the training data
    of seed 0 and the FVD reference clips), measure its accuracy on ``held_out`` clips of another seed, save it
    to ``path`` with that accuracy in the metadata and return ``(net, info)``."""
    train_set = MovingShapes(num_clips=num_clips, frames=frames, size=size, seed=seed + 100)
    net = train_attribute_net(train_set, steps=steps, seed=seed, progress=progress)
    clips, labels = real_clips(held_out, frames, size, seed=seed + 200)
    accuracy = attribute_accuracy(net, clips, labels)
    info = dict(frames=frames, size=size, steps=steps, train_clips=num_clips, held_out_clips=held_out,
                held_out_accuracy=accuracy)
    save_attribute_net(net, path, info)
    return net, info


def evaluate_pipeline(pipe, net: AttributeNet, steps: list[int], num_clips: int = 512, frames: int = 16,
                      guidance_scale: float = 1.0, real_count: int = 512, seed: int = 0, batch_size: int = 32,
                      reference: torch.Tensor | None = None, i3d=None, save_clips=None,
                      progress: bool = True) -> dict:
    """Generate ``num_clips`` clips per step count with ``pipe`` (scheduler as set) from :func:`clip_noise` and
    :func:`evaluation_prompts`, and score them with :func:`clip_metrics` against ``real_count`` real clips (seed
    1). Returns ``{steps: metrics + seconds_per_clip}``. ``save_clips``: a path to save the clips of the last step
    count (fp16), e.g. to use as another model's ``reference``."""
    factor = pipe.vae_scale_factor
    height = width = pipe.unet.config.sample_size * factor
    latent_shape = (pipe.unet.config.in_channels, frames, height // factor, width // factor)
    prompts, labels = evaluation_prompts(num_clips)
    noise = clip_noise(num_clips, latent_shape, seed)
    real, _ = real_clips(real_count, frames, height, seed=1)
    real_features = clip_features(net, real)
    real_i3d = i3d_features(i3d, real) if i3d is not None else None
    if reference is not None and reference.shape[0] != num_clips:
        raise ValueError(f"the reference holds {reference.shape[0]} clips but {num_clips} are evaluated; "
                         "use the same --clips as when it was written")
    results = {}
    clips = None
    for count in steps:
        clips, seconds = generate_clips(pipe, prompts, noise, count, guidance_scale, batch_size, progress)
        metrics = clip_metrics(clips, labels, net, real_features, reference, i3d, real_i3d)
        metrics["seconds_per_clip"] = seconds
        results[count] = metrics
    if save_clips is not None and clips is not None:
        Path(save_clips).parent.mkdir(parents=True, exist_ok=True)
        torch.save(clips.half(), save_clips)
    return results


def _caption_with(labels: dict, index: int, replace: str | None = None) -> str:
    """The caption of clip ``index`` from its labels, with attribute ``replace`` rotated to its next value."""
    values = {name: ATTRIBUTES[name][int(labels[name][index])] for name in ATTRIBUTES}
    if replace is not None:
        options = ATTRIBUTES[replace]
        values[replace] = options[(options.index(values[replace]) + 1) % len(options)]
    return caption(values["colour"], values["shape"], values["direction"])


@torch.no_grad()
def real_latents(pipe, clips: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Scaled VAE posterior means ``[N, C, F, h, w]`` of clips ``[N, F, 3, H, W]`` in [-1, 1]."""
    vae = pipe.vae
    parameter = next(vae.parameters())
    latents = []
    for start in range(0, clips.shape[0], batch_size):
        batch = clips[start:start + batch_size]
        mean = vae.encode(batch.flatten(0, 1).to(parameter.device, parameter.dtype)).latent_dist.mean
        latents.append(mean.float().cpu().reshape(*batch.shape[:2], *mean.shape[1:]).transpose(1, 2))
    return torch.cat(latents) * vae.config.scaling_factor


def attribute_information(latents: torch.Tensor, labels: dict) -> dict:
    """Share of the variance of real latents ``[N, C, F, h, w]`` explained by each prompt attribute:
    ``1 - E|x - E[x | attribute]|^2 / E|x - E[x]|^2``, means taken per frame and position (estimated from the N
    clips: biased up by about values/N). It is the most a denoiser can gain from that attribute where the noisy
    input shows nothing (pure noise)."""
    centred = (latents - latents.mean(0)).pow(2).mean()
    shares = {}
    for name, key in labels.items():
        residual = latents.clone()
        for value in key.unique():
            group = key == value
            residual[group] -= latents[group].mean(0)
        shares[name] = float(1 - residual.pow(2).mean() / centred)
    return shares


@torch.no_grad()
def prompt_sensitivity(pipe, latents: torch.Tensor, labels: dict, timesteps=(200, 500, 700, 850, 950, 990),
                       seed: int = 0, batch_size: int = 16) -> dict:
    """How much the denoiser of a video pipeline uses each prompt attribute. Real latents ``[N, C, F, h, w]``
    (:func:`real_latents`) are noised to each timestep (the same noise for every caption) and the model's
    prediction error (its own ``prediction_type``) is measured with the true caption, with one attribute changed
    to another value (``colour``, ``shape``, ``direction``), and with the empty prompt. A model that ignores an
    attribute scores the same with it changed. Returns ``{t: {"true"|attribute|"empty": mean squared error}}``."""
    unet, scheduler = pipe.unet, pipe.scheduler
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    alphas = scheduler.alphas_cumprod.float()
    count, frames = latents.shape[0], latents.shape[2]
    variants = {"true": None, **{name: name for name in ATTRIBUTES}, "empty": ""}
    prompts = {key: ["" if swap == "" else _caption_with(labels, i, swap) for i in range(count)]
               for key, swap in variants.items()}
    embeddings = {key: pipe.encode_prompt(texts, device, 1, False)[0] for key, texts in prompts.items()}
    results = {}
    for t in timesteps:
        generator = torch.Generator().manual_seed(seed * 1009 + int(t))
        noise = torch.randn(latents.shape, generator=generator)
        alpha = alphas[int(t)]
        noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
        if scheduler.config.prediction_type == "v_prediction":
            target = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
        else:
            target = noise
        errors = {}
        for key, text in embeddings.items():
            total = 0.0
            for start in range(0, count, batch_size):
                stop = min(count, start + batch_size)
                sample = noisy[start:stop].to(device, dtype)
                step = torch.full((stop - start,), int(t), device=device)
                output = unet(sample, step, encoder_hidden_states=text[start:stop].repeat_interleave(frames, 0)).sample
                total += float((output.float().cpu() - target[start:stop]).pow(2).sum())
            errors[key] = total / target.numel()
        results[int(t)] = errors
    return results
