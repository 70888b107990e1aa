"""Deterministic synthetic video-text data: coloured shapes moving across a muted background.

Captions are exactly ``"a {colour} {shape} moving {direction}"``; colours are drawn saturated (red = (230, 30, 30),
green = (30, 200, 30), blue = (30, 30, 230), yellow = (230, 230, 30)); backgrounds are low-saturation colours that
are none of those. Clip ``i`` of a given seed is always the same; the 48 (colour, shape, direction) combinations
cycle with the index so any 48 consecutive clips cover all of them.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "yellow": (230, 230, 30)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
COMBINATIONS = list(itertools.product(COLOURS, SHAPES, DIRECTIONS))
STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy); y grows downwards


def caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2
    if shape == "square":
        return (np.abs(xs - cx) <= radius) & (np.abs(ys - cy) <= radius)
    # upright isosceles triangle inscribed in the same box: apex at the top
    inside_height = (ys >= cy - radius) & (ys <= cy + radius)
    half_width = radius * (ys - (cy - radius)) / (2 * radius)
    return inside_height & (np.abs(xs - cx) <= half_width)


class MovingShapes(torch.utils.data.Dataset):
    """``num_clips`` clips of ``frames`` frames at ``size`` x ``size`` pixels.

    ``clip(i)`` returns ``dict(frames=uint8 [F, H, W, 3], caption, colour, shape, direction)``; as a torch Dataset
    ``dataset[i]`` gives ``dict(pixel_values=float32 [F, 3, H, W] in [-1, 1], caption)``.
    """

    def __init__(self, num_clips: int = 4800, frames: int = 16, size: int = 64, seed: int = 0):
        if num_clips < 1 or frames < 2 or size < 16:
            raise ValueError(f"MovingShapes: need num_clips >= 1, frames >= 2, size >= 16; got {num_clips}, "
                             f"{frames}, {size}")
        self.num_clips, self.frames, self.size, self.seed = num_clips, frames, size, seed

    def __len__(self) -> int:
        return self.num_clips

    def attributes(self, index: int) -> tuple[str, str, str]:
        """(colour, shape, direction) of clip ``index``."""
        return COMBINATIONS[index % len(COMBINATIONS)]

    def clip(self, index: int) -> dict:
        if not 0 <= index < self.num_clips:
            raise IndexError(f"MovingShapes has {self.num_clips} clips; index {index} is out of range")
        colour, shape, direction = self.attributes(index)
        rng = np.random.default_rng([self.seed, index])
        size, frames = self.size, self.frames
        radius = size / 8
        travel = size / 2  # pixels covered over the clip
        margin = radius + 1
        # Muted background: a grey level with a small tint, far from the saturated shape colours.
        grey = rng.uniform(70, 170)
        background = np.clip(grey + rng.uniform(-20, 20, size=3), 0, 255).astype(np.uint8)
        dx, dy = STEP[direction]
        along_start = rng.uniform(margin, size - margin - travel)
        across = rng.uniform(margin, size - margin)
        video = np.empty((frames, size, size, 3), dtype=np.uint8)
        for f in range(frames):
            along = along_start + travel * f / (frames - 1)
            if dx:
                cx, cy = (along if dx > 0 else size - along), across
            else:
                cx, cy = across, (along if dy > 0 else size - along)
            video[f] = background
            video[f][_shape_mask(shape, size, cx, cy, radius)] = COLOURS[colour]
        return dict(frames=video, caption=caption(colour, shape, direction), colour=colour, shape=shape,
                    direction=direction)

    def __getitem__(self, index: int) -> dict:
        sample = self.clip(index)
        pixels = torch.from_numpy(sample["frames"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return dict(pixel_values=pixels, caption=sample["caption"])
