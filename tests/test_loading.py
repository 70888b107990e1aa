import copy
import re
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from animatelcm import AnimateLCMPipeline, load_motion_adapter, load_pipeline
from animatelcm.loading import (
    CheckpointError,
    diffusers_to_original_motion_keys,
    infer_motion_adapter_config,
    load_lora,
    save_motion_adapter,
)
from animatelcm.training.models import load_spatial_lora

TINY_OVERRIDES = {"motion_num_attention_heads": 2, "motion_norm_num_groups": 8}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def original_layout_file(adapter, path, with_pos_encoder=False):
    state = diffusers_to_original_motion_keys(adapter.state_dict())
    if with_pos_encoder:
        for key, value in adapter.state_dict().items():
            if key.endswith("pos_embed.pe"):
                stem = key.replace("motion_modules.", "motion_modules.").rsplit(".transformer_blocks.", 1)
                block = stem[1].split(".")[0]
                prefix = stem[0].replace("motion_modules.", "motion_modules.", 1)
                for attention in (0, 1):
                    original = (f"{prefix}.temporal_transformer.transformer_blocks.{block}."
                                f"attention_blocks.{attention}.pos_encoder.pe")
                    state[original] = value.clone()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_original_layout_without_pos_encoder(components, tmp_path):
    adapter = components["motion_adapter"]
    path = original_layout_file(adapter, tmp_path / "mm.safetensors")
    assert any(".temporal_transformer." in k for k in load_file(str(path)))
    loaded = load_motion_adapter(path, config=TINY_OVERRIDES)
    assert loaded.config.block_out_channels == (16, 32, 32, 32)
    assert loaded.config.motion_max_seq_length == 32
    assert_same_weights(adapter, loaded)


def test_original_layout_with_pos_encoder_infers_sequence_length(tmp_path):
    from diffusers import MotionAdapter

    adapter = MotionAdapter(block_out_channels=(16, 24), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=4, motion_max_seq_length=24, use_motion_mid_block=False)
    path = original_layout_file(adapter, tmp_path / "mm.safetensors", with_pos_encoder=True)
    assert any("pos_encoder" in k for k in load_file(str(path)))
    loaded = load_motion_adapter(path, config={"motion_num_attention_heads": 2, "motion_norm_num_groups": 4})
    assert loaded.config.motion_max_seq_length == 24
    assert loaded.config.use_motion_mid_block is False
    assert loaded.config.motion_layers_per_block == 1
    assert_same_weights(adapter, loaded)
    longer = load_motion_adapter(path, config={"motion_num_attention_heads": 2, "motion_norm_num_groups": 4,
                                               "motion_max_seq_length": 64})
    assert longer.config.motion_max_seq_length == 64


def test_save_and_load_all_layouts(components, tmp_path):
    adapter = components["motion_adapter"]
    for target, layout in ((tmp_path / "a.safetensors", "original"), (tmp_path / "b.safetensors", "diffusers"),
                           (tmp_path / "folder", None)):
        save_motion_adapter(adapter, target, layout=layout or "original")
        loaded = load_motion_adapter(target, config=None if layout is None else TINY_OVERRIDES)
        assert_same_weights(adapter, loaded)
    assert not list(tmp_path.glob("*.tmp"))


def test_inferred_config_runs_in_a_pipeline(components, tmp_path):
    path = save_motion_adapter(components["motion_adapter"], tmp_path / "mm.safetensors")
    loaded = load_motion_adapter(path, config=TINY_OVERRIDES)
    pipe = AnimateLCMPipeline(**{**components, "motion_adapter": loaded})
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", num_frames=4, height=32, width=32, num_inference_steps=2, output_type="latent")
    assert out.frames.shape == (1, 4, 4, 4, 4)


