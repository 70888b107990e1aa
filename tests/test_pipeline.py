import diffusers
import numpy as np
import pytest
import torch

from animatelcm import AnimateLCMPipeline, LCMScheduler


def make_pair(components, scheduler_config=None):
    pipe = AnimateLCMPipeline(**components)
    if scheduler_config:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, **scheduler_config)
    reference = diffusers.AnimateDiffPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        motion_adapter=pipe.motion_adapter, scheduler=diffusers.LCMScheduler.from_config(pipe.scheduler.config))
    for p in (pipe, reference):
        p.set_progress_bar_config(disable=True)
    return pipe, reference


@pytest.mark.parametrize("guidance, frames, size, steps", [(1.0, 16, 64, 4), (2.0, 7, 48, 3), (1.5, 12, 40, 1)])
def test_matches_animatediff_with_diffusers_lcm(components, guidance, frames, size, steps):
    pipe, reference = make_pair(components)
    latents = torch.randn(1, 4, frames, size // 8, size // 8)
    common = dict(prompt="a red circle moving right", negative_prompt="blurry", num_frames=frames, height=size,
                  width=size, num_inference_steps=steps, guidance_scale=guidance, output_type="np")
    ours = pipe(latents=latents, generator=torch.Generator().manual_seed(5), **common).frames
    theirs = reference(latents=latents, generator=torch.Generator().manual_seed(5), **common).frames
    assert ours.shape == (1, frames, size, size, 3)
    assert np.abs(ours - theirs).max() <= 1e-4


def test_latents_match_with_v_prediction_and_generated_latents(components):
    pipe, reference = make_pair(components, {"prediction_type": "v_prediction", "original_inference_steps": 200})
    kwargs = dict(prompt=["a blue square", "a cat"], num_frames=8, height=64, width=64, num_inference_steps=4,
                  guidance_scale=1.0,
                  output_type="latent")
    ours = pipe(generator=torch.Generator().manual_seed(9), **kwargs).frames
    theirs = reference(generator=torch.Generator().manual_seed(9), **kwargs).frames
    assert ours.shape == (2, 4, 8, 8, 8)
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_num_videos_per_prompt_is_honoured(components, guidance):
    """diffusers' AnimateDiffPipeline forces one video per prompt; ours repeats the prompts (or their embeddings):
    the same as passing each prompt that many times, with one noise draw for the whole batch."""
    pipe, reference = make_pair(components)
    common = dict(num_frames=3, height=32, width=32, num_inference_steps=2, guidance_scale=guidance,
                  output_type="latent")
    ours = pipe(prompt=["a red circle", "a cat"], negative_prompt="blurry", num_videos_per_prompt=2,
                generator=torch.Generator().manual_seed(3), **common).frames
    listed = reference(prompt=["a red circle", "a red circle", "a cat", "a cat"], negative_prompt=["blurry"] * 4,
                       generator=torch.Generator().manual_seed(3), **common).frames
    assert ours.shape == (4, 4, 3, 4, 4)
    torch.testing.assert_close(ours, listed)
    assert not torch.allclose(ours[0], ours[1])  # two videos of one prompt, from different noise
    embeds = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    assert pipe(prompt_embeds=embeds, num_videos_per_prompt=3, **common).frames.shape[0] == 3
    with pytest.raises(ValueError, match="num_videos_per_prompt"):
        pipe(prompt="a cat", num_videos_per_prompt=0, **common)


def test_defaults_and_output_types(components):
    pipe = AnimateLCMPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 100
    assert pipe.scheduler.config.beta_schedule == "linear"
    steps = []
    out = pipe("a dog", height=32, width=32, generator=torch.Generator().manual_seed(0),
               callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {}, output_type="pil")
    assert steps == [0, 1, 2, 3]  # 4 steps by default
    assert len(out.frames[0]) == 16 and out.frames[0][0].size == (32, 32)
    pt = pipe("a dog", num_frames=4, height=32, width=32, output_type="pt").frames
    assert pt.shape == (1, 4, 3, 32, 32)


def test_decode_chunk_size_does_not_change_frames(components):
    pipe = AnimateLCMPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 6, 4, 4)
    a = pipe("x", num_frames=6, latents=latents, decode_chunk_size=16, output_type="np",
             generator=torch.Generator().manual_seed(1)).frames
    b = pipe("x", num_frames=6, latents=latents, decode_chunk_size=4, output_type="np",
             generator=torch.Generator().manual_seed(1)).frames
    assert np.abs(a - b).max() <= 1e-5


def test_plain_diffusers_lcm_scheduler_is_upgraded(components):
    pipe = AnimateLCMPipeline(**components, scheduler=diffusers.LCMScheduler(beta_schedule="linear", original_inference_steps=50))
    assert type(pipe.scheduler) is LCMScheduler and pipe.scheduler.config.original_inference_steps == 50
    ddim = diffusers.DDIMScheduler()
    assert AnimateLCMPipeline(**components, scheduler=ddim).scheduler is ddim


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_frames=0), "num_frames"),
    (dict(num_frames=33), "positional table"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(guidance_scale=-1), "guidance_scale"),
    (dict(decode_chunk_size=0), "decode_chunk_size"),
    (dict(output_type="gif"), "output_type"),
    (dict(height=30), "divisible by 8"),
])
def test_bad_arguments(components, kwargs, match):
    pipe = AnimateLCMPipeline(**components)
    with pytest.raises(ValueError, match=match):
        pipe("x", **kwargs)
