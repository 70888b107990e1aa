import os
import time

import diffusers
import pytest
import torch

from animatelcm import LCMScheduler, animatelcm_scheduler

CONFIGS = [
    dict(prediction_type="epsilon"),
    dict(prediction_type="v_prediction"),
    dict(prediction_type="sample"),
    dict(prediction_type="epsilon", clip_sample=True, clip_sample_range=0.7),
    dict(prediction_type="epsilon", thresholding=True, sample_max_value=1.3, dynamic_thresholding_ratio=0.9),
    dict(prediction_type="v_prediction", thresholding=True),
    dict(prediction_type="epsilon", beta_schedule="scaled_linear", set_alpha_to_one=False),
    dict(prediction_type="epsilon", timestep_scaling=7.0, rescale_betas_zero_snr=True),
]


def run_both(config, steps, shape, set_kwargs=None, seed=0, dtype=torch.float32, draw_ahead=False):
    """Run diffusers' and our scheduler side by side on the same model outputs and generators."""
    set_kwargs = set_kwargs or {}
    reference = diffusers.LCMScheduler(**config)
    ours = LCMScheduler.from_config(reference.config)
    ours.draw_noise_ahead = draw_ahead
    reference.set_timesteps(steps, **set_kwargs)
    ours.set_timesteps(steps, **set_kwargs)
    assert torch.equal(reference.timesteps, ours.timesteps)
    data = torch.Generator().manual_seed(seed)
    x_ref = x_ours = torch.randn(shape, generator=data).to(dtype)
    g_ref, g_ours = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    worst = 0.0
    for t in reference.timesteps:
        model_output = torch.randn(shape, generator=data).to(dtype)
        a = reference.step(model_output, t, x_ref, generator=g_ref)
        b = ours.step(model_output, t, x_ours, generator=g_ours)
        for u, v in ((a.prev_sample, b.prev_sample), (a.denoised, b.denoised)):
            assert u.dtype == v.dtype and u.shape == v.shape
            worst = max(worst, (u.float() - v.float()).abs().max().item())
        x_ref, x_ours = a.prev_sample, b.prev_sample
    assert torch.equal(g_ref.get_state(), g_ours.get_state()), "noise draws diverged"
    return worst


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("original_steps", [50, 100, 200])
def test_matches_diffusers(config, original_steps):
    worst = run_both(dict(beta_schedule="linear", original_inference_steps=original_steps) | config, 4, (2, 4, 3, 5, 7))
    assert worst <= 1e-6


@pytest.mark.parametrize("draw_ahead", [False, True])
@pytest.mark.parametrize("steps", [1, 2, 3, 6, 8])
def test_step_counts_and_odd_shapes(steps, draw_ahead):
    # run_both also checks that the generator ends where diffusers' does: no draw ahead past the last noisy step
    assert run_both(dict(beta_schedule="linear", original_inference_steps=100), steps, (1, 4, 13, 9, 11),
                    draw_ahead=draw_ahead) <= 1e-6


@pytest.mark.parametrize("draw_ahead", [False, True])
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_strength(strength, draw_ahead):
    assert run_both(dict(beta_schedule="linear"), 4, (1, 4, 2, 8, 8), {"strength": strength},
                    draw_ahead=draw_ahead) <= 1e-6


def noise_steps(draw_ahead, requests, between=None):
    """Run a 5-step ``prediction_type="sample"`` scheduler on zero model outputs and samples, so each prev_sample is
    the step's noise times a fixed scale; ``requests`` gives each step's (shape, generator); ``between(step)`` runs
    after each step. Returns the prev_samples."""
    scheduler = animatelcm_scheduler(prediction_type="sample")
    scheduler.draw_noise_ahead = draw_ahead
    scheduler.set_timesteps(5)
    outputs = []
    for index, (shape, generator) in enumerate(requests):
        zero = torch.zeros(shape)
        outputs.append(scheduler.step(zero, scheduler.timesteps[index], zero, generator=generator).prev_sample)
        if between is not None:
            between(scheduler, index)
    return outputs