def test_bad_files(components, tmp_path):
    adapter = components["motion_adapter"]
    good = save_motion_adapter(adapter, tmp_path / "good.safetensors")
    state = load_file(str(good))

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_motion_adapter(truncated, config=TINY_OVERRIDES)

    missing = dict(state)
    missing.pop(next(k for k in missing if k.endswith("proj_out.weight") and k.startswith("up_blocks.1")))
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing"):
        load_motion_adapter(tmp_path / "missing.safetensors", config=TINY_OVERRIDES)

    extra = dict(state, **{"down_blocks.0.motion_modules.0.surprise.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_motion_adapter(tmp_path / "extra.safetensors", config=TINY_OVERRIDES)

    wrong = dict(state)
    key = next(k for k in wrong if k.endswith("attention_blocks.0.to_q.weight"))
    wrong[key] = torch.randn(3, 3)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_motion_adapter(tmp_path / "wrong.safetensors", config=TINY_OVERRIDES)

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a motion module"):
        load_motion_adapter(tmp_path / "other.safetensors")

    with pytest.raises(CheckpointError, match="not found"):
        load_motion_adapter(tmp_path / "absent.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load_motion_adapter(tmp_path / "notes.txt")


def test_pickle_needs_consent(components, tmp_path):
    state = diffusers_to_original_motion_keys(components["motion_adapter"].state_dict())
    path = tmp_path / "mm.ckpt"
    torch.save({**state, "animatediff_config": {"use_motion_mid_block": True}}, path)  # as the v3 releases
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_motion_adapter(path)
    loaded = load_motion_adapter(path, config=TINY_OVERRIDES, allow_pickle=True)
    assert_same_weights(components["motion_adapter"], loaded)
    for not_weights, found in (({"epoch": 3, "animatediff_config": {}}, r"no tensors among its entries \['a"),
                               ([torch.zeros(1)], "found a list")):
        torch.save(not_weights, path)
        with pytest.raises(CheckpointError, match=found):
            load_motion_adapter(path, allow_pickle=True)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_motion_modules_inside_a_whole_video_unet_checkpoint(components, tmp_path, layout):
    """AnimateDiff's train.py saves the whole video UNet ({"global_step", "state_dict"}, names prefixed module. by
    DDP); its motion modules are read, the rest left out with a warning."""
    from diffusers import UNetMotionModel

    state = UNetMotionModel.from_unet2d(copy.deepcopy(components["unet"]), components["motion_adapter"]).state_dict()
    if layout == "original":
        path = tmp_path / "checkpoint-epoch-3.ckpt"
        torch.save({"epoch": 3, "global_step": 1000,
                    "state_dict": {"module." + k: v for k, v in diffusers_to_original_motion_keys(state).items()}},
                   path)
    else:
        path = tmp_path / "unet.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.warns(UserWarning, match=r"whole video UNet's checkpoint; .* leaving out its \d+ other tensors"):
        adapter = load_motion_adapter(path, config=TINY_OVERRIDES, allow_pickle=True)
    assert_same_weights(adapter, components["motion_adapter"])


def released_encoder_features(encoder, latent, frames, motion_scale=0.8, blocks_per_level=2):
    """AnimateLCM-I2V's image encoder as its public code computes it, step by step on the raw tensors: the latent
    repeated over frames ((b t) order), conv_in, + motion_scale * a sinusoid with sin in the even and cos in the odd
    channels, then per block: (first block of a level after the first) replicate-pad to even and 2x2 average
    pooling, the 1x1 in_conv where present, x + block2(relu(block1(x))); a level's feature is its last block's
    output."""
    import math

    import torch.nn.functional as F

    def conv(name, x, padding=0):
        return F.conv2d(x, encoder[f"{name}.weight"], encoder[f"{name}.bias"], padding=padding)

    x = conv("conv_in", latent.repeat_interleave(frames, dim=0), padding=1)
    width = x.shape[1]
    position = torch.arange(frames, dtype=torch.float32)[:, None]
    rates = torch.exp(torch.arange(0, width, 2).float() * (-math.log(10000.0) / width))
    table = torch.zeros(frames, width)
    table[:, 0::2] = torch.sin(position * rates)
    table[:, 1::2] = torch.cos(position * rates)
    x = x + motion_scale * table.repeat(latent.shape[0], 1)[:, :, None, None]
    features, blocks = [], 1 + max(int(key.split(".")[1]) for key in encoder if key.startswith("body."))
    for index in range(blocks):
        if index % blocks_per_level == 0 and index > 0:
            x = F.avg_pool2d(F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), mode="replicate"), 2)
        if f"body.{index}.in_conv.weight" in encoder:
            x = conv(f"body.{index}.in_conv", x)
        x = x + conv(f"body.{index}.block2", F.relu(conv(f"body.{index}.block1", x, padding=1)))
        if index % blocks_per_level == blocks_per_level - 1:
            features.append(x)
    return features


def test_animatelcm_i2v_release_gives_its_motion_modules_and_image_encoder(components, tmp_path):
    """AnimateLCM_sd15_i2v.ckpt holds the motion modules and the image encoder: load_motion_adapter reads the
    former, load_image_adapter the latter, which computes what the released code computes (odd latent sizes
    included); saved with a pipeline, it loads back."""
    from ldm_layout import write_animatelcm_i2v_release

    from animatelcm import AnimateLCMImageEncoder, load_image_adapter

    path = tmp_path / "AnimateLCM_sd15_i2v.ckpt"
    widths = tuple(components["unet"].config.block_out_channels)
    encoder_state = write_animatelcm_i2v_release(path, components["motion_adapter"], widths)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_image_adapter(path)
    assert_same_weights(load_motion_adapter(path, config=TINY_OVERRIDES, allow_pickle=True),
                        components["motion_adapter"])
    encoder = load_image_adapter(path, allow_pickle=True)
    assert isinstance(encoder, AnimateLCMImageEncoder)
    assert tuple(encoder.config.block_out_channels) == widths and encoder.config.blocks_per_level == 2
    latent = torch.randn(2, 4, 7, 5)
    with torch.no_grad():
        got = encoder(latent, num_frames=3)
    want = released_encoder_features(encoder_state, latent, frames=3)
    assert [tuple(f.shape) for f in got] == [(6, 16, 7, 5), (6, 32, 4, 3), (6, 32, 2, 2), (6, 32, 1, 1)]
    for level, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"level {level}")

    pipe = AnimateLCMPipeline(**components, image_adapter=encoder)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = AnimateLCMPipeline.from_pretrained(tmp_path / "saved", local_files_only=True).image_adapter
    assert isinstance(loaded, AnimateLCMImageEncoder) and isinstance(
        load_image_adapter(tmp_path / "saved" / "image_adapter"), AnimateLCMImageEncoder)
    assert_same_weights(loaded, encoder)
    torch.save({k: v for k, v in torch.load(path).items() if not k.startswith("img_encoder.body.3.")},
               tmp_path / "cut.ckpt")
    with pytest.raises(CheckpointError, match=r"encoder blocks missing \(block widths read: \[16, 16, 32, 0,"):
        load_image_adapter(tmp_path / "cut.ckpt", allow_pickle=True)
    with pytest.raises(CheckpointError, match="holds no AnimateLCM-I2V image encoder"):
        load_image_adapter(save_motion_adapter(components["motion_adapter"], tmp_path / "mm.safetensors"))


def test_full_size_sd15_original_layout(tmp_path):
    """A motion module at AnimateLCM's real size (SD1.5 widths, 2/3 layers, mid block, 8 heads), in the original
    key layout without pos_encoder keys, fp16: ~450M parameters."""
    from accelerate import init_empty_weights
    from diffusers import MotionAdapter

    with init_empty_weights():
        shapes = {k: v.shape for k, v in MotionAdapter().state_dict().items() if not k.endswith("pos_embed.pe")}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=generator, dtype=torch.float32).to(torch.float16) * 0.02
             for k, s in shapes.items()}
    del shapes
    path = tmp_path / "AnimateLCM_sd15_t2v.safetensors"
    save_file(diffusers_to_original_motion_keys(state), str(path))
    adapter = load_motion_adapter(path)
    config = adapter.config
    assert tuple(config.block_out_channels) == (320, 640, 1280, 1280)
    assert config.motion_layers_per_block == 2
    assert config.use_motion_mid_block and config.motion_max_seq_length == 32
    assert config.motion_num_attention_heads == 8
    loaded = adapter.state_dict()
    for key in ("down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight",
                "up_blocks.3.motion_modules.2.proj_out.weight", "mid_block.motion_modules.0.norm.bias"):
        assert torch.equal(loaded[key], state[key])
    assert sum(v.numel() for v in loaded.values() if v.dtype == torch.float16) > 400_000_000


