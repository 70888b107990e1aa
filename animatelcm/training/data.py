"""Real data for the training stages: video-text clips (PyAV) and image-text pairs.

Sources (``kind`` is ``video`` or ``image``):
- a folder of files, each with a caption in a ``.txt`` file of the same stem (``clip.mp4`` + ``clip.txt``), in it
  or in its subfolders (video2dataset's ``files`` output shards);
- a folder with a ``metadata.jsonl`` or ``metadata.csv`` (Hugging Face's imagefolder/videofolder layout: a
  ``file_name`` column, paths relative to the folder, and a ``text`` or ``caption`` column);
- a folder with ``prompts.txt`` and ``videos.txt`` (``images.txt``): one caption and one path, relative to the
  folder, a line (the layout of diffusers' video fine-tuning datasets);
- a CSV or JSON-lines file: WebVid's columns (``videoid``, ``page_dir``, ``name`` = caption; the file is
  ``{page_dir}/{videoid}.mp4`` under ``root``, or ``{videoid}.mp4`` in ``root`` itself as AnimateDiff reads it), or a path column (``video``/``image``, ``file_name`` or ``path``,
  relative to ``root``, default the file's folder) and a caption column (``caption``, ``text`` or ``prompt``).
Every listed file is checked when the dataset is built, so a missing file fails before training starts.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """A data source that cannot be used; the message names the file and the problem."""


def _read_caption(path: Path) -> str:
    caption = path.read_text().strip()
    if not caption:
        raise DataError(f"{path}: empty caption")
    return caption


def _folder_pairs(folder: Path, suffixes) -> list[tuple[Path, str]]:
    """The media files under ``folder``, subfolders included (video2dataset's ``files`` output: ``00000/``,
    ``00001/``, ... shards), hidden ones skipped, each with the caption of its ``.txt`` twin."""
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in suffixes and path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: no files ending in {', '.join(suffixes)}, in it or its subfolders")
    pairs = []
    for path in files:
        caption_file = path.with_suffix(".txt")
        if not caption_file.exists():
            raise DataError(f"{path}: no caption file {caption_file.name} beside it")
        pairs.append((path, _read_caption(caption_file)))
    return pairs


PATH_COLUMNS = ("file_name", "path")  # besides the kind's own ("video", "image")
CAPTION_COLUMNS = ("caption", "text", "prompt")


def _read_rows(table: Path) -> list[dict]:
    """The rows of a CSV (header line) or JSON-lines file, as dicts."""
    if table.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(table.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{table}:{number}: not a JSON object per line: {error}") from None
                if not isinstance(row, dict):
                    raise DataError(f"{table}:{number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    with table.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _table_pairs(table: Path, root: Path, kind: str) -> list[tuple[Path, str]]:
    rows = _read_rows(table)
    if not rows:
        raise DataError(f"{table}: no rows")
    columns = set(rows[0])
    path_column = next((c for c in (kind, *PATH_COLUMNS) if c in columns), None)
    caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
    webvid = kind == "video" and {"videoid", "page_dir", "name"} <= columns
    if not webvid and (path_column is None or caption_column is None):
        raise DataError(f"{table}: expected a path column ({', '.join((kind, *PATH_COLUMNS))}) and a caption column "
                        f"({', '.join(CAPTION_COLUMNS)})" + (" or WebVid's (videoid, page_dir, name)"
                                                            if kind == "video" else "")
                        + f"; found {sorted(columns)}")
    pairs = []
    for number, row in enumerate(rows, start=2 if table.suffix.lower() == ".csv" else 1):
        if webvid:  # {page_dir}/{videoid}.mp4, or all in root as AnimateDiff's WebVid10M loader reads them
            path, caption = root / str(row["page_dir"]) / f"{row['videoid']}.mp4", row["name"]
            flat = root / f"{row['videoid']}.mp4"
            path = flat if not path.is_file() and flat.is_file() else path
        else:
            path, caption = root / str(row.get(path_column) or ""), row.get(caption_column)
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{table}:{number}: empty caption")
        pairs.append((path, caption.strip()))
    return pairs


def _line_pairs(folder: Path, paths_file: Path) -> list[tuple[Path, str]]:
    """``prompts.txt`` and ``videos.txt``/``images.txt``: line i of each is one item."""
    prompts = [line.strip() for line in (folder / "prompts.txt").read_text().splitlines() if line.strip()]
    paths = [line.strip() for line in paths_file.read_text().splitlines() if line.strip()]
    if len(prompts) != len(paths):
        raise DataError(f"{folder}: prompts.txt has {len(prompts)} lines and {paths_file.name} {len(paths)}; "
                        "they pair line by line")
    if not paths:
        raise DataError(f"{folder}: {paths_file.name} lists no files")
    return [(folder / path, prompt) for path, prompt in zip(paths, prompts)]


def _pairs(source, root, suffixes, kind) -> list[tuple[Path, str]]:
    source = Path(source)
    if not source.exists():
        raise DataError(f"data source not found: {source}")
    if source.is_dir():
        metadata = next((source / name for name in ("metadata.jsonl", "metadata.csv") if (source / name).is_file()),
                        None)
        paths_file = source / f"{kind}s.txt"
        if metadata is not None:
            pairs = _table_pairs(metadata, Path(root or source), kind)
        elif (source / "prompts.txt").is_file() and paths_file.is_file():
            pairs = _line_pairs(source, paths_file)
        else:
            pairs = _folder_pairs(source, suffixes)
    else:
        pairs = _table_pairs(source, Path(root or source.parent), kind)
    missing = [str(p) for p, _ in pairs if not p.is_file()]
    if missing:
        raise DataError(f"{source}: {len(missing)} listed file(s) missing, e.g. {missing[0]}")
    return pairs


def resize_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 3, H, W]`` float -> ``[N, 3, size, size]``: shorter side resized to ``size`` (antialiased bilinear),
    then the centre crop."""
    height, width = frames.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return frames[..., top:top + size, left:left + size]


