"""Notices diffusers prints that are false for the models this package builds, filtered out at import.

diffusers 0.42 warns on every ``ModelMixin.to(dtype)`` that "there are modules that should be kept in float32: []"
and that casting "can lead to inconsistent results", even when that list of modules is empty, as it is for the
UNet, motion adapter, VAE and ControlNet (its own ``AnimateDiffPipeline`` casts the UNet it builds, so every fp16 or
bf16 pipeline printed it twice). Only that message, with an empty list, is dropped; one naming modules still shows.
"""

from __future__ import annotations

import logging

_EMPTY_FP32_LIST = "that should be kept in float32: []."


class _DropEmptyFloat32Notice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _EMPTY_FP32_LIST not in record.getMessage()


def install() -> None:
    """Add the filter to diffusers' model logger (once; later calls do nothing)."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _DropEmptyFloat32Notice) for f in logger.filters):
        logger.addFilter(_DropEmptyFloat32Notice())


install()
