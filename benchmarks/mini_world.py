"""The miniature reproduction of AnimateLCM (issue 6), end to end with the project's own tools.

    python benchmarks/mini_world.py train      # every stage of configs/mini_world, resumable (rerun to continue)
    python benchmarks/mini_world.py table      # the evaluation table + plot into benchmarks/results/
    python benchmarks/mini_world.py ship       # copy the trained AnimateLCM into the package's default model
    python benchmarks/mini_world.py all        # the three in order, then i2v and controlnet
    python benchmarks/mini_world.py probe      # does the teacher use each word of its prompt? (mini_probe.md)
    python benchmarks/mini_world.py capacity   # can text-blind / prompted motion modules learn prompt x frame?
    python benchmarks/mini_world.py flicker    # do the frames of a clip show one scene? (mini_flicker.md)
    python benchmarks/mini_world.py seeds      # AnimateLCM vs no init, retrained with other seeds (mini_seeds.md)
    python benchmarks/mini_world.py i2v        # teacher-free image-to-video adapter: train, measure (mini_i2v.md),
                                               # ship into the default model
    python benchmarks/mini_world.py controlnet # teacher-free ControlNet on edge maps: train, measure
                                               # (mini_controlnet.md); not shipped

Runs live in ``runs/mini_world/``. ``train`` runs each stage as ``animatelcm train CONFIG --resume`` in a child
process and skips stages whose ``final/`` exists, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "mini_world"
RUNS = ROOT / "runs" / "mini_world"
RESULTS = ROOT / "benchmarks" / "results"

# (run name, config, overrides). The ablations share video_cd.yaml; "not decoupled" gets as many optimiser
# steps as image_cd + video_cd together (equal compute or more: each of its steps is a video step).
STAGES = [
    ("autoencoder", "autoencoder.yaml", []),
    ("diffusion_image", "diffusion_image.yaml", []),
    ("diffusion_video", "diffusion_video.yaml", []),
    ("diffusion_video_high_noise", "diffusion_video_high_noise.yaml", []),
    ("diffusion_video_settle", "diffusion_video_settle.yaml", []),
    ("image_cd", "image_cd.yaml", []),
    ("video_cd", "video_cd.yaml", []),
    ("video_cd_no_init", "video_cd.yaml", ["distill.init_strategy=false"]),
    ("video_cd_not_decoupled", "video_cd.yaml", ["distill.decoupled=false", "model.lora=null",
                                                 "train.max_steps=1200"]),
]


def train(only: list[str] | None = None) -> None:
    """Run the stages in order (or the named ones), each resumable."""
    for name, config, overrides in STAGES:
        if only and name not in only:
            continue
        output = RUNS / name
        if (output / "final").is_dir():
            print(f"[mini_world] {name}: done ({output / 'final'})", flush=True)
            continue
        command = [sys.executable, "-m", "animatelcm", "train", str(CONFIGS / config), "--output-dir", str(output),
                   "--resume"]
        for override in overrides:
            command += ["--set", override]
        print(f"[mini_world] {name}: {' '.join(command[2:])}", flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        print(f"[mini_world] {name}: {time.perf_counter() - started:.0f} s", flush=True)


EVAL = RUNS / "eval"
STEPS = [1, 2, 4, 8]
TEACHER_GUIDANCE = 3.0  # diffusers scale = 1 + the mean of the distillation's w ~ U[1, 3]
NET = EVAL / "attribute_net.safetensors"
REFERENCE = EVAL / "teacher_ddim50_clips.pt"
TEACHER = RUNS / "diffusion_video_settle" / "final" / "pipeline"
IMAGE_LCM_ONLY = ["--base", str(RUNS / "diffusion_image" / "final" / "base"),
                  "--motion-module", str(TEACHER.parent / "motion_adapter"),
                  "--lcm-lora", str(RUNS / "image_cd" / "final" / "lora" / "pytorch_lora_weights.safetensors"),
                  "--lcm-lora-scale", "1.0", "--lcm-original-steps", "50"]
# (key, label, model arguments, sampler arguments)
ROWS = [
    ("teacher_ddim", "Teacher + DDIM (guidance 3)", ["--model", str(TEACHER)],
     ["--scheduler", "ddim", "--guidance", str(TEACHER_GUIDANCE)]),
    ("teacher_dpmsolver", "Teacher + DPM-Solver++ (guidance 3)", ["--model", str(TEACHER)],
     ["--scheduler", "dpmsolver", "--guidance", str(TEACHER_GUIDANCE)]),
    ("image_lcm_only", "Image-LCM only (stage-1 LoRA + teacher motion)", IMAGE_LCM_ONLY, ["--scheduler", "lcm"]),
    ("not_decoupled", "Not decoupled (video CD, fresh LoRA)",
     ["--model", str(RUNS / "video_cd_not_decoupled" / "final" / "pipeline")], ["--scheduler", "lcm"]),
    ("no_init", "Without initialization strategy",
     ["--model", str(RUNS / "video_cd_no_init" / "final" / "pipeline")], ["--scheduler", "lcm"]),
    ("animatelcm", "AnimateLCM (decoupled + init)", ["--model", str(RUNS / "video_cd" / "final" / "pipeline")],
     ["--scheduler", "lcm"]),
]
METRICS = [("fvd_analogue", "FVD analogue (Frechet distance of attribute-net features to real clips), lower is better"),
           ("accuracy", "CLIPSIM analogue (attribute-net accuracy on the prompted colour/shape/direction, mean), "
                        "higher is better"),
           ("accuracy_direction", "Direction accuracy (part of the CLIPSIM analogue), higher is better"),
           ("teacher_mse", "Teacher fidelity (MSE to the teacher's 50-step DDIM clip from the same noise, pixels "
                           "in [-1, 1]), lower is better"),
           ("motion_straightness", "Motion straightness (net displacement of the shape over its path length; real "
                                   "clips 1.0, a shape jumping around near 0), higher is better"),
           ("seconds_per_clip", "Wall time per clip (s, batches of 32 clips, text encoding + sampling + decoding)")]


def _evaluate(key: str, model: list[str], sampler: list[str], steps: list[int], clips: int, extra=()) -> dict:
    """One row via ``animatelcm eval`` in a child process; the JSON is kept so a rerun skips finished rows."""
    out = EVAL / f"{key}.json"
    if not out.exists():
        command = [sys.executable, "-m", "animatelcm", "eval", *model, *sampler, "--steps", *map(str, steps),
                   "--clips", str(clips), "--attribute-net", str(NET), "--out", str(out), *extra]
        print(f"[mini_world] eval {key}: {' '.join(command[2:])}", flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def table(clips: int = 512, only: list[str] | None = None) -> Path | None:
    """Train the evaluation network, sample the teacher reference, evaluate every row (or only the rows named;
    the reference always), write the table + plot once every row is there."""
    EVAL.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    reference = _evaluate("teacher_ddim50", ["--model", str(TEACHER)],
                          ["--scheduler", "ddim", "--guidance", str(TEACHER_GUIDANCE)], [50], clips,
                          ["--save-clips", str(REFERENCE)] + ([] if NET.exists() else
                                                             ["--train-attribute-net", "--net-steps", "1000"]))
    rows = {key: _evaluate(key, model, sampler, STEPS, clips, ["--reference", str(REFERENCE)])
            for key, _, model, sampler in ROWS if not only or key in only}
    if len(rows) < len(ROWS):
        return None
    elapsed = time.perf_counter() - started
    markdown = _markdown(rows, reference, clips, elapsed)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mini_table.md").write_text(markdown)
    (RESULTS / "mini_table.json").write_text(json.dumps({"rows": rows, "teacher_ddim50": reference}, indent=1))
    _plot(rows, reference, RESULTS / "mini_table.png")
    print(markdown)
    return RESULTS / "mini_table.md"


def _markdown(rows: dict, reference: dict, clips: int, elapsed: float) -> str:
    import platform

    net = reference["attribute_net"]
    teacher50 = reference["results"]["50"]
    lines = ["# Miniature reproduction of AnimateLCM's results table", "",
             f"Generated by `python benchmarks/mini_world.py table` on {platform.machine()} "
             f"({reference['device']}, {os.cpu_count()} cores, fp32) in {elapsed / 60:.0f} min "
             "(rows already evaluated are reused). "
             f"{clips} clips per cell ({reference['frames']} frames, {reference['size']}x{reference['size']} px), "
             "prompts cycling through all 48 (colour, shape, direction) captions, clip i from the same noise in "
             "every cell. Models: `runs/mini_world/` from `python benchmarks/mini_world.py train` "
             "(configs/mini_world).", "",
             f"Evaluation network: held-out accuracy colour {net['held_out_accuracy']['colour']:.3f}, shape "
             f"{net['held_out_accuracy']['shape']:.3f}, direction {net['held_out_accuracy']['direction']:.3f} "
             f"({net['held_out_clips']} real clips it never saw). Real reference statistics: 512 real clips.", "",
             f"Teacher + DDIM at 50 steps (guidance {TEACHER_GUIDANCE}): FVD analogue "
             f"{teacher50['fvd_analogue']:.3f}, accuracy {teacher50['accuracy']:.3f} (direction "
             f"{teacher50['accuracy_direction']:.3f}), motion straightness {teacher50['motion_straightness']:.3f}, "
             f"{teacher50['seconds_per_clip']:.3f} s per clip.", ""]
    labels = {key: label for key, label, _, _ in ROWS}
    for metric, title in METRICS:
        lines += [f"## {title}", "", "| | " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in STEPS) + " |",
                  "|---" * (len(STEPS) + 1) + "|"]
        for key, row in rows.items():
            values = [row["results"][str(s)].get(metric) for s in STEPS]
            lines.append(f"| {labels[key]} | " + " | ".join("-" if v is None else f"{v:.4g}" for v in values) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot(rows: dict, reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {key: label for key, label, _, _ in ROWS}
    panels = [m for m in METRICS if m[0] != "seconds_per_clip"]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for axis, (metric, title) in zip(axes, panels):
        for key, row in rows.items():
            axis.plot(STEPS, [row["results"][str(s)][metric] for s in STEPS], marker="o", label=labels[key])
        teacher = reference["results"]["50"].get(metric)
        if teacher is not None:
            axis.axhline(teacher, color="black", linestyle="--", linewidth=1, label="Teacher + DDIM, 50 steps")
        axis.set_xscale("log", base=2)
        axis.set_xticks(STEPS, [str(s) for s in STEPS])
        axis.set_xlabel("sampling steps")
        axis.set_title(title.split(" (")[0].split(",")[0], fontsize=10)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def probe(clips: int = 128, information_clips: int = 1920) -> Path:
    """How much the teacher uses each prompt attribute, next to how much each attribute could give it:
    :func:`animatelcm.evaluation.prompt_sensitivity` on ``clips`` real clips and
    :func:`animatelcm.evaluation.attribute_information` on ``information_clips``; into
    ``benchmarks/results/mini_probe.md``."""
    from animatelcm.evaluation import ATTRIBUTES, attribute_information, prompt_sensitivity, real_clips, real_latents
    from animatelcm.loading import load_pipeline

    pipe = load_pipeline(TEACHER)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    real, labels = real_clips(information_clips, 16, size, seed=1)
    latents = real_latents(pipe, real)
    shares = attribute_information(latents, labels)
    sensitivity = prompt_sensitivity(pipe, latents[:clips], {k: v[:clips] for k, v in labels.items()})
    lines = ["# Does the miniature teacher use its prompt?", "",
             f"Teacher `{TEACHER.relative_to(ROOT)}`; `python benchmarks/mini_world.py probe`.", "",
             f"Share of the variance of real latents explained by each attribute ({information_clips} real clips, "
             "per frame and position; the most a denoiser can gain from it at pure noise):", "",
             "| " + " | ".join(ATTRIBUTES) + " |", "|" + "---|" * len(ATTRIBUTES),
             "| " + " | ".join(f"{shares[name]:.4f}" for name in ATTRIBUTES) + " |", "",
             f"Noise-prediction MSE on {clips} real clips noised to t (same noise per row) with the true caption, "
             "with one attribute changed, and with the empty prompt (relative change vs the true caption in "
             "brackets); an attribute the model ignores changes nothing:", "",
             "| t | true | " + " | ".join(f"{name} changed" for name in ATTRIBUTES) + " | empty |",
             "|---|---|" + "---|" * (len(ATTRIBUTES) + 1)]
    for t, errors in sensitivity.items():
        cells = [f"{errors[key]:.5f} ({errors[key] / errors['true'] - 1:+.1%})" for key in (*ATTRIBUTES, "empty")]
        lines.append(f"| {t} | {errors['true']:.5f} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "mini_probe.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


def flicker(clips: int = 96) -> Path:
    """Do the frames of a clip show one scene? :func:`animatelcm.evaluation.frame_consistency` of real clips, of
    the teacher (DDIM, 25 steps) at guidance 3 and 1, and of AnimateLCM at 4 steps (guidance 1 and 1.5), on
    ``clips`` clips cycling through the 48 prompts; into ``benchmarks/results/mini_flicker.md``."""
    from animatelcm.evaluation import (attribute_accuracy, clip_noise, evaluation_prompts, frame_consistency,
                                       generate_clips, load_attribute_net, real_clips, sampling_scheduler)
    from animatelcm.loading import load_pipeline

    net, info = load_attribute_net(NET)
    prompts, labels = evaluation_prompts(clips)
    real, _ = real_clips(clips, info["frames"], info["size"], seed=5)
    rows = [("real clips", frame_consistency(real), None)]
    for label, path, scheduler, steps, guidance in (
            ("teacher + DDIM, guidance 3", TEACHER, "ddim", 25, 3.0),
            ("teacher + DDIM, guidance 1", TEACHER, "ddim", 25, 1.0),
            ("AnimateLCM, guidance 1 (the default)", RUNS / "video_cd" / "final" / "pipeline", None, 4, 1.0),
            ("AnimateLCM, guidance 1.5", RUNS / "video_cd" / "final" / "pipeline", None, 4, 1.5)):
        pipe = load_pipeline(path)
        if scheduler:
            pipe.scheduler = sampling_scheduler(pipe, scheduler)
        shape = (pipe.unet.config.in_channels, info["frames"], pipe.unet.config.sample_size,
                 pipe.unet.config.sample_size)
        generated, _ = generate_clips(pipe, prompts, clip_noise(clips, shape, seed=7), steps,
                                      guidance_scale=guidance, progress=False)
        rows.append((f"{label}, {steps} steps", frame_consistency(generated),
                     attribute_accuracy(net, generated, labels)))
    lines = ["# Flicker: do the frames of a clip show one scene?", "",
             f"`python benchmarks/mini_world.py flicker`; {clips} clips per row (prompts cycling through the 48 "
             "captions, the same initial noise in every row). Colour agreement: the share of a clip's frames whose "
             "shape colour is the clip's most common one; background change: the mean distance between "
             "consecutive frames' mean background colours (RGB in [-1, 1]); "
             "`animatelcm.evaluation.frame_consistency`.", "",
             "| clips | colour agreement | background change | colour / shape / direction accuracy |",
             "|---|---|---|---|"]
    for label, consistency, accuracy in rows:
        correct = " / ".join(f"{accuracy[name]:.2f}" for name in ("colour", "shape", "direction")) if accuracy else ""
        lines.append(f"| {label} | {consistency['colour_agreement']:.3f} | {consistency['background_change']:.3f} "
                     f"| {correct} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "mini_flicker.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


SEED_RUNS = RUNS / "seeds"
SEED_STEPS = [4, 8]


def seeds(extra_seeds: tuple[int, ...] = (1,)) -> Path:
    """Is the initialization strategy's effect larger than what another training seed changes? Retrain the
    ``video_cd`` stage with and without the strategy for each of ``extra_seeds`` (same teacher, same stage-1 LoRA;
    the seed draws the training clips and all of training's randomness),
    evaluate them like the table's rows at 4 and 8 steps, and write every seed's numbers (the table's runs are
    seed 0) to ``benchmarks/results/mini_seeds.md``. Needs ``train`` and ``table`` first."""
    variants = {"animatelcm": ("AnimateLCM (decoupled + init)", [], RUNS / "video_cd"),
                "no_init": ("Without initialization strategy", ["distill.init_strategy=false"],
                            RUNS / "video_cd_no_init")}
    results = {(key, 0): json.loads((EVAL / f"{key}.json").read_text())["results"] for key in variants}
    for seed in extra_seeds:
        for key, (_, overrides, _) in variants.items():
            output = SEED_RUNS / f"{key}_seed{seed}"
            if not (output / "final").is_dir():
                command = [sys.executable, "-m", "animatelcm", "train", str(CONFIGS / "video_cd.yaml"),
                           "--output-dir", str(output), "--resume", "--set", f"seed={seed}"]
                for override in overrides:
                    command += ["--set", override]
                print(f"[mini_world] {key} seed {seed}: {' '.join(command[2:])}", flush=True)
                subprocess.run(command, check=True, cwd=ROOT)
            results[key, seed] = _evaluate(f"{key}_seed{seed}", ["--model", str(output / "final" / "pipeline")],
                                           ["--scheduler", "lcm"], SEED_STEPS, 512,
                                           ["--reference", str(REFERENCE)])["results"]
    columns = [("fvd_analogue", "FVD analogue"), ("accuracy", "mean accuracy"),
               ("accuracy_direction", "direction"), ("motion_straightness", "straightness")]
    lines = ["# Seed noise of the initialization strategy's effect", "",
             "`python benchmarks/mini_world.py seeds`: the `video_cd` stage (configs/mini_world/video_cd.yaml, same "
             "teacher and stage-1 LoRA) with and without the initialization strategy, trained with each seed (the "
             "seed draws the 1920 synthetic training clips and every random choice of training); seed 0 is the "
             "table's row (`mini_table.md`). 512 clips per cell, the table's noise and prompts.", "",
             "| run | seed | " + " | ".join(f"{name}, {steps} steps" for steps in SEED_STEPS for _, name in columns)
             + " |", "|---|---|" + "---|" * (len(SEED_STEPS) * len(columns))]
    for (key, seed), result in sorted(results.items()):
        cells = [f"{result[str(steps)][metric]:.4g}" for steps in SEED_STEPS for metric, _ in columns]
        lines.append(f"| {variants[key][0]} | {seed} | " + " | ".join(cells) + " |")
    path = RESULTS / "mini_seeds.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path

ADAPTER_STEPS = [1, 2, 4]
ADAPTER_COLUMNS = [("first_frame_psnr", "first-frame PSNR (dB)"), ("clip_psnr", "clip PSNR vs the real clip (dB)"),
                   ("start_error_px", "start position error (px)"), ("track_error_px", "track error (px)"),
                   ("accuracy_colour", "colour"), ("accuracy_shape", "shape"), ("accuracy_direction", "direction"),
                   ("fvd_analogue", "FVD analogue"), ("motion_straightness", "straightness"),
                   ("seconds_per_clip", "s / clip")]
ADAPTER_MEASURES = ("PSNR over pixels in [-1, 1]; start position / track error: mean distance between the shape's "
                    "centre in the generated and the real clip, first frame / every frame; colour / shape / "
                    "direction: the evaluation network's accuracy against the real clip's labels (chance 0.25 / "
                    "0.33 / 0.25). The LCM steps' noise is not seeded: rows of 2 and 4 steps move by about 0.01 in "
                    "accuracy when rerun.")


def _train_teacher_free(config_name: str, run: Path) -> tuple[Path, int, float]:
    """Train ``configs/mini_world/{config_name}`` into ``run`` (resumable) on the trained AnimateLCM, or on the
    shipped default model (the same network in fp16) when ``runs/mini_world/video_cd`` is not there. Returns
    ``(the frozen model's folder, steps trained, seconds of training)``."""
    import csv

    from animatelcm.default_model import DEFAULT_MODEL_DIR

    source = RUNS / "video_cd" / "final" / "pipeline"
    if not source.is_dir():
        source = DEFAULT_MODEL_DIR
    if not (run / "final").is_dir():
        command = [sys.executable, "-m", "animatelcm", "train", str(CONFIGS / config_name), "--output-dir",
                   str(run), "--resume", "--set", f"model.pretrained={source}"]
        print(f"[mini_world] {run.name}: {' '.join(command[2:])}", flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
    with open(run / "metrics.csv") as log:  # one row per log interval: step, ..., seconds per step, ...
        logged = list(csv.DictReader(log))
    steps = int(logged[-1]["step"])
    return source, steps, steps * sum(float(row["seconds"]) for row in logged) / len(logged)


def _adapter_rows(name: str, plain, adapted, row_labels: tuple, plain_arguments, adapted_arguments, clips: int,
                  seed: int = 11) -> dict:
    """Generate and measure four rows on ``clips`` held-out real clips (MovingShapes ``seed``; training used seed
    0), at each of :data:`ADAPTER_STEPS`, from the same initial noise: the ``plain`` pipeline and the ``adapted``
    one, each with the captions and with empty prompts (``row_labels`` in that order: plain + caption, adapted +
    caption, plain + empty, adapted + empty). ``*_arguments(real clips)`` give their extra
    :func:`~animatelcm.evaluation.generate_clips` arguments. Returns ``{"label|steps": metrics}``."""
    import torch

    from animatelcm.default_model import ATTRIBUTE_NET_PATH
    from animatelcm.evaluation import (_caption_with, attribute_accuracy, clip_features, clip_noise,
                                       frechet_distance, generate_clips, load_attribute_net, motion_metrics,
                                       real_clips, shape_tracks)

    net, info = load_attribute_net(NET if NET.exists() else ATTRIBUTE_NET_PATH)  # (ship() copies NET there)
    real, labels = real_clips(clips, info["frames"], info["size"], seed=seed)
    captions = [_caption_with(labels, index) for index in range(clips)]
    real_features = clip_features(net, real)
    real_track, real_found = shape_tracks(real)

    def psnr(a, b):
        return float(10 * torch.log10(4.0 / (a - b).pow(2).mean()))  # pixels in [-1, 1]: peak-to-peak 2

    def track_error(generated, frames):
        track, found = shape_tracks(generated)
        both = (found & real_found)[:, frames]
        distance = (track - real_track)[:, frames].norm(dim=-1)
        return float(distance[both].mean()) if both.any() else None

    variants = zip(row_labels, (plain, adapted) * 2, (True, True, False, False),
                   (plain_arguments, adapted_arguments) * 2)
    rows = {}
    for label, pipe, with_caption, conditions in variants:
        shape = (pipe.unet.config.in_channels, info["frames"], pipe.unet.config.sample_size,
                 pipe.unet.config.sample_size)
        noise = clip_noise(clips, shape, seed=7)
        prompts = captions if with_caption else [""] * clips
        for steps in ADAPTER_STEPS:
            generated, seconds = generate_clips(pipe, prompts, noise, steps, progress=False, **conditions(real))
            accuracy = attribute_accuracy(net, generated, labels)
            rows[f"{label}|{steps}"] = {
                "accuracy_colour": accuracy["colour"], "accuracy_shape": accuracy["shape"],
                "accuracy_direction": accuracy["direction"],
                "first_frame_psnr": psnr(generated[:, 0], real[:, 0]), "clip_psnr": psnr(generated, real),
                "start_error_px": track_error(generated, slice(0, 1)),
                "track_error_px": track_error(generated, slice(None)),
                "fvd_analogue": frechet_distance(real_features, clip_features(net, generated)),
                "motion_straightness": motion_metrics(generated)["motion_straightness"],
                "seconds_per_clip": seconds}
            print(f"[mini_world] {name} {label}, {steps} step(s): {rows[f'{label}|{steps}']}", flush=True)
    return rows


def _adapter_table(name: str, title: str, description: str, source: Path, clips: int, rows: dict) -> Path:
    """``benchmarks/results/mini_{name}.md`` and ``.json`` from :func:`_adapter_rows`' rows."""
    lines = [f"# {title}", "", description + " " + ADAPTER_MEASURES, "",
             "| model, prompt | steps | " + " | ".join(column for _, column in ADAPTER_COLUMNS) + " |",
             "|---|---|" + "---|" * len(ADAPTER_COLUMNS)]
    for key, metrics in rows.items():
        label, steps = key.split("|")
        cells = ["-" if metrics[metric] is None else f"{metrics[metric]:.3g}" for metric, _ in ADAPTER_COLUMNS]
        lines.append(f"| {label} | {steps} | " + " | ".join(cells) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"mini_{name}.json").write_text(json.dumps(
        {"source": str(source.relative_to(ROOT)), "clips": clips, "rows": rows}, indent=1))
    path = RESULTS / f"mini_{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


def i2v(clips: int = 256) -> Path:
    """Teacher-free adaptation in the miniature world: train an image-to-video adapter on the trained AnimateLCM
    (configs/mini_world/teacher_free_i2v.yaml), measure it on ``clips`` held-out real clips (their first frame as
    the image, their caption or an empty prompt) against the same model without it, and ship it into the default
    model. Writes ``benchmarks/results/mini_i2v.md`` and ``.json``."""
    import torch

    from animatelcm.loading import load_image_adapter, load_pipeline

    run = RUNS / "teacher_free_i2v"
    source, steps, seconds = _train_teacher_free("teacher_free_i2v.yaml", run)
    plain = load_pipeline(source, torch_dtype=torch.float32)
    plain.image_adapter = None
    animated = load_pipeline(source, torch_dtype=torch.float32)
    animated.image_adapter = load_image_adapter(run / "final" / "i2v_adapter", torch_dtype=torch.float32)

    def first_frames(real):
        return {"images": (real[:, 0] + 1) / 2}

    row_labels = ("text only (no adapter)", "image + text", "empty prompt (no adapter)", "image + empty prompt")
    rows = _adapter_rows("i2v", plain, animated, row_labels, lambda real: {}, first_frames, clips)
    path = _adapter_table(
        "i2v", "Teacher-free image-to-video adapter in the miniature world",
        f"`python benchmarks/mini_world.py i2v`: an `ImageToVideoAdapter` trained from scratch by the `teacher_free` "
        f"stage (configs/mini_world/teacher_free_i2v.yaml: consistency training, no teacher; {steps} steps of 4 "
        f"clips) on the frozen AnimateLCM `{source.relative_to(ROOT)}`, in about {seconds / 60:.0f} min on this CPU. "
        f"Measured on {clips} held-out real clips (MovingShapes seed 11; training used seed 0): each clip's first "
        "frame is the image, its caption (or an empty prompt) the prompt, the same initial noise in every row, LCM "
        "sampling at guidance 1.", source, clips, rows)
    _ship_image_adapter(animated.image_adapter)
    return path


def _ship_image_adapter(adapter) -> None:
    """Save the default model again with ``adapter`` as its image adapter (fp16, like the rest)."""
    import torch

    from animatelcm.default_model import DEFAULT_MODEL_DIR
    from animatelcm.loading import load_pipeline

    pipe = load_pipeline(DEFAULT_MODEL_DIR, torch_dtype=torch.float16)
    pipe.image_adapter = adapter.to(torch.float16)
    temporary = DEFAULT_MODEL_DIR.with_name(".default_model.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    pipe.save_pretrained(str(temporary))
    meta = json.loads((DEFAULT_MODEL_DIR / "default_model.json").read_text())
    meta["image_adapter"] = ("an ImageToVideoAdapter trained teacher-free on this model "
                             "(configs/mini_world/teacher_free_i2v.yaml; benchmarks/results/mini_i2v.md): "
                             "`animatelcm generate --image first.png` animates a 32x32 picture")
    (temporary / "default_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(DEFAULT_MODEL_DIR)
    temporary.rename(DEFAULT_MODEL_DIR)
    print(f"[mini_world] shipped the image adapter into {DEFAULT_MODEL_DIR}")


def controlnet(clips: int = 256) -> Path:
    """The ControlNet variant of :func:`i2v`: a ControlNet on Sobel edge maps, started from the AnimateLCM's own
    spatial weights, its LoRA and output convs trained teacher-free (configs/mini_world/teacher_free_controlnet.yaml),
    measured with each held-out clip's edge maps as the control. Not shipped: it did not follow the control (README,
    "Teacher-free ControlNet"). Writes ``benchmarks/results/mini_controlnet.md`` and ``.json``."""
    import torch

    from animatelcm import AnimateLCMControlNetPipeline
    from animatelcm.adapters import edge_maps
    from animatelcm.loading import load_controlnet, load_pipeline

    run = RUNS / "teacher_free_controlnet"
    source, steps, seconds = _train_teacher_free("teacher_free_controlnet.yaml", run)
    plain = load_pipeline(source, torch_dtype=torch.float32)
    model = load_controlnet(run / "final" / "controlnet", torch_dtype=torch.float32)
    controlled = AnimateLCMControlNetPipeline.from_pipe(plain, controlnet=model)

    def edges(real):
        return {"control": edge_maps(real)}

    row_labels = ("caption only (no ControlNet)", "edges + caption", "empty prompt (no ControlNet)",
                  "edges + empty prompt")
    # batch 1 in every row (the ControlNet rows' calls take one control clip each), so the times compare
    rows = _adapter_rows("controlnet", plain, controlled, row_labels, lambda real: {"batch_size": 1}, edges, clips)
    path = _adapter_table(
        "controlnet", "Teacher-free ControlNet in the miniature world",
        f"`python benchmarks/mini_world.py controlnet`: a ControlNet started from the frozen AnimateLCM's own spatial "
        f"weights, its LoRA (rank 16) and zero-initialised output convs trained by the `teacher_free` stage "
        f"(configs/mini_world/teacher_free_controlnet.yaml: consistency training, no teacher; {steps} steps of 4 "
        f"clips) on `{source.relative_to(ROOT)}`, in about {seconds / 60:.0f} min on this CPU. Measured on {clips} "
        "held-out real clips (MovingShapes seed 11; training used seed 0): each clip's Sobel edge maps are the "
        "control, its caption (or an empty prompt) the prompt, the same initial noise in every row, LCM sampling at "
        "guidance 1, one clip per call.", source, clips, rows)
    return path


CAPACITY_TASKS = {
    "frame": "one prompt; a strip moving right across the frames (the output must depend on the frame index)",
    "prompt": "two prompts (moving right / left); a still strip on the left / right (on the prompt only)",
    "prompt x frame": "two prompts; a strip moving right / the mirror image moving left (on both at once)",
}


def capacity_targets(task: str, shape: tuple) -> torch.Tensor:
    """Targets ``[2, C, F, h, w]`` (first / second prompt) of a :func:`capacity` task: channel 0 holds a vertical
    Gaussian strip whose column moves with the frame index, depends on the prompt, or both."""
    import torch

    channels, frames, height, width = shape
    columns = torch.arange(width).float()
    moving = 1 + torch.arange(frames).float() * (width - 3) / (frames - 1)  # column per frame, left to right
    if task == "frame":
        centres = torch.stack([moving, moving])
    elif task == "prompt":
        centres = torch.stack([torch.full((frames,), 1.5), torch.full((frames,), width - 2.5)])
    elif task == "prompt x frame":
        centres = torch.stack([moving, width - 1 - moving])
    else:
        raise ValueError(f"capacity: unknown task {task!r}; choose from {sorted(CAPACITY_TASKS)}")
    strips = torch.exp(-(columns - centres[..., None]) ** 2)  # [2, F, w]
    targets = torch.zeros(2, channels, frames, height, width)
    targets[:, 0] = strips[:, :, None, :]
    return targets


CAPACITY_MOTION = {"text-blind": "AnimateDiff's: both temporal attentions are self-attentions",
                   "prompted": "attn2 attends to the prompt (animatelcm.motion_prompt)"}


def capacity(steps: int = 1000, seed: int = 0) -> Path:
    """Can a UNet with motion modules learn outputs that depend on the prompt, on the frame index, and on both
    at once, with text-blind or with prompted motion modules?

    For each motion-module kind of :data:`CAPACITY_MOTION` and each task of :data:`CAPACITY_TASKS`: the image
    teacher (``diffusion_image``) inflated with fresh motion modules (seeded, zero ``proj_out``), every weight
    trainable, regresses a fixed target per prompt from pure noise at t = 999 (``steps`` AdamW steps at lr 1e-3,
    batch 4). Reported: R^2 of the noise-averaged output against the targets, and for two prompts how well the
    difference of the two outputs matches the difference of the targets (correlation; 0 = the prompt is not used).
    Into ``benchmarks/results/mini_capacity.md``."""
    import torch

    from animatelcm.loading import _load_base_components
    from animatelcm.training.config import load_config
    from animatelcm.training.models import fresh_motion_adapter, inflate, zero_init_output

    image_teacher = RUNS / "diffusion_image" / "final" / "base"
    parts = _load_base_components(image_teacher, None, False, None)
    unet2d, tokenizer = parts["unet"], parts["tokenizer"]
    prompts = ["a red circle moving right", "a red circle moving left"]
    with torch.no_grad():
        tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
        texts = parts["text_encoder"](tokens)[0]
    heads = load_config(str(CONFIGS / "diffusion_video.yaml")).model.motion_heads  # as the teacher's
    config = unet2d.config
    frames = 16
    shape = (config.in_channels, frames, config.sample_size, config.sample_size)
    timestep = torch.full((4,), 999)
    which = torch.tensor([0, 1, 0, 1])
    rows = {}
    for motion in CAPACITY_MOTION:
        for task in CAPACITY_TASKS:
            torch.manual_seed(seed)
            adapter = zero_init_output(fresh_motion_adapter(unet2d, heads, prompted=motion == "prompted"))
            unet = inflate(unet2d, adapter).train().requires_grad_(True)
            optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
            targets = capacity_targets(task, shape)
            started = time.time()
            for _ in range(steps):
                output = unet(torch.randn(4, *shape), timestep, encoder_hidden_states=texts[which].repeat_interleave(
                    frames, 0)).sample
                loss = (output - targets[which]).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            unet.eval()
            with torch.no_grad():
                generator = torch.Generator().manual_seed(seed + 1)
                means = torch.stack([
                    unet(torch.randn(8, *shape, generator=generator), torch.full((8,), 999),
                         encoder_hidden_states=texts[i:i + 1].expand(8 * frames, -1, -1)).sample.mean(0)
                    for i in range(2)])
            r2 = 1 - float((means - targets).pow(2).sum() / (targets - targets.mean()).pow(2).sum())
            difference, wanted = means[0] - means[1], targets[0] - targets[1]
            separation = (float((difference * wanted).sum() / (difference.norm() * wanted.norm()))
                          if wanted.norm() > 0 else float("nan"))
            rows[motion, task] = dict(r2=r2, separation=separation, loss=loss.item(), seconds=time.time() - started)
            print(motion, task, rows[motion, task], flush=True)
    lines = ["# Can the miniature UNet tie its output to the prompt and the frame?", "",
             f"`python benchmarks/mini_world.py capacity --steps {steps}`: the image teacher "
             f"(`{image_teacher.relative_to(ROOT)}`) inflated with fresh motion modules ({heads} heads, zero "
             f"`proj_out`, seed {seed}), every weight trainable, {steps} AdamW steps at lr 1e-3, batch 4, pure noise "
             "at t = 999 in, a fixed target per prompt out. R^2: of the output averaged over 8 noises, against the "
             "targets. Separation: correlation of (output for prompt 1 - output for prompt 2) with (target 1 - "
             "target 2); 0 means the prompt is not used.", "",
             "Motion modules: " + "; ".join(f"**{k}**: {v}" for k, v in CAPACITY_MOTION.items()) + ".", "",
             "| motion modules | task | target | R^2 | separation | final loss | seconds |",
             "|---|---|---|---|---|---|---|"]
    for (motion, task), row in rows.items():
        separation = "n/a (one prompt)" if task == "frame" else f"{row['separation']:.3f}"
        lines.append(f"| {motion} | {task} | {CAPACITY_TASKS[task]} | {row['r2']:.3f} | {separation} | "
                     f"{row['loss']:.4f} | {row['seconds']:.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "mini_capacity.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return path


def ship() -> Path:
    """Make the trained AnimateLCM the package's default model: the pipeline (fp16 weights) and
    ``default_model.json`` into ``animatelcm/assets/default_model``, the evaluation network next to it. (Without an
    image adapter: :func:`i2v` adds one.)"""
    import torch

    from animatelcm.default_model import ATTRIBUTE_NET_PATH, DEFAULT_MODEL_DIR
    from animatelcm.loading import load_pipeline

    source = RUNS / "video_cd" / "final" / "pipeline"
    pipe = load_pipeline(source)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    temporary = DEFAULT_MODEL_DIR.with_name(".default_model.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    pipe.to(dtype=torch.float16).save_pretrained(str(temporary))
    table = json.loads((RESULTS / "mini_table.json").read_text()) if (RESULTS / "mini_table.json").exists() else {}
    at4 = table.get("rows", {}).get("animatelcm", {}).get("results", {}).get("4", {})
    measured = (f" At 4 steps (512 clips, benchmarks/results/mini_table.md) the evaluation network finds the "
                f"prompted colour in {at4['accuracy_colour']:.0%} of clips, the shape in {at4['accuracy_shape']:.0%} "
                f"and the direction in {at4['accuracy_direction']:.0%} (chance 25/33/25%).") if at4 else ""
    meta = {
        "description": "Embedded default model: the miniature AnimateLCM trained by benchmarks/mini_world.py "
                       "(configs/mini_world) on synthetic clips of coloured shapes moving across a muted background, "
                       "with prompted motion modules (animatelcm.motion_prompt). It knows prompts 'a "
                       "{red|green|blue|yellow} {circle|square|triangle} moving {left|right|up|down}' and makes "
                       "16-frame 32x32 clips in 1-8 steps (4 by default)." + measured,
        "trained": True,
        "height": size, "width": size, "fps": 8, "frames": 16, "steps": 4,
        "source": "runs/mini_world/video_cd/final/pipeline",
        "evaluation_at_4_steps": at4,
    }
    (temporary / "default_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(DEFAULT_MODEL_DIR, ignore_errors=True)
    temporary.rename(DEFAULT_MODEL_DIR)
    shutil.copyfile(NET, ATTRIBUTE_NET_PATH)
    print(f"[mini_world] shipped {source} -> {DEFAULT_MODEL_DIR} and {NET} -> {ATTRIBUTE_NET_PATH}")
    return DEFAULT_MODEL_DIR


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["train", "table", "ship", "all", "probe", "capacity", "flicker", "seeds",
                                           "i2v", "controlnet"])
    parser.add_argument("--only", nargs="*", help="train: only these stages; table: only these rows")
    parser.add_argument("--clips", type=int, default=512, help="table: generated clips per cell (default 512)")
    parser.add_argument("--steps", type=int, default=1000, help="capacity: training steps per task (default 1000)")
    args = parser.parse_args(argv)
    if args.action in ("train", "all"):
        train(args.only)
    if args.action in ("table", "all"):
        table(args.clips, args.only)
    if args.action in ("ship", "all"):
        ship()
    if args.action in ("i2v", "all"):  # after ship: it adds the image adapter to the shipped model
        i2v()
    if args.action in ("controlnet", "all"):
        controlnet()
    if args.action == "probe":
        probe()
    if args.action == "capacity":
        capacity(args.steps)
    if args.action == "flicker":
        flicker()
    if args.action == "seeds":
        seeds()


if __name__ == "__main__":
    main()
