"""Prompted motion modules (animatelcm.motion_prompt): the math against a reference that materialises each
token's prompt, per-frame prompts, every save/load path, deepcopy, patch_pipeline, errors, and the trainer option."""

import copy

import pytest
import torch

from animatelcm import AnimateLCMPipeline, load_motion_adapter, load_pipeline, patch_pipeline
from animatelcm.loading import save_motion_adapter
from animatelcm.motion_prompt import (
    FramePromptAttnProcessor,
    add_motion_cross_attention,
    motion_attn2_layers,
    motion_cross_attention_dim,
)
from animatelcm.training.models import extract_motion_adapter, inflate

TINY_OVERRIDES = {"motion_num_attention_heads": 2, "motion_norm_num_groups": 8}
TEXT_WIDTH = 32


@pytest.fixture
def prompted(components):
    """Components whose motion modules attend to the prompt, with random (non-zero) prompt projections."""
    adapter = add_motion_cross_attention(components["motion_adapter"], TEXT_WIDTH)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, attn in motion_attn2_layers(adapter):
            for linear in (attn.to_k, attn.to_v):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.3)
    return components


class MaterialisedPromptProcessor:
    """Reference: every (pixel, frame) token gets its frame's prompt copied out ([B*H*W, F, L, D]), plain softmax."""

    def __init__(self, slot):
        self.slot = slot

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        text, batch, frames = self.slot.get()
        text = text.double()
        sequences = hidden_states.shape[0]
        pixels = sequences // batch
        per_token = text.view(batch, 1, frames, *text.shape[1:]).expand(batch, pixels, frames, *text.shape[1:])
        per_token = per_token.reshape(sequences, frames, *text.shape[1:])  # [B*H*W, F, L, D]
        heads = attn.heads
        weight = lambda linear, x: x @ linear.weight.double().T + (0 if linear.bias is None else linear.bias.double())
        q = weight(attn.to_q, hidden_states.double())
        k, v = weight(attn.to_k, per_token), weight(attn.to_v, per_token)
        d = q.shape[-1] // heads
        q = q.view(sequences, frames, heads, d)
        k, v = (t.view(sequences, frames, t.shape[2], heads, d) for t in (k, v))
        scores = torch.einsum("nfhd,nflhd->nfhl", q, k) * attn.scale
        out = torch.einsum("nfhl,nflhd->nfhd", scores.softmax(-1), v).reshape(sequences, frames, heads * d)
        return weight(attn.to_out[0], out).to(hidden_states.dtype)


def test_matches_a_reference_with_per_frame_prompts(prompted):
    unet = inflate(prompted["unet"], prompted["motion_adapter"]).eval()
    batch, frames = 2, 5
    sample = torch.randn(batch, 4, frames, 8, 8)
    text = torch.randn(batch * frames, 7, TEXT_WIDTH)  # a different prompt on every frame
    with torch.no_grad():
        fast = unet(sample, 500, encoder_hidden_states=text).sample
        reference_unet = copy.deepcopy(unet)
        slot = reference_unet._animatelcm_motion_prompt
        for _, attn in motion_attn2_layers(reference_unet):
            attn.set_processor(MaterialisedPromptProcessor(slot))
        want = reference_unet(sample, 500, encoder_hidden_states=text).sample
        # the prompt reaches the motion modules: per-frame prompts differ from the first frame's on every frame
        first_only = unet(sample, 500, encoder_hidden_states=text.view(batch, frames, 7, -1)[:, :1]
                          .expand(-1, frames, -1, -1).reshape(batch * frames, 7, -1)).sample
    torch.testing.assert_close(fast, want, atol=2e-5, rtol=2e-5)
    assert (fast - first_only)[:, :, 1:].abs().amax() > 1e-4


def test_prompt_reaches_motion_modules_only_through_attn2(prompted):
    """Zeroing the motion modules' prompt values changes the output; the slot is empty after each call."""
    unet = inflate(prompted["unet"], prompted["motion_adapter"]).eval()
    sample, text = torch.randn(1, 4, 4, 8, 8), torch.randn(4, 7, TEXT_WIDTH)
    with torch.no_grad():
        before = unet(sample, 10, encoder_hidden_states=text).sample
        assert unet._animatelcm_motion_prompt.current is None
        for _, attn in motion_attn2_layers(unet):
            attn.to_v.weight.zero_()
        after = unet(sample, 10, encoder_hidden_states=text).sample
    assert (before - after).abs().amax() > 1e-4