def test_infer_rejects_inconsistent_up_blocks(components):
    state = dict(components["motion_adapter"].state_dict())
    for key in [k for k in state if k.startswith("up_blocks.0.motion_modules.2.")]:
        del state[key]
    with pytest.raises(CheckpointError, match="up blocks"):
        infer_motion_adapter_config(state)


# --- LoRA -----------------------------------------------------------------------------------------------------

LORA_TARGETS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "up_blocks.1.attentions.2.proj_out",
                "mid_block.attentions.0.transformer_blocks.0.ff.net.2"]


def module_weight(unet, name):
    module = unet.get_submodule(name)
    return getattr(module, "base_layer", module).weight


def lora_deltas(unet, rank, generator):
    deltas = {}
    for name in LORA_TARGETS:
        weight = module_weight(unet, name)
        kernel = tuple(weight.shape[2:])  # 1x1 convs (SD1.5's proj_in/out) keep their kernel dims in LoRA files
        deltas[name] = (torch.randn(weight.shape[0], rank, *kernel, generator=generator) * 0.1,
                        torch.randn(rank, weight.shape[1], *kernel, generator=generator) * 0.1)
    return deltas


def delta(up, down, like):
    return (up.flatten(1) @ down.flatten(1)).view_as(like)


def write_kohya(path, deltas, alpha):
    state = {}
    for name, (up, down) in deltas.items():
        stem = "lora_unet_" + name.replace(".", "_")
        state[f"{stem}.lora_up.weight"] = up
        state[f"{stem}.lora_down.weight"] = down
        state[f"{stem}.alpha"] = torch.tensor(float(alpha))
    save_file(state, str(path))


def write_diffusers_lora(path, deltas):
    state = {}
    for name, (up, down) in deltas.items():
        state[f"unet.{name}.lora_A.weight"] = down
        state[f"unet.{name}.lora_B.weight"] = up
    save_file(state, str(path))


def test_kohya_and_diffusers_loras_stack_with_scales(components, tmp_path):
    pipe = AnimateLCMPipeline(**components)
    base = {name: module_weight(pipe.unet, name).detach().clone() for name in LORA_TARGETS}
    generator = torch.Generator().manual_seed(0)
    rank, alpha = 4, 2.0
    kohya = lora_deltas(pipe.unet, rank, generator)
    plain = lora_deltas(pipe.unet, rank, generator)
    write_kohya(tmp_path / "lcm_lora.safetensors", kohya, alpha)
    write_diffusers_lora(tmp_path / "style.safetensors", plain)
    load_lora(pipe, tmp_path / "lcm_lora.safetensors", "animatelcm", scale=0.8)
    load_lora(pipe, tmp_path / "style.safetensors", "style", scale=0.5)
    pipe.fuse_lora(adapter_names=["animatelcm", "style"])
    for name in LORA_TARGETS:
        expected = (base[name] + 0.8 * (alpha / rank) * delta(*kohya[name], base[name])
                    + 0.5 * delta(*plain[name], base[name]))
        torch.testing.assert_close(module_weight(pipe.unet, name), expected, atol=1e-5, rtol=1e-5)


def test_lora_errors(components, tmp_path):
    pipe = AnimateLCMPipeline(**components)
    (tmp_path / "two").mkdir()
    for name in ("a", "b"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "two" / f"{name}.safetensors"))
    with pytest.raises(CheckpointError, match=r"2 LoRA files .*\(a.safetensors, b.safetensors\); name the file"):
        load_lora(pipe, tmp_path / "two", "x")
    with pytest.raises(CheckpointError, match="not found"):
        load_lora(pipe, tmp_path / "nope.safetensors", "x")
    (tmp_path / "lora.ckpt").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_lora(pipe, tmp_path / "lora.ckpt", "x")


