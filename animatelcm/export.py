"""Write generated clips to GIF (imageio/Pillow) or MP4 (PyAV, H.264); a file appears only once completely written."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np


def frames_to_uint8(frames) -> np.ndarray:
    """Frames as ``uint8 [F, H, W, 3]``; float values are clipped to [0, 1], and NaN or infinite ones are an error.

    Accepts a list of PIL images, an array or tensor ``[F, H, W, 3]`` (uint8, or float in [0, 1]), or a tensor
    ``[F, 3, H, W]`` (as the pipelines' ``output_type="pt"`` gives per video). A leading batch dimension of 1 is
    dropped.
    """
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("no frames to export")
        if hasattr(frames[0], "convert"):  # PIL images
            array = np.stack([np.asarray(f.convert("RGB")) for f in frames])
        else:
            array = np.stack([np.asarray(f) for f in frames])
    elif hasattr(frames, "detach"):  # torch tensor
        array = frames.detach().float().cpu().numpy()
        if array.ndim == 5 and array.shape[0] == 1:
            array = array[0]
        if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(0, 2, 3, 1)
    else:
        array = np.asarray(frames)
    if array.ndim == 5 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"expected frames shaped [F, H, W, 3] (or [F, 3, H, W] tensors), got {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        finite = np.isfinite(array)
        if not finite.all():
            raise ValueError(f"{array.size - int(finite.sum())} of {array.size} frame values are NaN or infinite "
                             "(the model's output overflowed: in float16, try bfloat16 or float32); nothing written")
        array = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return array


def _check_fps(fps) -> None:
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps!r}")


@contextlib.contextmanager
def _replaced_when_complete(path):
    """Yields a temporary path beside ``path`` (same suffix) to write; renames it to ``path`` when the block
    completes, deletes it when the block raises, so a failed export leaves an earlier file of that name intact and
    no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def export_to_gif(frames, path, fps: float = 8.0) -> Path:
    """Write ``frames`` (see :func:`frames_to_uint8`) as a looping GIF at ``fps``; returns the path. Pillow merges
    identical consecutive frames into one shown for their summed duration (the clip plays the same; a reader sees
    fewer frames); MP4 keeps every frame."""
    import imageio.v3 as iio

    _check_fps(fps)
    array = frames_to_uint8(frames)
    with _replaced_when_complete(path) as partial:
        iio.imwrite(partial, array, extension=".gif", duration=1000.0 / fps, loop=0)
    return Path(path)


def export_to_mp4(frames, path, fps: float = 8.0, crf: int = 18) -> Path:
    """Write ``frames`` as H.264 MP4 (yuv420p; odd sizes are padded by one pixel) with PyAV; returns the path."""
    import av

    _check_fps(fps)
    array = frames_to_uint8(frames)
    pad_h, pad_w = array.shape[1] % 2, array.shape[2] % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    from fractions import Fraction

    with _replaced_when_complete(path) as partial, av.open(str(partial), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "h264",
                                      rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = array.shape[2], array.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in array:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def export_video(frames, path, fps: float = 8.0) -> Path:
    """Write ``frames`` to ``path`` as GIF or MP4, chosen by the suffix (``.gif`` / ``.mp4``)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gif":
        return export_to_gif(frames, path, fps)
    if suffix == ".mp4":
        return export_to_mp4(frames, path, fps)
    raise ValueError(f"cannot export to {str(path)!r}: the file name must end in .gif or .mp4")