def test_every_save_and_load_path_round_trips(prompted, tmp_path):
    adapter = prompted["motion_adapter"]
    assert motion_cross_attention_dim(adapter) == TEXT_WIDTH
    for target, config in ((tmp_path / "original.safetensors", TINY_OVERRIDES), (tmp_path / "folder", None)):
        save_motion_adapter(adapter, target)
        loaded = load_motion_adapter(target, config=config)
        assert motion_cross_attention_dim(loaded) == TEXT_WIDTH
        for key, value in adapter.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), key
    save_motion_adapter(adapter, tmp_path / "diffusers.safetensors", layout="diffusers")
    assert motion_cross_attention_dim(load_motion_adapter(tmp_path / "diffusers.safetensors")) == TEXT_WIDTH

    pipe = AnimateLCMPipeline(**prompted)
    extracted = extract_motion_adapter(pipe.unet)
    assert motion_cross_attention_dim(extracted) == TEXT_WIDTH
    assert all(torch.equal(v, extracted.state_dict()[k]) for k, v in adapter.state_dict().items())

    def generate(p):
        p.set_progress_bar_config(disable=True)
        return p("a red circle moving left", num_frames=4, height=32, width=32, num_inference_steps=2,
                 output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    pipe.save_pretrained(tmp_path / "saved")
    reloaded = load_pipeline(tmp_path / "saved")
    assert motion_cross_attention_dim(reloaded.unet) == TEXT_WIDTH
    assert torch.equal(generate(pipe), generate(reloaded))
    save_sd15_folder(prompted, tmp_path / "sd15")
    from_parts = load_pipeline(base=tmp_path / "sd15", motion_module=tmp_path / "folder")
    assert torch.equal(generate(pipe), generate(from_parts))


def save_sd15_folder(components, folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    StableDiffusionPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                            tokenizer=components["tokenizer"], unet=components["unet"], scheduler=DDIMScheduler(),
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)


def test_deepcopy_gets_its_own_prompt_slot(prompted):
    unet = inflate(prompted["unet"], prompted["motion_adapter"]).eval()
    twin = copy.deepcopy(unet)
    assert twin._animatelcm_motion_prompt is not unet._animatelcm_motion_prompt
    processors = {id(attn.processor.slot) for _, attn in motion_attn2_layers(twin)}
    assert processors == {id(twin._animatelcm_motion_prompt)}
    sample, text = torch.randn(1, 4, 3, 8, 8), torch.randn(3, 7, TEXT_WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(twin(sample, 5, encoder_hidden_states=text).sample,
                                   unet(sample, 5, encoder_hidden_states=text).sample, atol=0, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(prompted):
    """Checkpointed motion modules rerun in the backward pass, after the call returned; a no-grad call of the same
    UNet in between (an online target, say) must not change what they see."""
    unet = inflate(prompted["unet"], prompted["motion_adapter"]).train()
    sample, text, other = torch.randn(1, 4, 4, 8, 8), torch.randn(4, 7, TEXT_WIDTH), torch.randn(4, 7, TEXT_WIDTH)

    def gradients(checkpointing):
        model = copy.deepcopy(unet)
        if checkpointing:
            model.enable_gradient_checkpointing()
        loss = model(sample, 10, encoder_hidden_states=text).sample.square().mean()
        with torch.no_grad():
            model(sample, 10, encoder_hidden_states=other)
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if "motion_modules" in name}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_patch_pipeline_keeps_outputs(prompted):
    pipe = AnimateLCMPipeline(**prompted)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a blue square moving up", num_frames=4, height=32, width=32, num_inference_steps=2,
                    guidance_scale=2.0, output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    before = generate()
    patch_pipeline(pipe)
    after = generate()
    assert ((after - before).abs().max() / before.abs().max()) <= 1e-3
    assert all(isinstance(attn.processor, FramePromptAttnProcessor) for _, attn in motion_attn2_layers(pipe.unet))


def test_errors(prompted):
    adapter = prompted["motion_adapter"]
    assert add_motion_cross_attention(adapter, TEXT_WIDTH) is adapter  # idempotent
    with pytest.raises(ValueError, match="already attend to a 32-wide prompt"):
        add_motion_cross_attention(adapter, 16)
    with pytest.raises(ValueError, match="positive integer"):
        add_motion_cross_attention(adapter, 0)
    with pytest.raises(ValueError, match="no motion-module attentions"):
        add_motion_cross_attention(prompted["unet"], TEXT_WIDTH)
    _, attn = motion_attn2_layers(adapter)[0]
    with pytest.raises(RuntimeError, match="without the prompt"):
        attn(torch.randn(4, 3, attn.to_q.in_features))
    unet = inflate(prompted["unet"], adapter)
    slot = unet._animatelcm_motion_prompt
    slot.current = (torch.randn(8, 7, TEXT_WIDTH), 1, 8)
    _, attn = motion_attn2_layers(unet)[0]
    with pytest.raises(ValueError, match="every frame of the clip at once"):
        attn(torch.randn(64, 4, attn.to_q.in_features))  # a 4-frame window of an 8-frame clip


def test_trainer_builds_prompted_motion_modules(tmp_path):
    from animatelcm.training.config import ConfigError, load_config
    from animatelcm.training.trainer import train

    tiny = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                cross_attention_dim=32, text_hidden_size=32, motion_heads=2, vae_block_out_channels=[8, 16],
                sample_size=8)
    run = dict(stage="diffusion_video", output_dir=str(tmp_path / "run"), model=dict(tiny=tiny, motion_prompt=True),
               data=dict(kind="synthetic", num_clips=2, frames=4, size=16),
               train=dict(batch_size=1, max_steps=2, progress=False))
    outputs = train(run)
    pipe = load_pipeline(outputs["pipeline"])
    assert motion_cross_attention_dim(pipe.unet) == 32
    assert motion_cross_attention_dim(load_motion_adapter(outputs["motion_adapter_original"])) == 32
    with pytest.raises(ConfigError, match="motion_prompt"):
        load_config({**run, "stage": "image_cd", "model": dict(tiny=tiny, motion_prompt=True)})