def kohya_layer(state, stem, weight, rank, alpha, generator):
    """Adds one kohya layer (``lora_down``, ``lora_up``, ``alpha``) for ``weight`` to ``state``; returns its
    delta ``alpha / rank * up @ down`` (what kohya's trainer and A1111 apply at multiplier 1)."""
    kernel = tuple(weight.shape[2:])
    up = torch.randn(weight.shape[0], rank, *[1] * len(kernel), generator=generator) * 0.1
    down = torch.randn(rank, weight.shape[1], *kernel, generator=generator) * 0.1
    state.update({f"{stem}.lora_up.weight": up, f"{stem}.lora_down.weight": down,
                  f"{stem}.alpha": torch.tensor(float(alpha))})
    return alpha / rank * delta(up, down, weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_kohya_loras_with_a_rank_and_alpha_per_layer_and_text_encoder_layers(components, tmp_path, suffix):
    """Resized and extracted kohya LoRAs (and LoCon's conv_alpha) give layers their own rank and alpha, and text
    encoder LoRAs may cover some projections only (q and v here, no out_proj: diffusers 0.42.1 fails on q/v alone
    and silently drops them beside MLP layers); every layer must get exactly its own delta."""
    pipe = AnimateLCMPipeline(**components)
    generator = torch.Generator().manual_seed(0)
    state, expected = {}, {}
    # every layer of the blocks kohya's networks train (not conv_in/conv_out or the time embedding, which they
    # leave alone and diffusers 0.32 would misname)
    layers = [(pipe.unet, "lora_unet_", name) for name, module in pipe.unet.named_modules()
              if type(module) in (torch.nn.Linear, torch.nn.Conv2d) and "motion_modules" not in name
              and name.startswith(("down_blocks", "mid_block", "up_blocks"))]
    layers += [(pipe.text_encoder, "lora_te_", name) for name, module in pipe.text_encoder.named_modules()
               if name.endswith(("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1"))]
    for model, prefix, name in layers:
        weight = model.get_submodule(name).weight
        rank, alpha = int(torch.randint(1, 6, (), generator=generator)), int(torch.randint(1, 8, (), generator=generator))
        kohya_name = name if prefix == "lora_unet_" else "text_model." + name.removeprefix("text_model.")
        expected[model, name] = weight.detach() + 0.6 * kohya_layer(
            state, prefix + kohya_name.replace(".", "_"), weight, rank, alpha, generator)
    path = tmp_path / f"resized{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    load_lora(pipe, path, "style", scale=0.6, fuse=True, allow_pickle=True)
    assert sum(model is pipe.text_encoder for model, _ in expected) == 3 * pipe.text_encoder.config.num_hidden_layers
    for (model, name), want in expected.items():
        torch.testing.assert_close(module_weight(model, name), want, atol=1e-5, rtol=1e-5, msg=name)
    # the trainer's reader of model.lora: the UNet's layers, at scale 1; pickles only with model.allow_pickle
    unet = AnimateLCMPipeline(**copy.deepcopy(components)).unet
    if suffix == ".ckpt":
        with pytest.raises(CheckpointError, match="allow_pickle"):
            load_spatial_lora(unet, path)
    load_spatial_lora(unet, path, allow_pickle=True)
    unet.fuse_lora(lora_scale=0.6)
    for (model, name), want in expected.items():
        if model is pipe.unet:
            torch.testing.assert_close(module_weight(unet, name), want, atol=1e-5, rtol=1e-5, msg=name)


def test_lycoris_networks_other_than_lora_are_refused(components, tmp_path):
    pipe = AnimateLCMPipeline(**components)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{stem}.hada_w1_a": torch.zeros(32, 2), f"{stem}.hada_w1_b": torch.zeros(2, 32),
               f"{stem}.hada_w2_a": torch.zeros(32, 2), f"{stem}.hada_w2_b": torch.zeros(2, 32),
               f"{stem}.alpha": torch.tensor(2.0)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(CheckpointError, match=r"loha.safetensors: a LyCORIS network .*\.hada_w1_a.*LoHa"):
        load_lora(pipe, tmp_path / "loha.safetensors", "loha")
    save_file({f"{stem}.lora_down.weight": torch.zeros(2, 32), f"{stem}.alpha": torch.tensor(2.0)},
              str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match=r"half.safetensors: .*\.alpha has no .*lora_up"):
        load_lora(pipe, tmp_path / "half.safetensors", "half")
    assert not any(pipe.get_list_adapters().values())


# AnimateDiff motion LoRAs: diffusers module name -> the original release's name (v2_lora_*.ckpt); the spatial
# layer as in the v3 domain adapter (v3_sd15_adapter.ckpt), whose names are diffusers' attention-processor ones.
MOTION_LORA_TARGETS = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k":
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora",
    "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q":
        "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora",
    "up_blocks.1.motion_modules.2.transformer_blocks.0.attn2.to_out.0":
        "up_blocks.1.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.processor.to_out_lora",
    "mid_block.motion_modules.0.transformer_blocks.0.attn1.to_v":
        "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_v_lora",
}


def motion_lora_file(path, deltas, layout):
    """A motion LoRA with ``deltas`` {diffusers module: (up, down)} in one of the layouts people download: the
    original release's, diffusers' hub copies (``unet.`` + processor names), or ``unet.save_attn_procs``'s (no
    prefix)."""
    state = {}
    for name, (up, down) in deltas.items():
        processor = name.replace(".to_out.0", ".processor.to_out_lora")
        for projection in ("to_q", "to_k", "to_v"):
            processor = processor.replace(f".{projection}", f".processor.{projection}_lora")
        stem = {"original": MOTION_LORA_TARGETS[name], "diffusers": f"unet.{processor}",
                "unprefixed": processor}[layout]
        state[f"{stem}.down.weight"], state[f"{stem}.up.weight"] = down, up
    if path.suffix == ".ckpt":  # as AnimateDiff's releases: pickled, with their training config beside the tensors
        torch.save({"state_dict": {**state, "animatediff_config": {"motion_module_type": "Vanilla"}}}, path)
    else:
        save_file(state, str(path))
    return path


@pytest.mark.parametrize("layout, suffix", [("original", ".safetensors"), ("original", ".ckpt"),
                                            ("diffusers", ".safetensors"), ("unprefixed", ".safetensors")])
@pytest.mark.parametrize("in_a_folder", [False, True])  # a folder: diffusers' hub copies hold one such file
def test_motion_loras_load_in_the_layouts_people_download(components, tmp_path, layout, suffix, in_a_folder):
    pipe = AnimateLCMPipeline(**components)
    base = {name: module_weight(pipe.unet, name).detach().clone() for name in MOTION_LORA_TARGETS}
    generator = torch.Generator().manual_seed(0)
    deltas = {name: (torch.randn(weight.shape[0], 4, generator=generator),
                     torch.randn(4, weight.shape[1], generator=generator)) for name, weight in base.items()}
    (tmp_path / "hub").mkdir()
    path = motion_lora_file(tmp_path / "hub" / f"diffusion_pytorch_model{suffix}", deltas, layout)
    path = path.parent if in_a_folder else path
    if suffix == ".ckpt":
        with pytest.raises(CheckpointError, match="allow_pickle"):
            load_lora(pipe, path, "zoom")
    load_lora(pipe, path, "zoom", scale=0.7, allow_pickle=suffix == ".ckpt")
    pipe.fuse_lora(adapter_names=["zoom"])
    for name, (up, down) in deltas.items():  # AnimateDiff applies scale * up @ down (no rank scaling)
        torch.testing.assert_close(module_weight(pipe.unet, name), base[name] + 0.7 * up @ down, atol=1e-5, rtol=1e-5)


