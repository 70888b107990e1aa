import diffusers
import numpy as np
import pytest
import torch

from PIL import Image

from animatelcm import AnimateLCMControlNetPipeline, AnimateLCMPipeline, ImageToVideoAdapter, LCMScheduler
from animatelcm.adapters import AnimateLCMImageEncoder, ImageToVideoModel, features_before_motion_modules


def diffusers_twin(cls, pipe, **parts):
    """diffusers' pipeline ``cls`` on ``pipe``'s components (and ``parts``), with diffusers' LCMScheduler of the same
    config: the reference our pipeline classes are compared with."""
    reference = cls(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                    motion_adapter=pipe.motion_adapter,
                    scheduler=diffusers.LCMScheduler.from_config(pipe.scheduler.config), **parts)
    reference.set_progress_bar_config(disable=True)
    return reference


def make_pair(components, scheduler_config=None):
    pipe = AnimateLCMPipeline(**components)
    if scheduler_config:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, **scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, diffusers_twin(diffusers.AnimateDiffPipeline, pipe)


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
    (dict(num_frames=4, height=64, latents=torch.randn(1, 4, 4, 4, 4)), r"must be a tensor of shape \[1, 4, 4, 8, 8\]"),
    (dict(num_frames=4, num_videos_per_prompt=2, latents=torch.randn(1, 4, 4, 8, 8)), r"shape \[2, 4, 4, h, w\]"),
    (dict(num_frames=4, latents=torch.randn(1, 4, 5, 8, 8)), r"shape \[1, 4, 4, h, w\]"),
    (dict(num_frames=4, latents=torch.randn(4, 4, 8, 8)), r"shape \[1, 4, 4, h, w\]"),
    (dict(clip_skip=50), "clip_skip=50"),
])
def test_bad_arguments(components, kwargs, match):
    pipe = AnimateLCMPipeline(**components)
    with pytest.raises(ValueError, match=match):
        pipe("x", **kwargs)


def test_controlnet_pipeline_checks_latents(components):
    controlnet = diffusers.ControlNetModel.from_unet(components["unet"], conditioning_channels=3).eval()
    pipe = AnimateLCMControlNetPipeline(**components, controlnet=controlnet)
    frames = [Image.new("RGB", (64, 64))] * 4
    with pytest.raises(ValueError, match=r"latents must be a tensor of shape \[2, 4, 4, 8, 8\]"):
        pipe(["x", "y"], num_frames=4, height=64, width=64, conditioning_frames=frames,
             latents=torch.randn(1, 4, 4, 8, 8))


def test_clip_skip_uses_the_earlier_layer_through_the_final_norm(components):
    """``clip_skip=1`` gives what the prompt embedding from the text encoder's second-to-last layer, through its
    final LayerNorm, gives (diffusers' definition; its own code reads ``text_encoder.text_model``, which
    transformers 5's CLIPTextModel does not have)."""
    pipe = AnimateLCMPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    encoder = pipe.text_encoder
    ids = pipe.tokenizer("a red circle", padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]
        norm = encoder.final_layer_norm if not hasattr(encoder, "text_model") else encoder.text_model.final_layer_norm
        embeds = norm(hidden)
    latents = torch.randn(1, 4, 4, 8, 8)

    def run(**kwargs):
        return pipe(num_frames=4, num_inference_steps=2, output_type="latent", latents=latents,
                    generator=torch.Generator().manual_seed(0), **kwargs).frames

    skipped = run(prompt="a red circle", clip_skip=1)
    torch.testing.assert_close(skipped, run(prompt_embeds=embeds))
    assert not torch.allclose(skipped, run(prompt="a red circle"))
    assert "text_model" not in vars(encoder)


