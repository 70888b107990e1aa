from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from animatelcm import export_to_gif, export_to_mp4, export_video
from animatelcm.export import frames_to_uint8


def frames(n=6, h=24, w=32):
    rng = np.random.default_rng(0)
    return rng.random((n, h, w, 3), dtype=np.float32)


def test_formats_normalise_to_uint8():
    f = frames()
    as_uint8 = frames_to_uint8(f)
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (6, 24, 32, 3)
    pil = [Image.fromarray(x) for x in as_uint8]
    assert np.array_equal(frames_to_uint8(pil), as_uint8)
    tensor = torch.from_numpy(f).permute(0, 3, 1, 2)[None]  # [1, F, 3, H, W] as output_type="pt"
    assert np.array_equal(frames_to_uint8(tensor), as_uint8)
    assert np.array_equal(frames_to_uint8(f[None]), as_uint8)


def test_gif_round_trip(tmp_path):
    f = frames()
    path = export_to_gif(f, tmp_path / "sub" / "clip.gif", fps=10)
    read = iio.imread(path)
    assert read.shape[:3] == (6, 24, 32)


def test_mp4_round_trip_with_odd_size(tmp_path):
    smooth = np.repeat(np.linspace(0, 1, 5, dtype=np.float32)[:, None, None, None], 3, axis=-1) * np.ones((5, 23, 31, 3), np.float32)
    path = export_to_mp4(smooth, tmp_path / "clip.mp4", fps=12)
    read = iio.imread(path)
    assert read.shape == (5, 24, 32, 3)
    assert np.abs(read[:, :23, :31].astype(float) - frames_to_uint8(smooth).astype(float)).mean() < 4


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=".gif or .mp4"):
        export_video(frames(), tmp_path / "clip.avi")
    with pytest.raises(ValueError, match="fps"):
        export_to_gif(frames(), tmp_path / "a.gif", fps=0)
    with pytest.raises(ValueError, match="no frames"):
        export_to_gif([], tmp_path / "a.gif")
    with pytest.raises(ValueError, match="expected frames"):
        export_to_gif(np.zeros((4, 4)), tmp_path / "a.gif")
    broken = frames()
    broken[2, 5, 5, 1] = np.nan
    broken[3, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="2 of 13824 frame values are NaN or infinite"):
        export_video(broken, tmp_path / "b.mp4")
    assert not (tmp_path / "b.mp4").exists()


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_a_failed_export_keeps_the_earlier_file_and_leaves_no_partial_one(suffix, tmp_path, monkeypatch):
    import av
    import imageio.v3

    path = export_video(frames(), tmp_path / f"clip{suffix}")
    earlier = path.read_bytes()

    def fail(target, *args, **kwargs):  # the disk fills up part way through the file
        if not isinstance(target, np.ndarray):
            Path(target).write_bytes(b"GIF89a")
        raise OSError("No space left on device")

    if suffix == ".gif":
        monkeypatch.setattr(imageio.v3, "imwrite", fail)
    else:  # fails at the last frame, after the encoder has written the first ones
        real, calls = av.VideoFrame.from_ndarray, []

        def from_ndarray(*args, **kwargs):
            calls.append(1)
            return fail(args[0]) if len(calls) == 60 else real(*args, **kwargs)

        monkeypatch.setattr(av.VideoFrame, "from_ndarray", from_ndarray)
    with pytest.raises(OSError, match="No space"):
        export_video(frames(n=60), path)
    assert path.read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    monkeypatch.undo()
    export_video(frames(n=3), path)  # a complete write replaces it
    assert iio.imread(path).shape[0] == 3 and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