def test_a_lora_for_no_layer_of_the_pipeline_is_refused(components, tmp_path):
    pipe = AnimateLCMPipeline(**components)
    stem = "unet.down_blocks.1.attentions.0.transformer_blocks.9.attn1.to_q"  # SDXL's ten-block transformers
    save_file({f"{stem}.lora_A.weight": torch.zeros(4, 32), f"{stem}.lora_B.weight": torch.zeros(32, 4)},
              str(tmp_path / "sdxl.safetensors"))
    stem = "transformer.single_transformer_blocks.0.attn.to_q"  # a Flux LoRA
    save_file({f"{stem}.lora_A.weight": torch.zeros(4, 32), f"{stem}.lora_B.weight": torch.zeros(32, 4)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="sdxl.safetensors: "):  # diffusers' words, or ours
        load_lora(pipe, tmp_path / "sdxl.safetensors", "sdxl")
    with pytest.raises(CheckpointError, match="other.safetensors: .*(none of its tensors names a layer|not found in "
                                              "the base model)"):  # ours; diffusers < 0.35 says it first
        load_lora(pipe, tmp_path / "other.safetensors", "other")
    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{stem}.lora_A.weight": torch.zeros(4, 99), f"{stem}.lora_B.weight": torch.zeros(99, 4)},
              str(tmp_path / "wrong_width.safetensors"))
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_lora(pipe, tmp_path / "wrong_width.safetensors", "wrong_width")
    assert not any(pipe.get_list_adapters().values())
    assert all(type(module) in (torch.nn.Linear, torch.nn.Conv2d) for module in pipe.unet.modules()
               if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or "lora" in type(module).__module__)


# --- whole pipelines ------------------------------------------------------------------------------------------

@pytest.fixture
def sd_folder(components, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = tmp_path / "sd15"
    StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                            tokenizer=components["tokenizer"], unet=components["unet"], scheduler=DDIMScheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def generate(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle moving right", num_frames=4, height=32, width=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(seed), latents=torch.randn(1, 4, 4, 4, 4,
                generator=torch.Generator().manual_seed(seed)), output_type="np").frames


def test_load_pipeline_from_parts_and_saved_folder(components, sd_folder, tmp_path):
    motion = save_motion_adapter(components["motion_adapter"], tmp_path / "mm.safetensors")
    generator = torch.Generator().manual_seed(1)
    write_kohya(tmp_path / "lcm.safetensors", lora_deltas(components["unet"], 4, generator), 4.0)
    pipe = load_pipeline(base=sd_folder, motion_module=motion, motion_config=TINY_OVERRIDES,
                         lcm_lora=tmp_path / "lcm.safetensors", lcm_lora_scale=0.8)
    assert pipe.scheduler.config.original_inference_steps == 100
    direct = AnimateLCMPipeline(**components)
    load_lora(direct, tmp_path / "lcm.safetensors", "animatelcm", scale=0.8)
    assert abs(generate(pipe) - generate(direct)).max() <= 1e-5

    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = load_pipeline(tmp_path / "saved")
    assert abs(generate(reloaded) - generate(pipe)).max() <= 1e-5


def test_saved_folder_keeps_its_scheduler(components, tmp_path, monkeypatch):
    """load_pipeline keeps a folder's scheduler (an LCM one on the fused step, same config); the CLI samples a
    DDIM folder with AnimateLCM's scheduler on the folder's noise schedule."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, LCMScheduler

    from animatelcm import LCMScheduler as FusedLCMScheduler
    from animatelcm.cli import main

    lcm = LCMScheduler(beta_schedule="linear", original_inference_steps=50, timestep_scaling=5.0)
    AnimateDiffPipeline(**components, scheduler=lcm).save_pretrained(tmp_path / "lcm")
    scheduler = load_pipeline(tmp_path / "lcm").scheduler
    assert type(scheduler) is FusedLCMScheduler
    assert (scheduler.config.original_inference_steps, scheduler.config.timestep_scaling) == (50, 5.0)
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.001, prediction_type="v_prediction")
    AnimateDiffPipeline(**components, scheduler=ddim).save_pretrained(tmp_path / "ddim")
    assert type(load_pipeline(tmp_path / "ddim").scheduler) is DDIMScheduler
    used = []
    real = FusedLCMScheduler.set_timesteps

    def recording(self, *args, **kwargs):
        used.append(self.config)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FusedLCMScheduler, "set_timesteps", recording)
    assert main(["generate", "--model", str(tmp_path / "ddim"), "--prompt", "x", "--frames", "2", "--steps", "1",
                 "--out", str(tmp_path / "clip.gif")]) == 0
    assert [(c.beta_schedule, c.beta_start, c.prediction_type) for c in used] == [
        ("scaled_linear", 0.001, "v_prediction")]


def test_single_file_base(components, sd_folder, tmp_path):
    from ldm_layout import write_ldm_checkpoint

    single = write_ldm_checkpoint(tmp_path / "personalized.safetensors", components["unet"], components["vae"],
                                  components["text_encoder"])
    motion = save_motion_adapter(components["motion_adapter"], tmp_path / "mm.safetensors")
    pipe = load_pipeline(base=single, base_config=sd_folder, motion_module=motion, motion_config=TINY_OVERRIDES)
    direct = AnimateLCMPipeline(**components)
    assert abs(generate(pipe) - generate(direct)).max() <= 1e-5
    with pytest.raises(CheckpointError, match="base_config"):
        load_pipeline(base=single, motion_module=motion, motion_config=TINY_OVERRIDES)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_text_encoder_named_without_text_model(components, sd_folder, tmp_path, suffix):
    """Files saved by older transformers name the text encoder cond_stage_model.transformer.encoder... (no
    text_model.); its weights, not base_config's, must be the pipeline's. A set that does not fit is an error."""
    from ldm_layout import unet_to_ldm, vae_to_ldm

    text_encoder = copy.deepcopy(components["text_encoder"])
    with torch.no_grad():
        for parameter in text_encoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    state = {**unet_to_ldm(components["unet"].state_dict()),
             **vae_to_ldm(components["vae"].state_dict(), len(components["vae"].config.block_out_channels)),
             **{"cond_stage_model.transformer." + key.removeprefix("text_model."): value
                for key, value in text_encoder.state_dict().items()}}
    motion = save_motion_adapter(components["motion_adapter"], tmp_path / "mm.safetensors")

    def load(state, name):
        path = tmp_path / f"{name}{suffix}"
        state = {key: value.contiguous() for key, value in state.items()}
        save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
        return load_pipeline(base=path, base_config=sd_folder, motion_module=motion, motion_config=TINY_OVERRIDES,
                             allow_pickle=True)

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*holds no")
        pipe = load(state, "old_transformers")
    for key, value in text_encoder.state_dict().items():
        assert torch.equal(pipe.text_encoder.state_dict()[key], value), key
    direct = AnimateLCMPipeline(**{**components, "text_encoder": text_encoder})
    assert abs(generate(pipe) - generate(direct)).max() <= 1e-5
    with pytest.raises(CheckpointError, match=r"text encoder weights .* do not fit .*1 missing"):
        load({key: value for key, value in state.items() if not key.endswith("final_layer_norm.weight")}, "broken")


@pytest.fixture
def other_vae(components):
    """A VAE with other weights than the components', so the decoded frames tell which one ran."""
    vae = copy.deepcopy(components["vae"])
    with torch.no_grad():
        for parameter in vae.decoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return vae


