"""Test kit: tiny Stable-Diffusion-shaped components built offline from configs.

Used by the tests, the benchmarks and the embedded default model. Nothing here downloads anything: the CLIP
tokenizer is written from a small local byte-level vocabulary (``model_max_length=77`` like SD1.5's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Words given whole-word BPE merges in the tiny vocabulary (everything else falls back to byte tokens).
TOKENIZER_WORDS = ("a", "red", "green", "blue", "yellow", "circle", "square", "triangle", "moving", "left", "right",
                   "up", "down", "the", "cat", "dog", "walking", "on", "beach", "astronaut", "riding", "horse")


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable-unicode table (256 symbols)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(printable, codes))]


def write_tiny_tokenizer(directory: str | Path, words=TOKENIZER_WORDS) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` of a small CLIP BPE tokenizer into
    ``directory`` and return it. Vocabulary: the 256 byte symbols, their end-of-word forms, merges spelling out
    ``words``, and the two special tokens."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(merged)
            pieces = [merged] + pieces[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    return directory


def tiny_tokenizer(directory: str | Path):
    """A ``CLIPTokenizer`` (``model_max_length=77``) from the tiny vocabulary, written to ``directory``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(directory)), model_max_length=77)


@dataclass
class TinyConfig:
    """Sizes of the tiny SD-shaped model. Defaults give an SD1.5 topology (3 cross-attention down blocks + 1 plain,
    mirrored up blocks, mid block, 2 motion layers per down block and 3 per up block) at toy width."""

    block_out_channels: tuple = (16, 32, 32, 32)
    layers_per_block: int = 2
    norm_num_groups: int = 8
    attention_head_dim: int = 8
    cross_attention_dim: int = 32
    motion_heads: int = 2
    motion_max_seq_length: int = 32
    vae_block_out_channels: tuple = (8, 16, 32, 32)
    latent_channels: int = 4
    sample_size: int = 8
    text_hidden_size: int = 32
    text_layers: int = 2
    down_block_types: tuple = field(default=None)

    def unet_block_types(self):
        n = len(self.block_out_channels)
        down = self.down_block_types or ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
        up = tuple(reversed(["CrossAttnUpBlock2D" if d.startswith("CrossAttn") else "UpBlock2D" for d in down]))
        return down, up


def tiny_unet(config: TinyConfig = TinyConfig()):
    from diffusers import UNet2DConditionModel

    down, up = config.unet_block_types()
    return UNet2DConditionModel(
        sample_size=config.sample_size, in_channels=config.latent_channels, out_channels=config.latent_channels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        down_block_types=down, up_block_types=up, cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_num_groups,
    )


def tiny_motion_adapter(config: TinyConfig = TinyConfig()):
    from diffusers import MotionAdapter

    return MotionAdapter(
        block_out_channels=config.block_out_channels, motion_layers_per_block=config.layers_per_block,
        motion_num_attention_heads=config.motion_heads, motion_norm_num_groups=config.norm_num_groups,
        motion_max_seq_length=config.motion_max_seq_length,
    )


def tiny_vae(config: TinyConfig = TinyConfig()):
    from diffusers import AutoencoderKL

    n = len(config.vae_block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=config.latent_channels,
        block_out_channels=config.vae_block_out_channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        norm_num_groups=config.norm_num_groups, sample_size=config.sample_size * 2 ** (n - 1),
    )


def tiny_text_encoder(config: TinyConfig = TinyConfig(), vocab_size: int = 1000):
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=config.text_hidden_size, intermediate_size=2 * config.text_hidden_size,
        num_attention_heads=2, num_hidden_layers=config.text_layers, max_position_embeddings=77,
        projection_dim=config.cross_attention_dim, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(text_config)


def tiny_components(directory: str | Path, config: TinyConfig = TinyConfig(), seed: int = 0) -> dict:
    """All parts of a tiny text-to-video model, randomly initialised from ``seed``: ``unet``
    (UNet2DConditionModel), ``motion_adapter``, ``vae``, ``text_encoder``, ``tokenizer`` (written to
    ``directory``). The scheduler is left to the caller."""
    if config.cross_attention_dim != config.text_hidden_size:
        raise ValueError("TinyConfig: cross_attention_dim must equal text_hidden_size (the UNet attends to the "
                         "text encoder's hidden states)")
    tokenizer = tiny_tokenizer(directory)
    torch.manual_seed(seed)
    components = {
        "unet": tiny_unet(config),
        "motion_adapter": tiny_motion_adapter(config),
        "vae": tiny_vae(config),
        "text_encoder": tiny_text_encoder(config, vocab_size=len(tokenizer)),
        "tokenizer": tokenizer,
    }
    for module in (components["unet"], components["motion_adapter"], components["vae"], components["text_encoder"]):
        module.eval()
    _randomize_zero_init(components["motion_adapter"], seed)
    return components


def tiny_sparse_controlnet(unet, motion_adapter, latent_condition: bool = True, seed: int = 0):
    """A SparseCtrl model (``diffusers.SparseControlNetModel``, with the mask of conditioned frames) for the tiny
    ``unet`` (a UNet2DConditionModel or UNetMotionModel, VAE downsampling 8x) and ``motion_adapter``'s motion
    modules: on VAE latents through one convolution (as AnimateDiff v3's RGB model) or on images through a small
    encoder (as its scribble one). Its zero-initialised convolutions (the conditioning embedding's, the outputs, the
    motion modules' proj_out) get small random weights, so the control reaches the UNet."""
    from diffusers import SparseControlNetModel

    config = unet.config
    torch.manual_seed(seed)
    controlnet = SparseControlNetModel(
        in_channels=config.in_channels, conditioning_channels=4 if latent_condition else 3,
        block_out_channels=config.block_out_channels,
        down_block_types=tuple("CrossAttnDownBlockMotion" if "CrossAttn" in kind else "DownBlockMotion"
                               for kind in config.down_block_types),
        layers_per_block=config.layers_per_block, norm_num_groups=config.norm_num_groups,
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=config.get("attention_head_dim") or config.get("num_attention_heads"),  # UNetMotionModel's name
        motion_num_attention_heads=motion_adapter.config.motion_num_attention_heads,
        motion_max_seq_length=motion_adapter.config.motion_max_seq_length,
        conditioning_embedding_out_channels=(16, 32, 32, 32), use_simplified_condition_embedding=latent_condition)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if not parameter.any():  # zero-initialised
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return controlnet.eval()


def _randomize_zero_init(motion_adapter, seed: int) -> None:
    """Motion modules' proj_out is zero-initialised (an identity at step 0); give it small random weights so tests
    exercise the temporal path for real."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in motion_adapter.named_parameters():
            if ".proj_out." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