def random_image_adapter(unet, seed, cls=ImageToVideoAdapter):
    """An image-to-video adapter of class ``cls`` with every weight random (its output convs are zero-initialised
    otherwise)."""
    adapter = cls(in_channels=4, block_out_channels=tuple(unet.config.block_out_channels)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return adapter


def pictures(count, size, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.mark.parametrize("guidance, adapter_class", [(1.0, ImageToVideoAdapter), (2.0, ImageToVideoAdapter),
                                                     (2.0, AnimateLCMImageEncoder)])
def test_image_to_video_runs_the_adapter_as_the_trainer_samples_it(components, guidance, adapter_class):
    """pipe(image=...) equals the training stage's sampler on ImageToVideoModel (first frame = the image's VAE latent
    mean; with guidance both halves see the adapter), for two prompts with an image each."""
    pipe = AnimateLCMPipeline(**components)
    pipe.image_adapter = random_image_adapter(pipe.unet, seed=0, cls=adapter_class)
    pipe.set_progress_bar_config(disable=True)
    frames, size, prompts = 5, 32, ["a red circle", "a blue square"]
    images = pictures(2, size, seed=1)
    noise = torch.randn(2, 4, frames, size // 8, size // 8, generator=torch.Generator().manual_seed(4))
    ours = pipe(prompt=prompts, image=images, num_frames=frames, height=size, width=size, num_inference_steps=1,
                guidance_scale=guidance, latents=noise, output_type="latent").frames

    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2) / 127.5 - 1
    first_frame = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    text, empty = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=None)
    model = ImageToVideoModel(pipe.unet, pipe.image_adapter)
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        scheduler.set_timesteps(1)
        t = scheduler.timesteps[0]
        condition = {"text": text, "first_frame": first_frame}
        output = model(noise, t.expand(2), condition)
        if guidance > 1:
            unconditional = model(noise, t.expand(2), {"text": empty, "first_frame": first_frame})
            output = unconditional + guidance * (output - unconditional)
        expected = scheduler.step(output, t, noise).prev_sample
    assert (ours - expected).abs().max() <= 1e-4
    plain = pipe(prompt=prompts, num_frames=frames, height=size, width=size, num_inference_steps=1,
                 guidance_scale=guidance, latents=noise, output_type="latent").frames
    assert (ours - plain).abs().max() > 1e-2  # the image changed the clip


@pytest.mark.parametrize("layer", [0, 1])
def test_adapter_features_enter_before_the_motion_module_of_their_layer(components, layer):
    """features[l] reaches down block l after its spatial layers of ``layer`` (ResNet, attention) and before that
    layer's motion module: ImageToVideoAdapter's layer 0, and layer 1 where AnimateLCM-I2V's released encoder adds
    its features (after the second ResNet and attention); nothing before it changes."""
    unet = AnimateLCMPipeline(**components).unet
    level, frames = 2, 3
    sample = torch.randn(1, 4, frames, 8, 8)
    text = torch.randn(frames, 8, unet.config.cross_attention_dim)
    captured = {}

    def record(name):  # a forward hook sees the input as the forward got it, after every pre-hook
        def hook(module, args, kwargs, output):
            captured[name] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    block = unet.down_blocks[level]
    hooks = [block.motion_modules[index].register_forward_hook(record(f"motion{index}"), with_kwargs=True)
             for index in range(len(block.motion_modules))]
    hooks.append(block.attentions[layer].register_forward_hook(
        lambda module, args, output: captured.__setitem__("attention", output[0].clone())))
    with torch.no_grad():
        unet(sample, 10, encoder_hidden_states=text)
        plain = dict(captured)
        width, size = unet.config.block_out_channels[level], 8 // 2 ** level
        features = [torch.zeros(frames, w, 8 // 2 ** l, 8 // 2 ** l)
                    for l, w in enumerate(unet.config.block_out_channels)]
        features[level] = torch.randn(frames, width, size, size)
        with features_before_motion_modules(unet, features, layer):
            unet(sample, 10, encoder_hidden_states=text)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(plain["attention"], plain[f"motion{layer}"])  # the attention output feeds it
    torch.testing.assert_close(captured[f"motion{layer}"], plain[f"motion{layer}"] + features[level])
    for index in range(layer):
        torch.testing.assert_close(captured[f"motion{index}"], plain[f"motion{index}"])
    with pytest.raises(ValueError, match="before motion module 5"):
        with features_before_motion_modules(unet, features, 5):
            pass


def test_image_to_video_inputs(components, tmp_path):
    """One image for every video, arrays and tensors in [0, 1], a zero-initialised adapter is a no-op, the adapter
    saves and loads with the pipeline, and bad input says what to do."""
    pipe = AnimateLCMPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    common = dict(num_frames=4, height=32, width=32, num_inference_steps=2, output_type="latent")
    latents = torch.randn(2, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="image adapter"):
        pipe("a cat", image=pictures(1, 32, 0)[0], **common)
    plain = pipe(["a cat", "a dog"], latents=latents, generator=torch.Generator().manual_seed(0), **common).frames
    pipe.image_adapter = ImageToVideoAdapter(block_out_channels=tuple(pipe.unet.config.block_out_channels)).eval()
    untrained = pipe(["a cat", "a dog"], image=pictures(1, 48, 0)[0], latents=latents,
                     generator=torch.Generator().manual_seed(0), **common).frames
    assert torch.equal(untrained, plain)  # zero-initialised output convs: exactly the text-to-video clip

    pipe.image_adapter = random_image_adapter(pipe.unet, seed=3)
    image = pictures(1, 32, 5)[0]
    array = np.asarray(image).astype(np.float32) / 255
    def animate(picture, model=pipe):
        return model("a cat", image=picture, latents=latents[:1], generator=torch.Generator().manual_seed(2),
                     **common).frames

    by_pil = animate(image)
    by_array = animate(array)
    by_tensor = animate(torch.from_numpy(array).permute(2, 0, 1))
    torch.testing.assert_close(by_array, by_pil, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(by_tensor, by_pil, atol=1e-4, rtol=1e-4)
    two = pipe("a cat", image=image, num_videos_per_prompt=2, **common).frames
    assert two.shape == (2, 4, 4, 4, 4)
    # one picture per prompt, of different sizes and kinds: each video as if made alone (one step: the LCM steps
    # after the first draw their noise for the whole batch)
    other = np.random.default_rng(0).random((48, 40, 3), dtype=np.float32)
    one_step = {**common, "num_inference_steps": 1}
    both = pipe(["a cat", "a dog"], image=[image, other], latents=latents, **one_step).frames
    alone = [pipe(prompt, image=picture, latents=latents[i:i + 1], **one_step).frames
             for i, (prompt, picture) in enumerate([("a cat", image), ("a dog", other)])]
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(alone[0], pipe("a cat", image=other, latents=latents[:1], **one_step).frames)

    pipe.save_pretrained(tmp_path / "i2v")
    loaded = AnimateLCMPipeline.from_pretrained(tmp_path / "i2v", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.image_adapter, ImageToVideoAdapter)
    torch.testing.assert_close(animate(image, loaded), by_pil)

    with pytest.raises(ValueError, match="block widths"):
        AnimateLCMPipeline(**components, image_adapter=ImageToVideoAdapter(block_out_channels=(16, 32)))(
            "a cat", image=image, **common)
    with pytest.raises(ValueError, match="one per prompt"):
        pipe(["a", "b", "c"], image=pictures(2, 32, 0), **common)
    with pytest.raises(TypeError, match="PIL image"):
        pipe("a cat", image="frame.png", **common)
    with pytest.raises(TypeError, match=r"shape \(32, 32\)"):
        pipe("a cat", image=np.zeros((32, 32)), **common)
    pipe.enable_free_noise(context_length=4, context_stride=2)
    with pytest.raises(ValueError, match="FreeNoise"):
        pipe("a cat", image=image, **common)


def demo_adjust_colors(frame, picture, hue_weight=0.03):
    """AnimateLCM-I2V's demo's colour correction restated with colorsys, pixel by pixel, in floating point: RGB
    ``[H, W, 3]`` in [0, 1] -> RGB, on OpenCV's 8-bit HSV scale (hue 0..180, saturation and value 0..255)."""
    import colorsys

    def hsv(rgb):
        return np.array([[colorsys.rgb_to_hsv(*pixel) for pixel in row] for row in rgb]) * [180, 255, 255]

    frame_hsv, picture_hsv = hsv(frame), hsv(picture)
    shift = (picture_hsv.mean(axis=(0, 1)) - frame_hsv.mean(axis=(0, 1))) * [hue_weight, 1, 1]
    moved = np.clip(frame_hsv + shift, 0, [180, 255, 255]) / [180, 255, 255]
    return np.array([[colorsys.hsv_to_rgb(*(pixel % [1, 2, 2])) for pixel in row] for row in moved])


def test_match_picture_colors_is_the_demos_colour_correction():
    """Each frame of each video moves towards its own picture as the demo's adjust_colors moves it (colorsys
    restatement); greys, saturated colours and clipping included; a frame already like its picture stays as it is."""
    from animatelcm.pipelines import match_picture_colors

    rng = np.random.default_rng(0)
    frames = rng.random((2, 3, 3, 6, 7)).astype(np.float32)
    frames[0, 0, :, :2] = 0.5  # grey pixels (no hue)
    frames[0, 1, 0] = 1.0  # saturated red channel
    pictures = rng.random((2, 3, 9, 5)).astype(np.float32) ** 3  # dark: values clip at 0
    ours = match_picture_colors(torch.from_numpy(frames), torch.from_numpy(pictures))
    assert ours.shape == frames.shape and ours.dtype == torch.float32
    for video in range(2):
        for frame in range(3):
            expected = demo_adjust_colors(frames[video, frame].transpose(1, 2, 0), pictures[video].transpose(1, 2, 0))
            np.testing.assert_allclose(ours[video, frame].numpy().transpose(1, 2, 0), expected, atol=1e-5)
    same = torch.from_numpy(frames[:1, :1])
    torch.testing.assert_close(match_picture_colors(same, same[0, 0]), same, atol=1e-5, rtol=0)
    half = match_picture_colors(torch.from_numpy(frames).half(), torch.from_numpy(pictures))
    assert half.dtype == torch.float16 and (half.float() - ours).abs().max() < 4e-3
    with pytest.raises(ValueError, match=r"pictures must be \[B, 3, H, W\]"):
        match_picture_colors(torch.from_numpy(frames), torch.from_numpy(pictures[:, :2]))
    with pytest.raises(ValueError, match=r"frames must be \[B, F, 3, H, W\]"):
        match_picture_colors(torch.from_numpy(frames[0]), torch.from_numpy(pictures))


def test_image_to_video_matches_the_pictures_colours_when_asked(components):
    """match_image_colors=True gives the frames of the same call without it, each video moved towards its own
    picture, for every decoded output type and return_dict=False; without an image or with latents it is an
    error."""
    from animatelcm.pipelines import match_picture_colors

    pipe = AnimateLCMPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.image_adapter = random_image_adapter(pipe.unet, seed=3)
    images = pictures(2, 32, 7)
    common = dict(prompt=["a cat", "a dog"], image=images, num_frames=3, height=32, width=32, num_inference_steps=2)
    latents = torch.randn(2, 4, 3, 4, 4)

    def run(**kwargs):
        return pipe(latents=latents, generator=torch.Generator().manual_seed(0), **common, **kwargs)

    plain = run(output_type="pt").frames
    targets = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255 for image in images])
    expected = match_picture_colors(plain, targets)
    assert (expected - plain).abs().max() > 1e-2
    torch.testing.assert_close(run(output_type="pt", match_image_colors=True).frames, expected)
    matched = run(output_type="np", match_image_colors=True).frames
    assert matched.shape == (2, 3, 32, 32, 3)
    np.testing.assert_allclose(matched, expected.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    (as_tuple,) = run(output_type="np", match_image_colors=True, return_dict=False)
    np.testing.assert_array_equal(as_tuple, matched)
    pil = run(match_image_colors=True).frames
    assert len(pil) == 2 and len(pil[1]) == 3
    assert np.abs(np.asarray(pil[1][2]) / 255 - matched[1, 2]).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="needs image="):
        pipe("a cat", num_frames=3, height=32, width=32, match_image_colors=True)
    with pytest.raises(ValueError, match="output_type='latent'"):
        run(output_type="latent", match_image_colors=True)


@pytest.mark.parametrize("guidance, strength, steps", [(1.0, 0.8, 4), (2.0, 0.5, 4), (1.0, 1.0, 2)])
def test_video_to_video_matches_diffusers(components, guidance, strength, steps):
    """AnimateLCMVideoToVideoPipeline gives diffusers' AnimateDiffVideoToVideoPipeline + diffusers.LCMScheduler's
    frames for the same components, clip and generator (the last int(steps x strength) steps of the schedule)."""
    from animatelcm import AnimateLCMVideoToVideoPipeline

    ours = AnimateLCMVideoToVideoPipeline(**components)
    theirs = diffusers.AnimateDiffVideoToVideoPipeline(
        **components, scheduler=diffusers.LCMScheduler.from_config(ours.scheduler.config))
    assert isinstance(ours.scheduler, LCMScheduler)
    clip = pictures(5, 40, seed=3)
    common = dict(prompt="a red circle moving right", negative_prompt="blurry", height=32, width=32,
                  num_inference_steps=steps, guidance_scale=guidance, strength=strength, output_type="np")
    frames = {}
    for name, pipe in (("ours", ours), ("theirs", theirs)):
        pipe.set_progress_bar_config(disable=True)
        frames[name] = pipe(video=clip, generator=torch.Generator().manual_seed(4), **common).frames
    assert frames["ours"].shape == (1, 5, 32, 32, 3)
    assert np.abs(frames["ours"] - frames["theirs"]).max() <= 1e-4
    again = ours(video=clip, generator=torch.Generator().manual_seed(4), **{**common, "strength": 0.5 if strength == 1 else 1.0}).frames
    assert np.abs(again - frames["ours"]).max() > 1e-3  # strength changes the clip


def test_video_to_video_inputs(components):
    """One clip for several prompts and num_videos_per_prompt (each video as if made alone, one step), a clip as
    an array or a tensor, a clip per prompt; bad input says what to do."""
    from animatelcm import AnimateLCMVideoToVideoPipeline

    pipe = AnimateLCMVideoToVideoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    clip, other = pictures(3, 32, seed=0), pictures(3, 32, seed=1)
    common = dict(height=32, width=32, num_inference_steps=2, strength=0.5, output_type="pt")

    def run(video, prompt, videos=1, **kwargs):  # a generator per video: each video as if made alone
        generator = [torch.Generator().manual_seed(1) for _ in range(videos)]
        return pipe(video=video, prompt=prompt, generator=generator, **common, **kwargs).frames

    alone = run(clip, "a cat")
    array = np.stack([np.asarray(frame) for frame in clip]).astype(np.float32) / 255
    torch.testing.assert_close(run(array, "a cat"), alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(run(torch.from_numpy(array).permute(0, 3, 1, 2), "a cat"), alone, atol=1e-4, rtol=1e-4)
    both = run(clip, ["a cat", "a dog"], videos=2)
    assert both.shape == (2, 3, 3, 32, 32)
    torch.testing.assert_close(both[:1], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1:], run(clip, "a dog"), atol=1e-4, rtol=1e-4)
    two = run(clip, "a cat", videos=2, num_videos_per_prompt=2)
    torch.testing.assert_close(two, torch.cat([alone, alone]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(run([clip, other], ["a cat", "a dog"], videos=2)[1:], run(other, "a dog"), atol=1e-4,
                               rtol=1e-4)
    for kwargs, error, needle in [(dict(video=None), ValueError, "video is required"),
                                  (dict(strength=0.2), ValueError, "runs no step"),
                                  (dict(strength=1.5), ValueError, r"strength must be in \(0, 1\]"),
                                  (dict(video=[clip, clip, clip], prompt=["a", "b"]), ValueError, "one per prompt"),
                                  (dict(video=[clip, pictures(4, 32, 2)], prompt=["a", "b"]), ValueError,
                                   "one length"),
                                  (dict(video=np.zeros((32, 32, 3))), ValueError, r"\[F, H, W, 3\]"),
                                  (dict(video="clip.mp4"), TypeError, "list of frames")]:
        arguments = {"video": clip, "prompt": "a cat", **common, **kwargs}
        with pytest.raises(error, match=needle):
            pipe(**arguments)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_video_to_video_with_a_controlnet_matches_diffusers(components, guidance):
    """AnimateLCMVideoToVideoControlNetPipeline gives diffusers' AnimateDiffVideoToVideoControlNetPipeline +
    diffusers.LCMScheduler's frames; several prompts share the clip and its control frames (each video as made
    alone), which diffusers' own refuses; the control frames must be one per frame of the video."""
    from animatelcm import AnimateLCMVideoToVideoControlNetPipeline

    controlnet = diffusers.ControlNetModel.from_unet(components["unet"], conditioning_channels=3).eval()
    with torch.no_grad():  # its output convs start at zero: give them weights so the control shows
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
    ours = AnimateLCMVideoToVideoControlNetPipeline.from_pipe(AnimateLCMPipeline(**components), controlnet=controlnet)
    assert type(ours.scheduler) is LCMScheduler
    reference = diffusers.AnimateDiffVideoToVideoControlNetPipeline(
        **components, controlnet=controlnet, scheduler=diffusers.LCMScheduler.from_config(ours.scheduler.config))
    for pipe in (ours, reference):
        pipe.set_progress_bar_config(disable=True)
    video, control = pictures(4, 40, seed=1), pictures(4, 32, seed=2)
    common = dict(video=video, negative_prompt="blurry", height=32, width=32, num_inference_steps=4,
                  guidance_scale=guidance, strength=0.6, output_type="np", conditioning_frames=control)
    got = ours(prompt="a red circle", generator=torch.Generator().manual_seed(1), **common).frames
    expected = reference(prompt="a red circle", generator=torch.Generator().manual_seed(1), **common).frames
    assert got.shape == (1, 4, 32, 32, 3) and np.abs(got - expected).max() <= 1e-4
    latents = [ours(prompt="a red circle", generator=torch.Generator().manual_seed(1),
                    **{**common, "conditioning_frames": frames, "output_type": "latent", "strength": 1.0}).frames
               for frames in (np.zeros((4, 32, 32, 3), np.float32), np.ones((4, 32, 32, 3), np.float32))]
    # the control frames steer the clip (black against white; from t = 999, where the x0 prediction amplifies most)
    assert (latents[0] - latents[1]).abs().max() > 1e-2
    generators = [torch.Generator().manual_seed(1) for _ in range(2)]
    both = ours(prompt=["a cat", "a red circle"], generator=generators, **common).frames
    alone = ours(prompt="a red circle", generator=[torch.Generator().manual_seed(1)], **common).frames
    assert both.shape[0] == 2 and np.abs(both[1] - alone[0]).max() <= 1e-4
    with pytest.raises(ValueError, match="one control image per frame"):
        ours(prompt="x", **{**common, "conditioning_frames": control[:3]})
    with pytest.raises(ValueError, match="conditioning_frames is required"):
        ours(prompt="x", **{**common, "conditioning_frames": None})


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_controlnet_pipeline_matches_diffusers(components, guidance):
    controlnet = diffusers.ControlNetModel.from_unet(components["unet"], conditioning_channels=3).eval()
    pipe = AnimateLCMPipeline(**components)
    ours = AnimateLCMControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    assert type(ours.scheduler) is LCMScheduler
    reference = diffusers_twin(diffusers.AnimateDiffControlNetPipeline, pipe, controlnet=controlnet)
    ours.set_progress_bar_config(disable=True)
    control = pictures(6, 48, seed=2)
    common = dict(prompt="a red circle", negative_prompt="blurry", num_frames=6, height=48, width=48,
                  num_inference_steps=3, guidance_scale=guidance, output_type="np", conditioning_frames=control,
                  latents=torch.randn(1, 4, 6, 6, 6))
    got = ours(generator=torch.Generator().manual_seed(1), **common).frames
    expected = reference(generator=torch.Generator().manual_seed(1), **common).frames
    assert got.shape == (1, 6, 48, 48, 3)
    assert np.abs(got - expected).max() <= 1e-4
    del common["latents"], common["prompt"]
    assert ours("a red circle", num_videos_per_prompt=2, **common).frames.shape[0] == 2
    two = torch.randn(2, 4, 6, 6, 6)  # several prompts: each video sees the whole control clip
    batch = ours(["a red circle", "a cat"], **{**common, "num_inference_steps": 1}, latents=two).frames
    alone = ours("a cat", **{**common, "num_inference_steps": 1}, latents=two[1:]).frames
    assert np.abs(batch[1] - alone[0]).max() <= 1e-4
    with pytest.raises(ValueError, match="one control image per frame"):
        ours("x", **{**common, "conditioning_frames": control[:5]})
    with pytest.raises(ValueError, match="conditioning_frames is required"):
        ours("x", **{**common, "conditioning_frames": None})
    # the clip as one array [F, H, W, 3] or tensor [F, 3, H, W]: the same as its frames in a list
    arrays = np.stack([np.asarray(frame).astype(np.float32) / 255 for frame in control])
    one_step = {**common, "num_inference_steps": 1, "latents": two[:1]}
    by_list = ours("x", **{**one_step, "conditioning_frames": list(arrays)}).frames
    by_array = ours("x", **{**one_step, "conditioning_frames": arrays}).frames
    by_tensor = ours("x", **{**one_step, "conditioning_frames": torch.from_numpy(arrays).permute(0, 3, 1, 2)}).frames
    assert np.abs(by_array - by_list).max() <= 1e-5 and np.abs(by_tensor - by_list).max() <= 1e-5
    with pytest.raises(ValueError, match="share one shape"):
        ours("x", **{**common, "conditioning_frames": [arrays[0]] * 5 + [arrays[0][:40]]})
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        ours("x", **{**common, "conditioning_frames": arrays[0]})


def test_controlnet_whose_downsampling_differs_from_the_vae(components):
    """A ControlNet that downsamples its control 4x under a VAE that downsamples 8x (or the reverse, as in the
    miniature world) gets control images of latent size x its own factor, as the teacher_free stage trains it."""
    controlnet = diffusers.ControlNetModel.from_unet(components["unet"], conditioning_channels=3,
                                                     conditioning_embedding_out_channels=(8, 16, 16)).eval()
    pipe = AnimateLCMControlNetPipeline.from_pipe(AnimateLCMPipeline(**components), controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    controlnet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["controlnet_cond"].shape),
                                         with_kwargs=True)
    out = pipe("a cat", num_frames=3, height=48, width=32, num_inference_steps=1, conditioning_frames=pictures(3, 40, 1),
               output_type="latent").frames
    assert out.shape == (1, 4, 3, 6, 4) and seen[0][-2:] == (24, 16)


def test_free_noise_makes_clips_longer_than_the_table_as_diffusers(components):
    """FreeNoise (overlapping windows) beyond the motion module's 32-frame table: a string or {frame: prompt} prompt
    gives diffusers' AnimateDiffPipeline's clip with the same LCM scheduler; several videos a call are refused."""
    pipe, reference = make_pair(components)
    for p in (pipe, reference):
        p.enable_free_noise(context_length=16, context_stride=8)
    common = dict(num_frames=36, height=32, width=32, num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    for prompt in ("a red circle", {0: "a red circle", 20: "a blue square"}):
        latents = torch.randn(1, 4, 36, 4, 4, generator=torch.Generator().manual_seed(0))
        ours = pipe(prompt, latents=latents, generator=torch.Generator().manual_seed(1), **common).frames
        theirs = reference(prompt, latents=latents, generator=torch.Generator().manual_seed(1), **common).frames
        assert ours.shape == (1, 4, 36, 4, 4)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="FreeNoise makes one video a call"):
        pipe("a red circle", num_videos_per_prompt=2, **common)
    # a clip shorter than the window: diffusers' FreeNoise blocks find no window (an IndexError deep in the UNet)
    with pytest.raises(IndexError):
        reference("a red circle", **{**common, "num_frames": 12})
    with pytest.raises(ValueError, match=r"FreeNoise's window \(16 frames\) is longer than the clip \(12 frames\)"):
        pipe("a red circle", **{**common, "num_frames": 12})


@pytest.mark.parametrize("latent_condition", [True, False])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_sparse_controlnet_pipeline_matches_diffusers(components, latent_condition, guidance):
    """SparseCtrl (control images at a few frames; through the VAE for the RGB kind, as they are for the scribble
    kind): the same frames as diffusers' AnimateDiffSparseControlNetPipeline with diffusers' LCMScheduler; several
    videos each equal to the one made alone; the decode in chunks; bad indices and counts refused."""
    from animatelcm import AnimateLCMSparseControlNetPipeline
    from animatelcm.testing import tiny_sparse_controlnet

    pipe = AnimateLCMPipeline(**components)
    controlnet = tiny_sparse_controlnet(pipe.unet, pipe.motion_adapter, latent_condition=latent_condition)
    ours = AnimateLCMSparseControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    assert type(ours.scheduler) is LCMScheduler
    reference = diffusers_twin(diffusers.AnimateDiffSparseControlNetPipeline, pipe, controlnet=controlnet)
    ours.set_progress_bar_config(disable=True)
    control = pictures(2, 48, seed=3)
    common = dict(prompt="a red circle", negative_prompt="blurry", num_frames=6, height=48, width=48,
                  num_inference_steps=3, guidance_scale=guidance, output_type="np", conditioning_frames=control,
                  controlnet_frame_indices=[0, 5], latents=torch.randn(1, 4, 6, 6, 6))

    def seeded(p, **arguments):  # the RGB kind's VAE encode samples from torch's global generator, as diffusers'
        torch.manual_seed(7)
        return p(generator=torch.Generator().manual_seed(1), **{**common, **arguments}).frames

    got, expected = seeded(ours), seeded(reference)
    assert got.shape == (1, 6, 48, 48, 3)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - seeded(ours, controlnet_conditioning_scale=0.0)).max() > 1e-3  # the control reaches the clip
    assert np.abs(seeded(ours, decode_chunk_size=4) - got).max() <= 1e-5
    from animatelcm import patch_pipeline, unpatch_pipeline

    patch_pipeline(ours)  # the fused kernels, the SparseCtrl model's motion modules included
    assert np.abs(seeded(ours) - got).max() <= 1e-3
    unpatch_pipeline(ours)
    del common["latents"], common["prompt"]
    two = torch.randn(2, 4, 6, 6, 6)
    one_step = {**common, "num_inference_steps": 1}
    torch.manual_seed(7)
    batch = ours("a cat", num_videos_per_prompt=2, **one_step, latents=two).frames
    torch.manual_seed(7)
    alone = ours("a cat", **one_step, latents=two[1:]).frames
    assert batch.shape[0] == 2 and np.abs(batch[1] - alone[0]).max() <= 1e-4
    for bad, match in [(dict(controlnet_frame_indices=[0, 6]), r"distinct frame numbers in \[0, 6\)"),
                       (dict(controlnet_frame_indices=[2, 2]), "distinct"),
                       (dict(controlnet_frame_indices=[0]), "2 conditioning frames for 1 frame indices"),
                       (dict(conditioning_frames=None), "conditioning_frames is required")]:
        with pytest.raises(ValueError, match=match):
            ours("x", **{**one_step, **bad})
    single = ours("x", **{**one_step, "conditioning_frames": control[0], "controlnet_frame_indices": [3]}).frames
    assert single.shape == (1, 6, 48, 48, 3)  # one image alone is one control frame
    with pytest.raises(ValueError, match="no FreeNoise"):
        ours.enable_free_noise()
