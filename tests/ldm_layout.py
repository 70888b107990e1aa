"""Test helper: write diffusers SD components in the original LDM single-file key layout (the inverse of what
diffusers' from_single_file converts), for SD1.5 topology (4 UNet blocks, 2 layers each; any VAE depth), and
AnimateLCM-I2V's release layout (motion modules + image encoder in one pickle)."""


def _unet_prefix_map(num_blocks=4, layers=2):
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("middle_block.1.", "mid_block.attentions.0.")]
    for i in range(num_blocks):
        for j in range(layers):
            pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if i < num_blocks - 1:
                pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if i > 0:
                pairs.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < num_blocks - 1:
            pairs.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{(layers + 1) * i + layers}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


RESNET_RENAMES = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                  ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def unet_to_ldm(state, num_blocks=4, layers=2):
    prefixes = sorted(_unet_prefix_map(num_blocks, layers), key=lambda p: -len(p[1]))
    out = {}
    for key, value in state.items():
        new = key
        for sd, hf in prefixes:
            if key.startswith(hf):
                new = sd + key[len(hf):]
                if "resnets" in hf:
                    for a, b in RESNET_RENAMES:
                        new = new.replace(b, a)
                break
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state, num_blocks):
    out = {}
    for key, value in state.items():
        new = key
        for i in range(num_blocks):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{num_blocks - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{num_blocks - 1 - i}.upsample.")
        new = new.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".attn_1." in new:
            for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")):
                new = new.replace(a, b)
            if value.dim() == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def text_encoder_to_ldm(state):
    # Real SD1.5 files hold transformers-4 names (text_model.*); transformers 5 drops that prefix in state_dict().
    return {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state.items()}


def write_ldm_checkpoint(path, unet, vae, text_encoder):
    from safetensors.torch import save_file

    state = {}
    state.update(unet_to_ldm(unet.state_dict()))
    state.update(vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)))
    state.update(text_encoder_to_ldm(text_encoder.state_dict()))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def controlnet_to_ldm(state, prefix="control_model."):
    """A diffusers ControlNetModel's state dict in the original ControlNet layout (ControlNet 1.1's files): the
    encoder as the UNet's (any number of blocks and layers, the last block without attention), the zero
    convolutions, the hint encoder."""
    num_blocks = len({key.split(".")[1] for key in state if key.startswith("down_blocks.")})
    layers = len({key.split(".")[3] for key in state if key.startswith("down_blocks.0.resnets.")})
    out = {}
    for key, value in state.items():
        if key.startswith("controlnet_down_blocks."):
            index, rest = key[len("controlnet_down_blocks."):].split(".", 1)
            new = f"zero_convs.{index}.0.{rest}"
        elif key.startswith("controlnet_mid_block."):
            new = "middle_block_out.0." + key[len("controlnet_mid_block."):]
        elif key.startswith("controlnet_cond_embedding."):
            rest = key[len("controlnet_cond_embedding."):]
            blocks = len({k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
            if rest.startswith("conv_in."):
                new = "input_hint_block.0." + rest[len("conv_in."):]
            elif rest.startswith("conv_out."):
                new = f"input_hint_block.{2 * (blocks + 1)}." + rest[len("conv_out."):]
            else:
                index, rest = rest[len("blocks."):].split(".", 1)
                new = f"input_hint_block.{2 * (int(index) + 1)}.{rest}"
        else:
            new = next(iter(unet_to_ldm({key: value}, num_blocks, layers)))[len("model.diffusion_model."):]
        out[prefix + new] = value
    return out


def write_animatelcm_i2v_release(path, motion_adapter, widths, seed=0, blocks_per_level=2):
    """A checkpoint laid out as AnimateLCM's released ``AnimateLCM_sd15_i2v.ckpt`` (pickled; or a ``.safetensors``
    conversion noting the motion modules' head and group counts, as save_motion_adapter does): the motion modules in
    AnimateDiff's original names beside the image encoder's ``img_encoder.*`` tensors (random, named as the released
    encoder's: ``conv_in``, ``body.{k}.in_conv`` where the width changes, ``body.{k}.block1`` 3x3,
    ``body.{k}.block2`` 1x1). Returns the encoder's tensors, without the prefix."""
    import torch

    from animatelcm.loading import diffusers_to_original_motion_keys

    generator = torch.Generator().manual_seed(seed)

    def conv(name, out_channels, in_channels, kernel):
        encoder[f"{name}.weight"] = torch.randn(out_channels, in_channels, kernel, kernel, generator=generator) * 0.1
        encoder[f"{name}.bias"] = torch.randn(out_channels, generator=generator) * 0.1

    encoder = {}
    conv("conv_in", widths[0], 4, 3)
    previous, index = widths[0], 0
    for width in widths:
        for _ in range(blocks_per_level):
            if previous != width:
                conv(f"body.{index}.in_conv", width, previous, 1)
            conv(f"body.{index}.block1", width, width, 3)
            conv(f"body.{index}.block2", width, width, 1)
            previous, index = width, index + 1
    state = diffusers_to_original_motion_keys(motion_adapter.state_dict())
    state.update({"img_encoder." + key: value for key, value in encoder.items()})
    if str(path).endswith(".safetensors"):  # a conversion, with the tiny motion modules' heads and groups noted
        import json

        from safetensors.torch import save_file

        from animatelcm.loading import MOTION_CONFIG_METADATA, MOTION_HYPERPARAMETERS

        config = {key: motion_adapter.config[key] for key in MOTION_HYPERPARAMETERS}
        save_file({k: v.contiguous() for k, v in state.items()}, str(path),
                  metadata={MOTION_CONFIG_METADATA: json.dumps(config)})
    else:
        torch.save(state, path)
    return encoder