def generators(batch):
    """Fresh seeded CPU generator(s): one for batch 1, one per sample (a list) otherwise."""
    made = [torch.Generator().manual_seed(3 + i) for i in range(batch)]
    return made if batch > 1 else made[0]


def states(generator):
    return [g.get_state() for g in (generator if isinstance(generator, list) else [generator])]


def same_states(a, b):
    return all(torch.equal(x, y) for x, y in zip(states(a), states(b)))


@pytest.mark.parametrize("batch", [1, 2])
def test_draw_ahead_puts_the_generators_back_when_the_next_step_asks_for_something_else(batch):
    shape, other_shape = (batch, 4, 3, 5, 7), (batch, 4, 3, 5, 8)
    results = {}
    for draw_ahead in (False, True):
        g, other = generators(batch), generators(batch)
        # another generator at step 1, another shape at step 2, back to the first at step 3
        outputs = noise_steps(draw_ahead, [(shape, g), (shape, other), (other_shape, other), (shape, g)])
        results[draw_ahead] = (outputs, g, other)
    (want, g_want, other_want), (got, g_got, other_got) = results[False], results[True]
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert same_states(g_got, g_want) and same_states(other_got, other_want)


def test_draw_ahead_is_put_back_by_set_timesteps_and_leaves_a_generator_moved_since_alone():
    shape = (1, 4, 3, 5, 7)
    # a loop left after one step: the next call's set_timesteps puts the generator back
    g, g_want = generators(1), generators(1)
    noise_steps(False, [(shape, g_want)])
    noise_steps(True, [(shape, g)], between=lambda scheduler, _: scheduler.set_timesteps(5))
    assert same_states(g, g_want)

    # something draws from the generator between two steps once the draw ahead is done: the next step draws
    # afresh from where that left it, and nothing is put back over it. Without the draw ahead, the same draws in
    # the same order: step 0's, the one drawn ahead (unused), the one between, step 1's, ...
    def draw_between(scheduler, index):
        if index == 0:
            ahead = scheduler._draw_ahead
            if ahead is None:
                torch.randn(shape, generator=g_want)
            else:
                ahead.future.result()
            torch.randn(shape, generator=g if ahead is not None else g_want)

    g, g_want = generators(1), generators(1)
    want = noise_steps(False, [(shape, g_want)] * 5, between=draw_between)
    got = noise_steps(True, [(shape, g)] * 5, between=draw_between)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert same_states(g, g_want)
def test_custom_timesteps_and_original_steps_argument():
    assert run_both(dict(), None, (1, 4, 2, 4, 4), {"timesteps": [999, 759, 499, 259]}) <= 1e-6
    assert run_both(dict(), 4, (1, 4, 2, 4, 4), {"original_inference_steps": 200}) <= 1e-6


def test_low_precision_close_to_float32_reference():
    config = dict(beta_schedule="linear", original_inference_steps=100)
    for dtype, tolerance in ((torch.bfloat16, 5e-2), (torch.float16, 5e-3)):
        reference = LCMScheduler(**config)
        reference.set_timesteps(4)
        ours = LCMScheduler(**config)
        ours.set_timesteps(4)
        x = torch.randn(1, 4, 2, 6, 6)
        eps = torch.randn_like(x)
        t = reference.timesteps[-1]
        reference._step_index = ours._step_index = 3
        exact = reference.step(eps, t, x).prev_sample
        low = ours.step(eps.to(dtype), t, x.to(dtype)).prev_sample
        assert low.dtype == dtype
        assert (low.float() - exact).abs().max().item() <= tolerance * exact.abs().max().item()


def test_step_reads_no_device_values():
    """On the meta device any host read of tensor data (a device sync on CUDA) raises: step must not do one,
    neither for schedule timesteps nor for other device timesteps once the begin index is known."""
    scheduler = animatelcm_scheduler()
    scheduler.set_timesteps(4, device="meta")
    x = torch.empty(1, 4, 16, 8, 8, device="meta")
    for t in scheduler.timesteps:
        x = scheduler.step(torch.empty_like(x), t, x).prev_sample
    assert x.device.type == "meta" and scheduler.step_index == 4

    scheduler.set_timesteps(4, device="meta")
    scheduler.set_begin_index(0)
    foreign = torch.tensor(999, device="meta")  # not a view of scheduler.timesteps: coefficients built on device
    out = scheduler.step(torch.empty_like(x), foreign, x).prev_sample
    assert out.device.type == "meta"


