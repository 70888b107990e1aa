import csv

import numpy as np
import pytest
import torch
from PIL import Image

from animatelcm.export import export_to_gif, export_to_mp4
from animatelcm.training.data import DataError, ImageTextDataset, VideoTextDataset, decode_video, read_rgb_image
from animatelcm.training.synthetic import COLOURS, MovingShapes


@pytest.fixture
def video_folder(tmp_path):
    shapes = MovingShapes(num_clips=3, frames=24, size=48, seed=0)
    folder = tmp_path / "videos"
    folder.mkdir()
    for index in range(3):
        clip = shapes.clip(index)
        export_to_mp4(clip["frames"], folder / f"clip{index}.mp4", fps=8, crf=0)
        (folder / f"clip{index}.txt").write_text(clip["caption"] + "\n")
    return folder, shapes


def red_centroid_x(frame):
    """x centroid of reddish pixels in a [3, H, W] frame in [-1, 1]."""
    rgb = ((frame + 1) * 127.5).permute(1, 2, 0).numpy()
    mask = (rgb[..., 0] > 150) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)
    return np.nonzero(mask)[1].mean()


def test_folder_of_videos(video_folder):
    folder, shapes = video_folder
    data = VideoTextDataset(folder, frames=8, stride=2, size=32)
    assert len(data) == 3
    item = data[0]
    assert item["caption"] == shapes.clip(0)["caption"] == "a red circle moving left"
    assert item["pixel_values"].shape == (8, 3, 32, 32)
    assert -1 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1
    xs = [red_centroid_x(f) for f in item["pixel_values"]]
    assert all(b < a for a, b in zip(xs, xs[1:]))  # frame order kept: moving left
    indices = data.frame_indices(24, 0)
    assert np.all(np.diff(indices) == 2) and indices[-1] < 24


def test_short_videos_and_determinism(video_folder):
    folder, _ = video_folder
    data = VideoTextDataset(folder, frames=16, stride=4, size=32, seed=5)
    assert np.all(np.diff(data.frame_indices(24, 1)) == 1)  # stride lowered to fit 16 frames in 24
    assert data.frame_indices(10, 1)[-6:] == [9] * 6  # too short: last frame repeated
    assert torch.equal(data[2]["pixel_values"], VideoTextDataset(folder, frames=16, stride=4, size=32, seed=5)[2]["pixel_values"])


