"""animatelcm: few-step video generation with AnimateLCM.

Public API (imported lazily so ``import animatelcm`` stays cheap):
    LCMScheduler, animatelcm_scheduler        fused, sync-free LCM scheduler (drop-in for diffusers')
    AnimateLCMPipeline                        AnimateDiff pipeline with AnimateLCM defaults (text or image to video)
    AnimateLCMControlNetPipeline              the same for control frames (a ControlNet)
    AnimateLCMVideoToVideoPipeline            the same for a video redrawn to a prompt
    AnimateLCMVideoToVideoControlNetPipeline  and for a video redrawn following control frames
    AnimateLCMSparseControlNetPipeline        and for control images at a few frames (SparseCtrl)
    ImageToVideoAdapter                       the image-to-video adapter AnimateLCMPipeline(image_adapter=...) takes
    AnimateLCMImageEncoder                    the image encoder of AnimateLCM's released I2V model, the other one
    load_motion_adapter, load_pipeline        offline loaders for the checkpoints people download
    load_image_adapter, load_controlnet       and for the adapters (the trainer's, AnimateLCM-I2V's)
    load_sparse_controlnet                    and SparseCtrl models (AnimateDiff v3's)
    export_to_gif, export_to_mp4, export_video
    patch_pipeline, unpatch_pipeline          run a diffusers AnimateDiff pipeline on the fused kernels
    ops                                       fused kernels and their dispatcher
"""

from __future__ import annotations

import importlib

_LAZY = {
    "LCMScheduler": "animatelcm.schedulers",
    "animatelcm_scheduler": "animatelcm.schedulers",
    "AnimateLCMPipeline": "animatelcm.pipelines",
    "AnimateLCMControlNetPipeline": "animatelcm.pipelines",
    "AnimateLCMVideoToVideoPipeline": "animatelcm.pipelines",
    "AnimateLCMVideoToVideoControlNetPipeline": "animatelcm.pipelines",
    "AnimateLCMSparseControlNetPipeline": "animatelcm.pipelines",
    "ImageToVideoAdapter": "animatelcm.adapters",
    "AnimateLCMImageEncoder": "animatelcm.adapters",
    "load_motion_adapter": "animatelcm.loading",
    "load_pipeline": "animatelcm.loading",
    "load_lora": "animatelcm.loading",
    "load_image_adapter": "animatelcm.loading",
    "load_controlnet": "animatelcm.loading",
    "load_sparse_controlnet": "animatelcm.loading",
    "load_vae": "animatelcm.loading",
    "export_to_gif": "animatelcm.export",
    "export_to_mp4": "animatelcm.export",
    "export_video": "animatelcm.export",
    "patch_pipeline": "animatelcm.patching",
    "unpatch_pipeline": "animatelcm.patching",
}


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("animatelcm")
    except PackageNotFoundError:
        return "0.1.0+unknown"


__version__ = _package_version()


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "ops":
        return importlib.import_module("animatelcm.ops")
    raise AttributeError(f"module 'animatelcm' has no attribute {name!r}")


__all__ = ["__version__", "ops", *_LAZY]