def test_single_files_without_vae_or_text_encoder_weights(components, sd_folder, other_vae, tmp_path):
    """"noVAE" personalised models (and UNet + VAE files) take the missing parts from base_config's weights or from
    vae=; a config folder without weights is an error naming --vae."""
    from ldm_layout import vae_to_ldm, write_ldm_checkpoint

    state = load_file(str(write_ldm_checkpoint(tmp_path / "full.safetensors", components["unet"], components["vae"],
                                               components["text_encoder"])))
    for name, prefix in (("no_vae", "first_stage_model."), ("no_text_encoder", "cond_stage_model.")):
        save_file({k: v for k, v in state.items() if not k.startswith(prefix)}, str(tmp_path / f"{name}.safetensors"))
    motion = save_motion_adapter(components["motion_adapter"], tmp_path / "mm.safetensors")
    direct = generate(AnimateLCMPipeline(**components))
    for name in ("no_vae", "no_text_encoder"):
        with pytest.warns(UserWarning, match=f"holds no {name[3:]} weights: using"):
            pipe = load_pipeline(base=tmp_path / f"{name}.safetensors", base_config=sd_folder, motion_module=motion,
                                 motion_config=TINY_OVERRIDES)
        assert abs(generate(pipe) - direct).max() <= 1e-5, name
    configs_only = tmp_path / "configs_only"
    shutil.copytree(sd_folder, configs_only, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    with pytest.raises(CheckpointError, match="holds no vae weights.*vae="):
        load_pipeline(base=tmp_path / "no_vae.safetensors", base_config=configs_only, motion_module=motion,
                      motion_config=TINY_OVERRIDES)
    ldm_vae = vae_to_ldm(other_vae.state_dict(), len(other_vae.config.block_out_channels))
    save_file({k: v.contiguous() for k, v in ldm_vae.items()}, str(tmp_path / "vae-ft-mse.safetensors"))
    pipe = load_pipeline(base=tmp_path / "no_vae.safetensors", base_config=configs_only, motion_module=motion,
                         motion_config=TINY_OVERRIDES, vae=tmp_path / "vae-ft-mse.safetensors")
    expected = generate(AnimateLCMPipeline(**{**components, "vae": other_vae}))
    assert abs(generate(pipe) - expected).max() <= 1e-5
    assert abs(expected - direct).max() > 1e-2  # the VAE shows in the frames


def test_vae_replaces_the_models(components, sd_folder, other_vae, tmp_path):
    motion = save_motion_adapter(components["motion_adapter"], tmp_path / "mm.safetensors")
    other_vae.save_pretrained(tmp_path / "vae_folder")
    AnimateLCMPipeline(**components).save_pretrained(tmp_path / "saved")
    expected = generate(AnimateLCMPipeline(**{**components, "vae": other_vae}))
    for pipe in (load_pipeline(base=sd_folder, motion_module=motion, motion_config=TINY_OVERRIDES,
                               vae=tmp_path / "vae_folder"),
                 load_pipeline(tmp_path / "saved", vae=tmp_path / "vae_folder")):
        assert abs(generate(pipe) - expected).max() <= 1e-5
    torch.save(other_vae.state_dict(), tmp_path / "vae.pt")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_pipeline(tmp_path / "saved", vae=tmp_path / "vae.pt")


def test_a_video_pipeline_folder_as_base_says_to_load_it_as_the_model(components, tmp_path):
    AnimateLCMPipeline(**components).save_pretrained(tmp_path / "video")
    with pytest.raises(CheckpointError, match="its unet is a UNetMotionModel.*--model"):
        load_pipeline(base=tmp_path / "video", motion_module=tmp_path / "video" / "motion_adapter")
    assert load_pipeline(tmp_path / "video").unet.__class__.__name__ == "UNetMotionModel"


def test_an_image_pipeline_folder_as_the_model_says_to_give_it_as_the_base(sd_folder):
    """An SD1.5 image pipeline as the model would draw every frame on its own (it did, silently)."""
    with pytest.raises(CheckpointError, match="a Stable Diffusion image pipeline .* --base FOLDER --motion-module"):
        load_pipeline(sd_folder)


def test_folders_with_only_fp16_variant_weights(components, tmp_path):
    """Folders that hold only ``*.fp16.safetensors`` weights (as many downloads do) load: a base, a motion adapter,
    a ControlNet and a saved pipeline, each giving what its plain-weights twin gives."""
    from diffusers import AnimateDiffPipeline, ControlNetModel, LCMScheduler, StableDiffusionPipeline

    from animatelcm.loading import load_controlnet

    StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                            tokenizer=components["tokenizer"], unet=components["unet"], scheduler=LCMScheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "base", variant="fp16")
    components["motion_adapter"].save_pretrained(tmp_path / "motion", variant="fp16")
    assert not list((tmp_path / "base" / "unet").glob("diffusion_pytorch_model.safetensors"))
    from_parts = load_pipeline(base=tmp_path / "base", motion_module=tmp_path / "motion")
    direct = AnimateLCMPipeline(**components)
    assert abs(generate(from_parts) - generate(direct)).max() <= 1e-5
    saved = AnimateDiffPipeline(**components, scheduler=LCMScheduler())
    saved.save_pretrained(tmp_path / "pipe", variant="fp16")
    saved.save_pretrained(tmp_path / "plain")
    assert abs(generate(load_pipeline(tmp_path / "pipe")) - generate(load_pipeline(tmp_path / "plain"))).max() <= 1e-5
    controlnet = ControlNetModel.from_unet(components["unet"], conditioning_channels=3)
    controlnet.save_pretrained(tmp_path / "controlnet", variant="fp16")
    loaded = load_controlnet(tmp_path / "controlnet")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), controlnet.state_dict().values()))


