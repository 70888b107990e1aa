import copy

import pytest
import torch

from animatelcm.testing import TinyConfig, tiny_components


@pytest.fixture(scope="session")
def _tiny_components_cache(tmp_path_factory):
    return tiny_components(tmp_path_factory.mktemp("tokenizer"), TinyConfig(), seed=0)


@pytest.fixture
def components(_tiny_components_cache):
    """Fresh deep copies of the tiny SD-shaped parts (unet, motion_adapter, vae, text_encoder, tokenizer)."""
    return {k: (v if k == "tokenizer" else copy.deepcopy(v)) for k, v in _tiny_components_cache.items()}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