def write_webm(frames, path):
    """A VP9 WebM, whose container states no frame count (so decode_video decodes it whole)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=8)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif"])
def test_decoding_selected_frames_equals_indexing_the_whole_video(video_folder, suffix):
    folder, shapes = video_folder
    path = folder / "clip1.mp4"
    if suffix != ".mp4":
        path = folder / f"clip1{suffix}"
        frames = list(shapes.clip(1)["frames"])
        write_webm(frames, path) if suffix == ".webm" else export_to_gif(frames, path, fps=8)
    whole = decode_video(path)
    assert whole.shape[0] == 24 and whole.dtype == np.uint8
    for pick in ([3, 3, 0, 17, 5], [23], list(range(24))[::-1]):
        assert np.array_equal(decode_video(path, select=lambda available: pick), whole[pick])
    calls = []

    def last_frame(available):  # a container that overstates its count: the first call asks past the real end
        calls.append(available)
        return [0, 40] if len(calls) == 1 and suffix != ".webm" else [0, available - 1]

    assert np.array_equal(decode_video(path, select=last_frame), whole[[0, 23]])
    assert calls[-1] == 24 and len(calls) == (1 if suffix == ".webm" else 2)  # WebM states no count


def test_a_folder_of_shard_folders(video_folder, tmp_path):
    """video2dataset's files output: 00000/000000000.mp4 + .txt + .json per sample, one folder a shard; hidden
    folders are not data."""
    folder, shapes = video_folder
    for index in range(3):
        shard = tmp_path / "webvid" / f"{index // 2:05d}"
        shard.mkdir(parents=True, exist_ok=True)
        for suffix in (".mp4", ".txt"):
            (folder / f"clip{index}{suffix}").rename(shard / f"{index:09d}{suffix}")
        (shard / f"{index:09d}.json").write_text("{}")
    (tmp_path / "webvid" / ".trash").mkdir()
    (tmp_path / "webvid" / ".trash" / "old.mp4").write_bytes(b"")
    data = VideoTextDataset(tmp_path / "webvid", frames=4, size=16)
    assert [path.name for path, _ in data.items] == [f"{index:09d}.mp4" for index in range(3)]
    assert [data[index]["caption"] for index in range(3)] == [shapes.clip(index)["caption"] for index in range(3)]


def test_webvid_and_plain_csv(video_folder, tmp_path):
    folder, shapes = video_folder
    (tmp_path / "pages" / "000").mkdir(parents=True)
    (folder / "clip1.mp4").rename(tmp_path / "pages" / "000" / "42.mp4")
    with (tmp_path / "webvid.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        writer.writerow(["42", "http://example.invalid/42.mp4", "PT00H00M03S", "000", shapes.clip(1)["caption"]])
    data = VideoTextDataset(tmp_path / "webvid.csv", frames=4, size=16, root=tmp_path / "pages")
    assert data[0]["caption"] == shapes.clip(1)["caption"]
    (tmp_path / "pages" / "000" / "42.mp4").rename(tmp_path / "pages" / "42.mp4")  # AnimateDiff's flat folder
    data = VideoTextDataset(tmp_path / "webvid.csv", frames=4, size=16, root=tmp_path / "pages")
    assert data.items[0][0] == tmp_path / "pages" / "42.mp4" and data[0]["caption"] == shapes.clip(1)["caption"]
    (tmp_path / "pages" / "42.mp4").unlink()
    with pytest.raises(DataError, match=r"1 listed file\(s\) missing, e.g. .*pages/000/42.mp4"):
        VideoTextDataset(tmp_path / "webvid.csv", frames=4, size=16, root=tmp_path / "pages")
    with (tmp_path / "plain.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["video", "caption"], ["videos/clip0.mp4", "a clip"]])
    assert VideoTextDataset(tmp_path / "plain.csv", frames=4, size=16)[0]["caption"] == "a clip"


def test_hugging_face_and_line_paired_layouts(video_folder, tmp_path):
    """A folder with metadata.jsonl / metadata.csv (file_name + text or caption), a folder with prompts.txt +
    videos.txt, and a JSON-lines file list the same clips as the per-file captions do."""
    import json
    import shutil

    folder, shapes = video_folder
    captions = [shapes.clip(i)["caption"] for i in range(3)]
    expected = VideoTextDataset(folder, frames=4, size=16)
    layouts = {}
    for name in ("jsonl", "csv", "lines"):
        layout = tmp_path / name
        (layout / "clips").mkdir(parents=True)
        for i in range(3):
            shutil.copy(folder / f"clip{i}.mp4", layout / "clips" / f"clip{i}.mp4")
        layouts[name] = layout
    (layouts["jsonl"] / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"clips/clip{i}.mp4", "text": captions[i]}) + "\n" for i in range(3)))
    rows = [["file_name", "caption"], *([f"clips/clip{i}.mp4", captions[i]] for i in range(3))]
    with (layouts["csv"] / "metadata.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    (layouts["lines"] / "prompts.txt").write_text("\n".join(captions) + "\n")
    (layouts["lines"] / "videos.txt").write_text("\n".join(f"clips/clip{i}.mp4" for i in range(3)) + "\n")
    (tmp_path / "list.jsonl").write_text("".join(
        json.dumps({"video": f"jsonl/clips/clip{i}.mp4", "prompt": captions[i]}) + "\n" for i in range(3)))
    for source in (*layouts.values(), tmp_path / "list.jsonl"):
        data = VideoTextDataset(source, frames=4, size=16)
        assert len(data) == 3, source
        for i in range(3):
            assert data[i]["caption"] == captions[i]
            assert torch.equal(data[i]["pixel_values"], expected[i]["pixel_values"]), source
    (layouts["lines"] / "prompts.txt").write_text("one caption\n")
    with pytest.raises(DataError, match="prompts.txt has 1 lines and videos.txt 3"):
        VideoTextDataset(layouts["lines"])
    (tmp_path / "bad.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not a JSON object"):
        VideoTextDataset(tmp_path / "bad.jsonl")
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(images / "a.png")
    (images / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "black"}) + "\n")
    assert ImageTextDataset(images, size=16)[0]["caption"] == "black"


def test_missing_and_bad_data_fail_at_construction(video_folder, tmp_path):
    folder, _ = video_folder
    with pytest.raises(DataError, match="not found"):
        VideoTextDataset(tmp_path / "nope")
    (folder / "clip2.txt").unlink()
    with pytest.raises(DataError, match="clip2.txt"):
        VideoTextDataset(folder)
    with (tmp_path / "bad.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["video", "caption"], ["missing.mp4", "x"]])
    with pytest.raises(DataError, match="missing"):
        VideoTextDataset(tmp_path / "bad.csv")
    with (tmp_path / "columns.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["file", "text"], ["a.mp4", "x"]])
    with pytest.raises(DataError, match="expected a path column"):
        VideoTextDataset(tmp_path / "columns.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files"):
        VideoTextDataset(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "v.mp4").write_bytes(b"not a video")
    (broken / "v.txt").write_text("caption")
    with pytest.raises(DataError, match="cannot decode"):
        VideoTextDataset(broken, skip_unreadable=False)[0]
    with pytest.warns(UserWarning, match="v.mp4: cannot decode"), pytest.raises(DataError, match="none of the 1"):
        VideoTextDataset(broken)[0]


def test_unreadable_files_give_way_to_the_next_readable_item(video_folder, tmp_path):
    """A corrupt file in the listing does not stop training: its item is the next readable one (the same every
    time), and one warning names the file."""
    folder, shapes = video_folder
    (folder / "clip1.mp4").write_bytes((folder / "clip1.mp4").read_bytes()[:200])  # a truncated download
    data = VideoTextDataset(folder, frames=4, size=16)
    with pytest.warns(UserWarning, match=r"clip1.mp4: cannot decode.*item 1 is replaced") as caught:
        first, again = data[1], data[1]
    assert len([w for w in caught if "clip1.mp4" in str(w.message)]) == 1
    assert first["caption"] == again["caption"] == shapes.clip(2)["caption"]
    assert torch.equal(first["pixel_values"], data[2]["pixel_values"])
    images = tmp_path / "images"
    images.mkdir()
    for name, content in (("a", None), ("b", b"not a png")):
        path = images / f"{name}.png"
        if content is None:
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
        else:
            path.write_bytes(content)
        (images / f"{name}.txt").write_text(f"picture {name}")
    with pytest.warns(UserWarning, match="b.png: cannot read image"):
        assert ImageTextDataset(images, size=8)[1]["caption"] == "picture a"
    with pytest.raises(DataError, match="b.png: cannot read image"):
        ImageTextDataset(images, size=8, skip_unreadable=False)[1]


def test_image_text(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((40, 60, 3), COLOURS["blue"], dtype=np.uint8)).save(folder / "a.png")
    (folder / "a.txt").write_text("a blue square")
    data = ImageTextDataset(folder, size=32)
    item = data[0]
    assert item["caption"] == "a blue square" and item["pixel_values"].shape == (3, 32, 32)
    assert item["pixel_values"][2].mean() > 0.7 and item["pixel_values"][0].mean() < -0.5
    with (tmp_path / "images.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["image", "caption"], ["images/a.png", "blue"]])
    assert ImageTextDataset(tmp_path / "images.csv", size=16)[0]["caption"] == "blue"


def blocky_frames(count, height, width, seed=0):
    """uint8 ``[count, height, width, 3]`` of random 8x8 colour blocks: asymmetric, so every turn or mirror of it
    differs."""
    blocks = np.random.default_rng(seed).integers(0, 256, (count, height // 8, width // 8, 3), dtype=np.uint8)
    return blocks.repeat(8, axis=1).repeat(8, axis=2)


def with_display_matrix(source, target, matrix):
    """A copy of the MP4 ``source`` whose track header states the display ``matrix`` (nine 32-bit fixed-point
    numbers), as phones record portrait clips: landscape frames plus the turn players apply."""
    import struct

    data = bytearray(source.read_bytes())
    box = data.find(b"tkhd")
    assert box > 0 and data[box + 4] == 0  # a version-0 track header: the matrix follows 36 bytes of fields
    offset = box + 4 + 4 + 20 + 8 + 8
    data[offset:offset + 36] = struct.pack(">9I", *matrix)
    target.write_bytes(bytes(data))


# display matrices and the turn (numpy.rot90's k, anticlockwise quarter turns) players apply
DISPLAY_MATRICES = {-1: (0, 0x00010000, 0, 0xFFFF0000, 0, 0, 0, 0, 0x40000000),
                    2: (0xFFFF0000, 0, 0, 0, 0xFFFF0000, 0, 0, 0, 0x40000000),
                    1: (0, 0xFFFF0000, 0, 0x00010000, 0, 0, 0, 0, 0x40000000)}


@pytest.mark.parametrize("quarter_turns", sorted(DISPLAY_MATRICES))
def test_videos_are_decoded_as_players_show_them(tmp_path, quarter_turns):
    """A clip whose container states a rotation (a phone's portrait clip) is decoded turned as players show it,
    whole or by selected frames, and so trains upright."""
    frames = blocky_frames(6, 16, 32)
    export_to_mp4(frames, tmp_path / "stored.mp4", fps=8, crf=0)
    with_display_matrix(tmp_path / "stored.mp4", tmp_path / "turned.mp4", DISPLAY_MATRICES[quarter_turns])
    stored = decode_video(tmp_path / "stored.mp4")  # the same bitstream: the same pixels, turned
    assert stored.shape == frames.shape
    upright = np.rot90(stored, k=quarter_turns, axes=(1, 2))
    for video in (decode_video(tmp_path / "turned.mp4"),
                  decode_video(tmp_path / "turned.mp4", select=lambda available: [5, 0, 2])):
        expected = upright if len(video) == 6 else upright[[5, 0, 2]]
        assert video.flags.c_contiguous and np.array_equal(video, expected)


@pytest.mark.parametrize("orientation, quarter_turns", [(3, 2), (6, -1), (8, 1)])
def test_photos_are_read_upright_by_their_exif_orientation(tmp_path, orientation, quarter_turns):
    """A photo stored turned with an EXIF orientation tag (as cameras write them) is read as viewers show it, by
    the training data and by the CLI's --image and --control (as diffusers' load_image does)."""
    from animatelcm.cli import _read_picture

    stored = blocky_frames(1, 16, 32)[0]
    exif = Image.Exif()
    exif[0x0112] = orientation
    for folder, array, tags in (("tagged", stored, exif), ("upright", np.rot90(stored, k=quarter_turns), None)):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.ascontiguousarray(array)).save(tmp_path / folder / "photo.png", exif=tags or Image.Exif())
        (tmp_path / folder / "photo.txt").write_text("a photo")
    assert np.array_equal(np.asarray(_read_picture(tmp_path / "tagged" / "photo.png")),
                          np.rot90(stored, k=quarter_turns))
    assert torch.equal(ImageTextDataset(tmp_path / "tagged", size=16)[0]["pixel_values"],
                       ImageTextDataset(tmp_path / "upright", size=16)[0]["pixel_values"])


def test_sixteen_bit_and_float_grey_images_keep_their_levels(tmp_path):
    """Depth maps are often 16-bit PNGs (or float TIFFs); read as 8-bit grey levels in proportion, by the CLI's
    --control and --image and by the training data, not clipped at 255 into a white image."""
    from animatelcm.cli import _read_clip

    depth = np.linspace(0, 1, 24 * 24).reshape(24, 24)
    Image.fromarray(np.rint(depth * 65535).astype(np.uint16)).save(tmp_path / "0_depth16.png")
    Image.fromarray(depth.astype(np.float32)).save(tmp_path / "1_depth_float.tiff")
    expected = np.repeat(np.rint(depth * 255)[..., None], 3, axis=-1)
    for name in ("0_depth16.png", "1_depth_float.tiff"):
        assert np.abs(np.asarray(read_rgb_image(tmp_path / name)) - expected).max() <= 1, name
    frames = _read_clip(tmp_path, None, 24, 24, edges=False)  # [F, 3, H, W] in [0, 1]
    assert frames.shape == (2, 3, 24, 24)
    assert (frames * 255 - torch.from_numpy(expected).permute(2, 0, 1)).abs().max() <= 1.01


def test_a_video_whose_frames_change_size_is_skipped_like_an_unreadable_one(video_folder, monkeypatch):
    """A stream spliced from several resolutions is a DataError naming the sizes (training skips it with a
    warning), whole or by selected frames, not a crash in numpy."""
    from animatelcm.training import data as data_module

    folder, _ = video_folder
    real, calls = data_module.upright_rgb, []

    def shrinking(frame):  # every frame after the first comes out smaller
        calls.append(1)
        array = real(frame)
        return array if len(calls) == 1 else array[:-8]

    monkeypatch.setattr(data_module, "upright_rgb", shrinking)
    for select in (None, lambda available: [0, 3]):
        calls.clear()
        with pytest.raises(DataError, match=r"clip0.mp4: its frames change size midway \(40x48, 48x48\)"):
            decode_video(folder / "clip0.mp4", select=select)
    calls.clear()
    with pytest.warns(UserWarning, match="change size midway"):
        assert VideoTextDataset(folder, frames=4, size=16)[0]["pixel_values"].shape == (4, 3, 16, 16)