def test_parts_saved_in_float16_load_in_one_dtype(components, tmp_path):
    """Many SD1.5 folders are published with float16 weights. transformers 5 keeps a text encoder in its file's
    dtype while diffusers loads its models in float32; load_pipeline gives every part float32 unless told, and
    torch_dtype applies to all of them."""
    from diffusers import AnimateDiffPipeline, LCMScheduler, StableDiffusionPipeline

    half = {name: copy.deepcopy(part).half() if isinstance(part, torch.nn.Module) else part
            for name, part in components.items()}
    StableDiffusionPipeline(vae=half["vae"], text_encoder=half["text_encoder"], tokenizer=half["tokenizer"],
                            unet=half["unet"], scheduler=LCMScheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "base")
    motion = save_motion_adapter(half["motion_adapter"], tmp_path / "mm_fp16.safetensors")
    AnimateDiffPipeline(**half, scheduler=LCMScheduler()).save_pretrained(tmp_path / "pipe")
    for pipe in (load_pipeline(base=tmp_path / "base", motion_module=motion, motion_config=TINY_OVERRIDES),
                 load_pipeline(tmp_path / "pipe")):
        assert {p.dtype for part in (pipe.unet, pipe.vae, pipe.text_encoder) for p in part.parameters()} == {
            torch.float32}
        assert generate(pipe).shape == (1, 4, 32, 32, 3)
    pipe = load_pipeline(tmp_path / "pipe", torch_dtype=torch.bfloat16)
    assert {p.dtype for part in (pipe.unet, pipe.vae, pipe.text_encoder) for p in part.parameters()} == {
        torch.bfloat16}


def test_casting_prints_no_false_float32_notice(components, sd_folder, tmp_path):
    """diffusers 0.42 warns on every cast that modules "should be kept in float32: []", an empty list; loading in
    float16 (and the pipeline's own cast of the UNet it builds) logs nothing of it, while a notice naming modules
    still does."""
    import logging

    from diffusers.utils import logging as diffusers_logging

    motion = save_motion_adapter(components["motion_adapter"], tmp_path / "mm.safetensors")
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    library_logger, level = logging.getLogger("diffusers"), diffusers_logging.get_verbosity()
    library_logger.addHandler(handler)
    diffusers_logging.set_verbosity_warning()  # (the CLI's tests lower it for the whole process)
    try:
        pipe = load_pipeline(base=sd_folder, motion_module=motion, motion_config=TINY_OVERRIDES,
                             torch_dtype=torch.float16)
        pipe.to(torch.bfloat16)
        assert not [r for r in records if "kept in float32" in r.getMessage()]
        logging.getLogger("diffusers.models.modeling_utils").warning(
            "There are modules in UNetMotionModel that should be kept in float32: ['norm']. Casting ...")
        assert [r for r in records if "['norm']" in r.getMessage()]
    finally:
        library_logger.removeHandler(handler)
        diffusers_logging.set_verbosity(level)