def test_timestep_not_in_schedule_uses_its_own_alphas_like_diffusers():
    reference = diffusers.LCMScheduler(beta_schedule="linear")
    ours = LCMScheduler.from_config(reference.config)
    for s in (reference, ours):
        s.set_timesteps(4)
        s.set_begin_index(1)
    x, eps = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 2, 4, 4)
    a = reference.step(eps, 600, x, generator=torch.Generator().manual_seed(0))
    b = ours.step(eps, 600, x, generator=torch.Generator().manual_seed(0))
    assert (a.prev_sample - b.prev_sample).abs().max() <= 1e-5
    assert (a.denoised - b.denoised).abs().max() <= 1e-5


def test_from_config_of_other_schedulers_and_defaults():
    ddim = diffusers.DDIMScheduler(beta_schedule="linear", steps_offset=1)
    lcm = LCMScheduler.from_config(ddim.config)
    assert isinstance(lcm, diffusers.LCMScheduler)
    assert lcm.config.beta_schedule == "linear"
    default = animatelcm_scheduler()
    assert default.config.original_inference_steps == 100 and default.config.beta_schedule == "linear"
    default.set_timesteps(4)
    assert default.timesteps.tolist() == [999, 749, 499, 249]


def test_errors():
    scheduler = animatelcm_scheduler()
    x = torch.randn(1, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(4)
    with pytest.raises(TypeError, match="timestep"):
        scheduler.step(x, "999", x)
    with pytest.raises(ValueError, match="shape"):
        scheduler.step(x, scheduler.timesteps[0], x[:, :2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("draw_ahead", [False, True])
@pytest.mark.parametrize("generators", [1, 2])
def test_cuda_steps_with_cpu_generators_match_diffusers_without_a_sync(generators, draw_ahead):
    """diffusers' usual CPU generator(s) on CUDA samples: the same noise and results as diffusers' step, and no host
    synchronisation (diffusers' pageable copy of the noise waits for every queued kernel), with the next step's
    noise drawn ahead or not."""
    reference = diffusers.LCMScheduler(beta_schedule="linear", original_inference_steps=100)
    ours = LCMScheduler.from_config(reference.config)
    ours.draw_noise_ahead = draw_ahead
    for scheduler in (reference, ours):
        scheduler.set_timesteps(4, device="cuda")

    def seeded():
        made = [torch.Generator().manual_seed(11 + i) for i in range(generators)]
        return made if generators > 1 else made[0]

    data = torch.Generator().manual_seed(0)
    shape = (2, 4, 3, 5, 7)
    x_ref = x_ours = torch.randn(shape, generator=data).cuda()
    g_ref, g_ours = seeded(), seeded()
    for t_ref, t_ours in zip(reference.timesteps, ours.timesteps):
        model_output = torch.randn(shape, generator=data).cuda()
        a = reference.step(model_output, t_ref, x_ref, generator=g_ref)
        torch.cuda.set_sync_debug_mode("error")
        try:
            b = ours.step(model_output, t_ours, x_ours, generator=g_ours)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(b.prev_sample, a.prev_sample, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.denoised, a.denoised, atol=1e-5, rtol=1e-5)
        x_ref, x_ours = a.prev_sample, b.prev_sample
    for mine, theirs in zip(g_ours if generators > 1 else [g_ours], g_ref if generators > 1 else [g_ref]):
        assert torch.equal(mine.get_state(), theirs.get_state()), "noise draws diverged"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_noise_reuses_pinned_buffers_without_a_sync_or_a_clobbered_draw():
    """Noise draws through the reused page-locked buffers: each equals randn_tensor's on the CPU, none is
    overwritten by a later draw while its copy is queued (long kernels keep the copies waiting), shapes and dtypes
    come and go, and no draw waits for the GPU."""
    from diffusers.utils.torch_utils import randn_tensor

    from animatelcm.schedulers import _pinned_staging, draw_step_noise

    shapes = [(1, 4, 16, 8, 8), (2, 4, 3, 5, 7)] * 3 + [(1, 1, 1, 1, 9), (3, 2), (5,), (1, 4, 16, 8, 8)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    busy = torch.randn(4096, 4096, device="cuda")
    draws, expected = [], []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for index, shape in enumerate(shapes):
            dtype = dtypes[index % len(dtypes)]
            busy = busy @ busy / 64  # keeps the stream busy so the copies stay queued
            draws.append(draw_step_noise(shape, torch.Generator().manual_seed(index), torch.device("cuda"), dtype))
            expected.append(randn_tensor(shape, generator=torch.Generator().manual_seed(index), dtype=dtype))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for draw, reference in zip(draws, expected):
        assert draw.device.type == "cuda" and draw.dtype == reference.dtype
        assert torch.equal(draw.cpu(), reference)
    assert len(_pinned_staging.slots) <= _pinned_staging.SHAPES_KEPT


@pytest.mark.parametrize("make", [
    lambda: diffusers.DDIMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear",
                                    prediction_type="v_prediction"),
    lambda: diffusers.DDIMScheduler(trained_betas=torch.linspace(1e-4, 0.02, 1000).tolist()),
    lambda: diffusers.EulerDiscreteScheduler(beta_start=0.001, beta_end=0.02),
])
def test_lcm_scheduler_like_keeps_the_noise_schedule(make):
    from animatelcm.schedulers import lcm_scheduler_like

    other = make()
    lcm = lcm_scheduler_like(other)
    assert type(lcm) is LCMScheduler and lcm.config.original_inference_steps == 100
    torch.testing.assert_close(lcm.alphas_cumprod, other.alphas_cumprod)
    assert lcm.config.prediction_type == other.config.prediction_type
    assert lcm_scheduler_like(lcm) is lcm


def test_lcm_scheduler_like_keeps_an_lcm_config_and_overrides_entries():
    """An LCM scheduler (ours or diffusers') keeps all of its config (timestep spacing, say), overrides replace
    single entries, and the scheduler given is never changed."""
    from animatelcm.schedulers import lcm_scheduler_like

    for make in (LCMScheduler, diffusers.LCMScheduler):
        given = make(beta_schedule="linear", timestep_spacing="trailing", original_inference_steps=50)
        lcm = lcm_scheduler_like(given, original_inference_steps=200, beta_end=0.014)
        assert type(lcm) is LCMScheduler and lcm is not given
        assert (lcm.config.original_inference_steps, lcm.config.beta_end) == (200, 0.014)
        assert lcm.config.timestep_spacing == "trailing" and lcm.config.beta_schedule == "linear"
        assert (given.config.original_inference_steps, given.config.beta_end) == (50, 0.012)
    plain = lcm_scheduler_like(diffusers.LCMScheduler(timestep_spacing="trailing"))
    assert type(plain) is LCMScheduler and plain.config.timestep_spacing == "trailing"
    ddim = lcm_scheduler_like(diffusers.DDIMScheduler(beta_schedule="linear"), beta_end=0.014)
    assert ddim.config.beta_end == 0.014 and ddim.config.original_inference_steps == 100


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # Python 3.12+: the point
def test_draw_ahead_works_in_a_forked_child_after_the_parent_drew_ahead():
    """A child forked after the parent drew ahead has no copy of the parent's drawing thread: it starts its own
    instead of waiting forever on one that does not exist there."""
    shape = (1, 4, 3, 5, 7)
    want = noise_steps(False, [(shape, generators(1))] * 3)
    noise_steps(True, [(shape, generators(1))] * 3)  # the parent's drawing thread exists now
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when its steps match, without running pytest's teardown
        code = 1
        try:
            got = noise_steps(True, [(shape, generators(1))] * 3)
            code = 0 if all(torch.equal(a, b) for a, b in zip(want, got)) else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while not (finished := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung waiting for its noise")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(finished[1]) == 0