def upright_rgb(frame) -> np.ndarray:
    """A decoded PyAV video frame as ``uint8 [H, W, 3]``, turned by the rotation its container states (the display
    matrix of a phone's portrait clip, stored as landscape frames), as players show it."""
    array = frame.to_ndarray(format="rgb24")
    quarter_turns = round(getattr(frame, "rotation", 0) / 90) % 4  # anticlockwise degrees (PyAV >= 14)
    return np.ascontiguousarray(np.rot90(array, k=quarter_turns)) if quarter_turns else array


def read_rgb_image(path):
    """The image file at ``path`` as an RGB ``PIL.Image``, turned upright by its EXIF orientation tag (as viewers,
    and diffusers' ``load_image``, show camera photos). A file that cannot be read raises :class:`DataError`."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            return _eight_bit(ImageOps.exif_transpose(image)).convert("RGB")
    except OSError as error:  # PIL.UnidentifiedImageError included
        raise DataError(f"{path}: cannot read image: {error}") from error


def _eight_bit(image):
    """``image`` with 16-bit (``I;16*``, ``I``) or float (``F``, taken as 0..1) grey levels scaled to 8 bits, as
    depth maps are often saved; PIL's own conversion clips them at 255, turning most of such a map white."""
    from PIL import Image

    if image.mode.startswith("I"):
        scale = 255 / 65535
    elif image.mode == "F":
        scale = 255.0
    else:
        return image
    levels = np.asarray(image, dtype=np.float64) * scale
    return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8))  # 8-bit grey ("L")


def decode_video(path: Path, select: Callable[[int], list[int]] | None = None) -> np.ndarray:
    """Frames of a video as ``uint8 [N, H, W, 3]`` (PyAV): all of them, or those at ``select(frame_count)``'s
    indices, in that order (repeats allowed).

    With ``select`` and a container that states its frame count, decoding stops after the last chosen frame and
    only the chosen frames are converted to RGB. The conversion, not the decode, is most of the cost: for 18 frames
    up to frame 145 of a 300-frame 336x596 H.264 clip, 0.03 s against 0.20 s for the whole clip (2-core EPYC),
    and 18 frames held instead of 300. Without a stated count (WebM), or when the file holds fewer frames than it
    states, every frame is decoded first. Frames come turned as players show them (:func:`upright_rgb`).
    """
    import av

    try:
        if select is not None:
            with av.open(str(path)) as container:
                stated = container.streams.video[0].frames if container.streams.video else 0
                indices = select(stated) if stated > 0 else None
                if indices:
                    wanted, chosen, last = set(indices), {}, max(indices)
                    for position, frame in enumerate(container.decode(video=0)):
                        if position in wanted and position not in chosen:
                            chosen[position] = upright_rgb(frame)
                        if position == last:
                            return _stack_frames([chosen[i] for i in indices], path)
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            frames = [upright_rgb(frame) for frame in container.decode(video=0)]
    except (av.error.FFmpegError, OSError) as error:
        raise DataError(f"{path}: cannot decode video: {error}") from error
    if not frames:
        raise DataError(f"{path}: no video frames")
    video = _stack_frames(frames, path)
    return video if select is None else video[select(len(video))]