def test_a_base_and_a_motion_module_made_for_other_models_are_refused(components, sd_folder, tmp_path):
    """Named at load, with both files: a motion module for other UNet widths (diffusers only says "incompatible"),
    and an SDXL UNet (its extra embeddings would fail the first call with a TypeError)."""
    from diffusers import MotionAdapter, UNet2DConditionModel

    wide = MotionAdapter(block_out_channels=(32, 64, 64, 64), motion_layers_per_block=2, motion_norm_num_groups=8,
                         motion_num_attention_heads=2)
    wide_file = save_motion_adapter(wide, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"wide.safetensors: a motion module for UNet block widths \(32, 64, "
                                              r"64, 64\), but the base .*\(16, 32, 32, 32\).*different base models"):
        load_pipeline(base=sd_folder, motion_module=wide_file, motion_config=TINY_OVERRIDES)
    motion = save_motion_adapter(components["motion_adapter"], tmp_path / "mm.safetensors")
    sdxl = UNet2DConditionModel.from_config(components["unet"].config, addition_embed_type="text_time",
                                            addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    sdxl.save_pretrained(sd_folder / "unet")
    with pytest.raises(CheckpointError, match="'text_time' extra embeddings.*AnimateDiffSDXLPipeline"):
        load_pipeline(base=sd_folder, motion_module=motion, motion_config=TINY_OVERRIDES)
    inpainting = UNet2DConditionModel.from_config(components["unet"].config, in_channels=9)
    inpainting.save_pretrained(sd_folder / "unet")
    with pytest.raises(CheckpointError, match="9 input and 4 output channels .*inpainting"):
        load_pipeline(base=sd_folder, motion_module=motion, motion_config=TINY_OVERRIDES)
    from ldm_layout import write_ldm_checkpoint

    single = write_ldm_checkpoint(tmp_path / "inpainting.safetensors", inpainting, components["vae"],
                                  components["text_encoder"])
    with pytest.raises(CheckpointError, match="inpainting.safetensors: a UNet with 9 input and 4 output channels"):
        load_pipeline(base=single, base_config=sd_folder, motion_module=motion, motion_config=TINY_OVERRIDES)


def test_load_pipeline_argument_errors(sd_folder, tmp_path):
    with pytest.raises(ValueError, match="not both"):
        load_pipeline(sd_folder, base=sd_folder, motion_module=sd_folder)
    with pytest.raises(ValueError, match="base"):
        load_pipeline(motion_module=sd_folder)
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_pipeline(tmp_path)
    os.makedirs(tmp_path / "half")
    with pytest.raises(CheckpointError, match="missing"):
        load_pipeline(base=tmp_path / "half", motion_module=sd_folder)


@pytest.mark.parametrize("suffix, prefix", [(".safetensors", "control_model."), (".pth", ""), (".safetensors", None)])
def test_controlnet_single_files(components, tmp_path, suffix, prefix):
    """ControlNet 1.1's files (``control_v11p_sd15_*.pth``, keys at the top level; their safetensors conversions
    under ``control_model.``), and a hub folder's weights file on its own (diffusers' names, ``prefix`` None), load
    with the UNet's encoder as the architecture, every tensor where diffusers keeps it; a non-ControlNet file and a
    file without a UNet to size it are refused."""
    from diffusers import ControlNetModel, UNetMotionModel
    from ldm_layout import controlnet_to_ldm

    from animatelcm.loading import load_controlnet

    reference = ControlNetModel.from_unet(components["unet"], conditioning_channels=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every tensor distinct, so a misplaced one shows (from_unet zeroes the zero convs)
        for parameter in reference.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    state = reference.state_dict() if prefix is None else controlnet_to_ldm(reference.state_dict(), prefix)
    state = {k: v.contiguous() for k, v in state.items()}
    path = tmp_path / f"control_v11p_sd15_test{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    unet = UNetMotionModel.from_unet2d(components["unet"], components["motion_adapter"])
    if suffix == ".pth":
        with pytest.raises(CheckpointError, match="allow_pickle"):
            load_controlnet(path, unet=unet)
    loaded = load_controlnet(path, unet=unet, allow_pickle=True, torch_dtype=torch.float16)
    assert not loaded.training and loaded.dtype == torch.float16
    expected = reference.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key].half()), key
    with pytest.raises(CheckpointError, match="pass the UNet"):
        load_controlnet(path, allow_pickle=True)
    save_file({"input_blocks.0.0.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a ControlNet for this model"):
        load_controlnet(tmp_path / "other.safetensors", unet=unet)


def sparsectrl_original_layout(controlnet, with_pos_encoder: bool) -> dict:
    """A SparseCtrl model's tensors named as AnimateDiff v3's files name them: its motion modules in the original
    motion-module layout (``temporal_transformer``, ``attention_blocks``, ``norms``, ``ff_norm``, with or without
    ``pos_encoder.pe``), the rest as diffusers names it."""
    state = controlnet.state_dict()
    motion = {key: value for key, value in state.items() if "motion_modules." in key}
    converted = {key: value for key, value in state.items() if "motion_modules." not in key}
    converted.update(diffusers_to_original_motion_keys(motion))
    if with_pos_encoder:
        for key, value in motion.items():
            if key.endswith("pos_embed.pe"):
                converted[re.sub(r"motion_modules\.(\d+)\.", r"motion_modules.\1.temporal_transformer.", key)
                          .replace(".attn1.pos_embed.", ".attention_blocks.0.pos_encoder.")
                          .replace(".attn2.pos_embed.", ".attention_blocks.1.pos_encoder.")] = value
    return {key: value.contiguous() for key, value in converted.items()}


@pytest.mark.parametrize("latent_condition", [True, False])
def test_sparsectrl_models_load_in_the_layouts_people_download(components, tmp_path, latent_condition):
    """AnimateDiff v3's SparseCtrl files (its layout, with or without the positional tables; pickled or
    safetensors) and diffusers folders load as the same SparseControlNetModel; the conditioning embedding's kind
    and mask are read from the tensors, the rest from the pipeline's UNet; wrong files say what is wrong."""
    from animatelcm.loading import load_sparse_controlnet
    from animatelcm.testing import tiny_sparse_controlnet

    pipe = AnimateLCMPipeline(**components)
    controlnet = tiny_sparse_controlnet(pipe.unet, pipe.motion_adapter, latent_condition=latent_condition)
    controlnet.save_pretrained(tmp_path / "folder")
    assert_same_weights(load_sparse_controlnet(tmp_path / "folder"), controlnet)
    save_file(sparsectrl_original_layout(controlnet, True), str(tmp_path / "original.safetensors"))
    torch.save({"state_dict": sparsectrl_original_layout(controlnet, False)}, tmp_path / "original.ckpt")
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(tmp_path / "diffusers.safetensors"))
    for name in ("original.safetensors", "original.ckpt", "diffusers.safetensors"):
        loaded = load_sparse_controlnet(tmp_path / name, unet=pipe.unet, allow_pickle=True)
        assert_same_weights(loaded, controlnet)
        assert loaded.config.use_simplified_condition_embedding == latent_condition
        assert loaded.config.concat_conditioning_mask and loaded.config.conditioning_channels == (
            4 if latent_condition else 3)
    with pytest.raises(CheckpointError, match="pass the UNet it controls"):
        load_sparse_controlnet(tmp_path / "original.safetensors")
    with pytest.raises(CheckpointError, match="not a SparseCtrl model"):
        save_motion_adapter(pipe.motion_adapter, tmp_path / "mm.safetensors")
        load_sparse_controlnet(tmp_path / "mm.safetensors", unet=pipe.unet)
    state = load_file(str(tmp_path / "original.safetensors"))
    state["conv_in.weight"] = state["conv_in.weight"][:, :3].contiguous()
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"conv_in.weight: file \(16, 3, 3, 3\)"):
        load_sparse_controlnet(tmp_path / "other.safetensors", unet=pipe.unet)