def _stack_frames(frames: list[np.ndarray], path) -> np.ndarray:
    """``[N, H, W, 3]``; a video whose frames change size midway (a stream spliced from several resolutions) is a
    :class:`DataError`, so training skips it like any other unreadable file."""
    sizes = sorted({frame.shape for frame in frames})
    if len(sizes) > 1:
        listed = ", ".join(f"{height}x{width}" for height, width, _ in sizes)
        raise DataError(f"{path}: its frames change size midway ({listed})")
    return np.stack(frames)


class _SkipsUnreadable(torch.utils.data.Dataset):
    """``dataset[i]`` is item i, read by ``self._read(i)``; with ``skip_unreadable`` an item whose file cannot be
    read (a :class:`DataError`: a corrupt or truncated download, say) is replaced by the next readable one, and a
    warning names the file (once). A large crawl (WebVid) holds some such files; without this, training would stop
    at the first. Deterministic: the same index always gives the same item. Every file unreadable is an error."""

    items: list
    skip_unreadable: bool

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.items)):
            position = (index + attempt) % len(self.items)
            try:
                return self._read(position)
            except DataError as error:
                if not self.skip_unreadable:
                    raise
                unreadable = self.__dict__.setdefault("unreadable", set())
                if position not in unreadable:
                    unreadable.add(position)
                    warnings.warn(f"{error}; skipped: item {position} is replaced by the next readable one "
                                  "(data.skip_unreadable: false makes this an error)", stacklevel=2)
        raise DataError(f"none of the {len(self.items)} files could be read (the warnings above name each)")


class VideoTextDataset(_SkipsUnreadable):
    """Clips of ``frames`` frames, ``stride`` apart, resized and centre-cropped to ``size``:
    ``dataset[i] = dict(pixel_values=float32 [F, 3, size, size] in [-1, 1], caption)``.

    The clip starts at a position drawn from ``seed`` and ``i`` (deterministic). A video too short for the stride
    is sampled with the largest stride that fits; one with fewer than ``frames`` frames repeats its last frame.
    ``skip_unreadable``: a video that cannot be decoded gives way to the next readable one, with a warning
    (off: an error).
    """

    def __init__(self, source, frames: int = 16, stride: int = 4, size: int = 64, root=None, seed: int = 0,
                 skip_unreadable: bool = True):
        if frames < 1 or stride < 1 or size < 8:
            raise DataError(f"VideoTextDataset: need frames >= 1, stride >= 1, size >= 8; got {frames}, {stride}, {size}")
        self.items = _pairs(source, root, VIDEO_SUFFIXES, "video")
        self.frames, self.stride, self.size, self.seed = frames, stride, size, seed
        self.skip_unreadable = skip_unreadable

    def frame_indices(self, available: int, index: int) -> list[int]:
        """Indices of the frames clip ``index`` takes from a video of ``available`` frames."""
        stride = min(self.stride, max(1, (available - 1) // max(1, self.frames - 1)))
        span = stride * (self.frames - 1) + 1
        start = int(np.random.default_rng([self.seed, index]).integers(0, max(1, available - span + 1)))
        return [min(start + k * stride, available - 1) for k in range(self.frames)]

    def _read(self, index: int) -> dict:
        path, caption = self.items[index]
        video = decode_video(path, select=lambda available: self.frame_indices(available, index))
        chosen = torch.from_numpy(video).permute(0, 3, 1, 2).float()
        pixels = resize_center_crop(chosen, self.size) / 127.5 - 1.0
        return dict(pixel_values=pixels.clamp(-1, 1), caption=caption)


class ImageTextDataset(_SkipsUnreadable):
    """``dataset[i] = dict(pixel_values=float32 [3, size, size] in [-1, 1], caption)``; ``skip_unreadable`` as in
    :class:`VideoTextDataset`."""

    def __init__(self, source, size: int = 64, root=None, skip_unreadable: bool = True):
        if size < 8:
            raise DataError(f"ImageTextDataset: size must be >= 8, got {size}")
        self.items = _pairs(source, root, IMAGE_SUFFIXES, "image")
        self.size = size
        self.skip_unreadable = skip_unreadable

    def _read(self, index: int) -> dict:
        path, caption = self.items[index]
        image = np.array(read_rgb_image(path))  # a writable copy for torch.from_numpy
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        return dict(pixel_values=(resize_center_crop(pixels, self.size)[0] / 127.5 - 1.0).clamp(-1, 1),
                    caption=caption)
