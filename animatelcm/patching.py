"""``patch_pipeline``: make a diffusers AnimateDiff pipeline run on the fused kernels, same outputs.

What is patched, in the UNet and in the pipeline's ControlNet if it has one (the same diffusers blocks run there
every step), all through diffusers' public hooks (attention processors and module forwards), all recorded so
``unpatch_pipeline`` restores the original objects exactly:

- motion modules (``AnimateDiffTransformer3D``): the frame-spanning GroupNorm fused with the permute to
  ``(B*H*W, F, C)`` and the permute back fused with the residual add (module forward);
- their self-attentions: ``TemporalAttentionProcessor`` runs :func:`animatelcm.ops.temporal_attention` on the q/k/v
  projections seen as ``[B, heads, F, D]`` views (no copies); the positional embedding stays where diffusers adds it
  (on the normed input, in the transformer block), the GEGLU feed-forward and output projection are diffusers' own;
- on the CPU, the spatial transformers' self-attention too (``SpatialSelfAttentionProcessor``: the same op's C++
  kernel over the H*W tokens), under ``backend="auto"`` or ``"cpp"``;
- every diffusers ``Attention`` (UNet, ControlNet, VAE) calls its current processor directly when a call has no
  extra keyword arguments (:func:`direct_attention_forward`: diffusers' forward inspects the processor's
  signature on every call, host time a GPU waits for) (module forward);
- ResNet blocks (and the VAE's): GroupNorm + SiLU fused, twice per block; on the CPU, for channels-last
  activations (the VAE decoder's), the second convolution with the residual add fused (module forward);
- spatial transformers (``Transformer2DModel``): their GroupNorm fused with the permute to ``[B, H*W, C]`` tokens
  and the permute back fused with the residual add (the motion-module kernels with one frame), the 1x1
  convolutions around them run as the equal matrix products on the tokens (module methods);
- their transformer blocks (``BasicTransformerBlock``, pre-LayerNorm: the spatial transformers' and the motion
  modules'): the same operations without diffusers' per-call branches and the module calls around single ops
  (LayerNorms, positional embeddings, the feed-forward's container, evaluation-mode dropouts): host time; on a
  GPU each residual add with the LayerNorm after it (and the positional embedding) as one fused op
  (:func:`animatelcm.ops.residual_layer_norm`) (module forward);
- every GEGLU feed-forward (motion modules and spatial transformers): its projection and ``h * gelu(gate)``
  together (:func:`animatelcm.ops.linear_geglu`; on the CPU in cache-sized row blocks) (module forward);
- where :func:`animatelcm.ops.cpu_gemm_library` picks oneDNN (AMD CPUs with AVX-512, or
  ``ANIMATELCM_CPU_GEMM=onednn``) and the UNet is on the CPU, both read when patching, every plain ``nn.Linear``
  (the VAE's too) runs :func:`animatelcm.ops.linear` (large float32 CPU products on oneDNN, the rest
  ``F.linear``) (module forward);
- a ``diffusers.LCMScheduler`` is swapped for :class:`animatelcm.LCMScheduler` with the same config (the
  pipeline's config keeps naming diffusers' class, so a patched pipeline's ``save_pretrained`` folder loads in plain
  diffusers);
- the pipeline's ``_execution_device`` and its models' ``dtype`` and ``device``, which diffusers reads on every
  call, give diffusers' answers without walking every module (:mod:`animatelcm.fast_properties`: the pipeline's
  class becomes a subclass that differs only there, unpatching restores it; its models get theirs during each
  call only);
- with ``cuda_graph=True``, the UNet's forward replays CUDA graphs captured per input signature
  (:mod:`animatelcm.cuda_graphs`).
Anything the fused paths do not cover (attention masks, cross-attention, other norms or activations) runs the
original code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_properties, ops
from .cuda_graphs import GraphedForward
from .ops.attention import MAX_HEAD_DIM
from .ops.dispatch import BACKENDS, PLAIN_TENSOR_TYPES, autocast_dtype, forced_backend, plain_inference_call
from .ops.native import native_unavailable_reason
from .ops.group_norm import is_channels_last

PATCH_ATTRIBUTE = "_animatelcm_patch"


@dataclass(frozen=True)
class PatchBackend:
    """patch_pipeline's ``backend`` (``name``) and what a patched call of each op passes for it (``self[op]``): that
    backend where the op implements it, else ``"auto"`` (as ``ANIMATELCM_BACKEND`` forces only the ops that
    implement the backend it names). Resolved once when patching, so the patched forwards read constants (nothing
    for torch.compile to trace through)."""

    name: str
    per_op: dict

    @classmethod
    def resolve(cls, name: str) -> "PatchBackend":
        implemented = ops.ops_by_backend()
        every_op = dict.fromkeys(op for names in implemented.values() for op in names)
        return cls(name, {op: name if name == "auto" or op in implemented[name] else "auto" for op in every_op})

    def __getitem__(self, op: str) -> str:
        return self.per_op[op]


class TemporalAttentionProcessor:
    """Attention processor for motion-module self-attention over frames on the fused kernel.

    Input ``hidden_states [B*H*W, F, C]``; q/k/v are projected with the module's own (LoRA-aware) layers (or its
    fused ``to_qkv`` after diffusers' ``fuse_qkv_projections``), viewed as ``[B*H*W, heads, F, C/heads]`` and
    passed to :func:`animatelcm.ops.temporal_attention`, whose output keeps the projection layout so the head merge
    is a free reshape. Calls it cannot serve (a mask, cross-attention, a 4-D input, extra norms) go to
    ``fallback``, the processor it replaced (diffusers' ``AttnProcessor2_0`` when none is given: diffusers makes
    processors of a module's current class with no arguments, as loading an IP-Adapter does for the layers without
    one).
    """

    def __init__(self, fallback=None, backend: "str | PatchBackend" = "auto"):
        if fallback is None:
            from diffusers.models.attention_processor import AttnProcessor2_0

            fallback = AttnProcessor2_0()
        self.fallback = fallback
        self.backend = backend if isinstance(backend, PatchBackend) else PatchBackend.resolve(backend)

    def handles(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> bool:
        return (attention_mask is None and encoder_hidden_states is None and hidden_states.dim() == 3
                and attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None
                and attn.norm_k is None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if not self.handles(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch, frames, _ = hidden_states.shape
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)  # views of one [B, F, 3 * inner] product
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        views = [t.view(batch, frames, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)]
        out = ops.temporal_attention(*views, backend=self.backend["temporal_attention"])  # [B, heads, F, D], memory [B, F, heads, D]
        out = out.transpose(1, 2).reshape(batch, frames, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        if not _identity_dropout(attn.to_out[1]):
            out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out if attn.rescale_output_factor == 1 else out / attn.rescale_output_factor


class SpatialSelfAttentionProcessor(TemporalAttentionProcessor):
    """Spatial self-attention (``attn1`` of the spatial transformers' blocks: ``[B*F, H*W, C]`` tokens) on the C++
    kernel of :func:`animatelcm.ops.temporal_attention`, whose streaming-softmax path takes the H*W-long sequences.
    CPU inputs only, and only where that kernel is what the op would run (the native module is built, the head dim
    fits, ``ANIMATELCM_BACKEND`` names no GPU backend); everything else, GPU inputs included (PyTorch's flash
    attention there), goes to the processor it replaced. Measured on 2 AMD EPYC Zen 4 cores, float32, against
    PyTorch's SDPA: 1.08x at ``[16, 2, 1024, 40]``, 1.18x at ``[16, 2, 256, 80]``."""

    def __init__(self, fallback=None, backend: "str | PatchBackend" = "auto"):
        super().__init__(fallback, backend)
        self.kernel_built = native_unavailable_reason() is None

    def handles(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> bool:
        return (hidden_states.device.type == "cpu" and self.kernel_built
                and attn.inner_dim // attn.heads <= MAX_HEAD_DIM and forced_backend() in (None, "cpp", "eager")
                and super().handles(attn, hidden_states, encoder_hidden_states, attention_mask))


def direct_attention_forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None,
                             **cross_attention_kwargs):
    """``Attention.forward`` without its per-call ``inspect.signature`` of the processor, for calls with no extra
    keyword arguments (then diffusers' forward calls the current processor with exactly these arguments):
    ``hidden_states [B, N, C]`` -> ``[B, N, C]``. That lookup cost 37-65 us a call on one AMD EPYC core, host
    time a GPU waits for when the call is host-bound. Calls with extra keyword arguments take diffusers' forward,
    which filters them for the processor."""
    if cross_attention_kwargs:
        return type(self).forward(self, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
    return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask)


def _identity_dropout(module) -> bool:
    """An ``nn.Dropout`` that returns its input unchanged (evaluation mode, or p = 0)."""
    return type(module) is nn.Dropout and (not module.training or module.p == 0)


def _hooked(*modules) -> bool:
    """Whether any of ``modules`` (None entries skipped) :func:`~animatelcm.fast_properties.has_own_hook`: its
    weights may be cast or moved in its forward (layerwise casting, sequential CPU offloading, leaf-level group
    offloading), so a fused path that reads them itself runs the original code, which calls the module."""
    return any(module is not None and fast_properties.has_own_hook(module) for module in modules)


def _opaque(*modules) -> bool:
    """Whether a fused path must call ``modules`` (None entries skipped), or run diffusers' code, instead of reading
    their ``weight`` and ``bias`` itself: a hook casts or moves them in the forward (:func:`_hooked`), or one is a
    tensor subclass, a quantized weight (torchao's, say) that only PyTorch's own ops on it understand. Asked on
    every call of a fused block, so it reads the modules' dicts directly (for three LayerNorms 2.4 us a call on one
    Xeon core, against 8 us through ``getattr``)."""
    for module in modules:
        if module is None:
            continue
        if fast_properties.has_own_hook(module):
            return True
        parameters = module._parameters
        for name in ("weight", "bias"):
            tensor = parameters[name] if name in parameters else getattr(module, name, None)
            if tensor is not None and type(tensor) not in PLAIN_TENSOR_TYPES:
                return True
    return False


def _promoted(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a, b`` in their promoted dtype, as ``a + b`` computes (under autocast a product's output and the float32
    residual it is added to can differ)."""
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def _block_is_fusable(block) -> bool:
    """A pre-LayerNorm ``BasicTransformerBlock`` (the spatial transformers' and the motion modules' blocks, with or
    without the sinusoidal positional embedding) with diffusers' ``FeedForward``: what
    :func:`lean_transformer_block_forward` runs."""
    from diffusers.models.attention import FeedForward
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    norms = ["norm1", "norm3"] + (["norm2"] if block.attn2 is not None else [])
    return (block.norm_type == "layer_norm" and all(type(getattr(block, n, None)) is nn.LayerNorm for n in norms)
            and (block.pos_embed is None or type(block.pos_embed) is SinusoidalPositionalEmbedding)
            and type(block.ff) is FeedForward and not hasattr(block, "fuser"))


def _fused_norm_backend(block, x) -> str | None:
    """The backend a block's LayerNorms pass to the fused :func:`animatelcm.ops.residual_layer_norm` for
    ``x [B, N, C]``, or None for PyTorch's ops as diffusers runs them: on the CPU (unless the patch's backend or
    ``ANIMATELCM_BACKEND`` names triton: the interpreter, for the tests; see the README on the C++ kernel there),
    under autocast (which runs LayerNorm in float32) and for norms whose weights only PyTorch's ops understand."""
    backend = getattr(block, PATCH_ATTRIBUTE)["layer_norm"]
    if x.device.type == "cpu" and "triton" not in (backend, forced_backend()):
        return None
    if autocast_dtype(x) is not None or _opaque(block.norm1, block.norm2, block.norm3):
        return None
    return backend


def _pre_norm(norm, x, residual=None, addend=None, backend=None):
    """``norm(x + residual) + addend`` as the block computes it (the addend: its positional embedding ``[1, N, C]``,
    if any), without the module calls, and ``x + residual`` (x itself without a residual): ``(total, normed)``, each
    ``[B, N, C]``. With a ``backend`` (:func:`_fused_norm_backend`) the add, the norm and the positional embedding
    run as one fused op where their dtypes agree (the op's rounding is the op sequence's); otherwise, and for
    anything else, as PyTorch's ops."""
    if (backend is not None and norm.normalized_shape == (x.shape[-1],)
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))
            and (addend is None or (addend.dtype == x.dtype and addend.shape[1] == x.shape[1]))):
        if residual is None:
            return x, ops.layer_norm(x, norm.weight, norm.bias, norm.eps, addend, backend=backend)
        return ops.residual_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, addend, backend=backend)
    total = x if residual is None else x + residual
    normed = F.layer_norm(total, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return total, normed if addend is None else normed + addend


def lean_transformer_block_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                                    encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                                    class_labels=None, added_cond_kwargs=None):
    """``BasicTransformerBlock.forward`` for the blocks of :func:`_block_is_fusable`: ``hidden_states [B, N, C]``
    -> same shape. The same operations in the same order, without diffusers' per-call branches and the module
    calls that do nothing or only one op (the LayerNorms, the positional embeddings, the feed-forward's container and
    its evaluation-mode dropouts): host time that a GPU waits for when the call is host-bound. On a GPU each
    residual add, the LayerNorm after it and the positional embedding run as one fused op (:func:`_pre_norm`).
    Calls with ``cross_attention_kwargs``, chunked feed-forward, another input rank or hooked norms run diffusers'
    forward."""
    if (cross_attention_kwargs or self._chunk_size is not None or hidden_states.dim() != 3
            or _hooked(self.norm1, self.norm2, self.norm3, self.pos_embed, self.ff)):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  encoder_attention_mask, timestep, cross_attention_kwargs, class_labels,
                                  added_cond_kwargs)
    backend = _fused_norm_backend(self, hidden_states)
    positions = None if self.pos_embed is None else self.pos_embed.pe[:, :hidden_states.shape[1]]  # [1, N, C]
    _, normed = _pre_norm(self.norm1, hidden_states, addend=positions, backend=backend)
    attn_output = self.attn1(normed, encoder_hidden_states=encoder_hidden_states if self.only_cross_attention
                             else None, attention_mask=attention_mask)
    if self.attn2 is not None:
        hidden_states, normed = _pre_norm(self.norm2, attn_output, hidden_states, positions, backend)
        attn_output = self.attn2(normed, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=encoder_attention_mask)
    hidden_states, out = _pre_norm(self.norm3, attn_output, hidden_states, backend=backend)
    for layer in self.ff.net:
        if not _identity_dropout(layer):
            out = layer(out)
    return out + hidden_states


def fused_motion_module_forward(self, hidden_states, encoder_hidden_states=None, timestep=None, class_labels=None,
                                num_frames: int = 1, cross_attention_kwargs=None):
    """``AnimateDiffTransformer3D.forward`` with the norm+permute and permute+residual fused:
    ``hidden_states [B*F, C, H, W]`` -> same shape."""
    if _opaque(self.norm):
        return type(self).forward(self, hidden_states, encoder_hidden_states, timestep, class_labels, num_frames,
                                  cross_attention_kwargs)
    backend = getattr(self, PATCH_ATTRIBUTE)
    residual = hidden_states
    hidden_states = ops.temporal_group_norm(hidden_states, num_frames, self.norm.num_groups, self.norm.weight,
                                            self.norm.bias, self.norm.eps,
                                            backend=backend["temporal_group_norm"])  # [B*H*W, F, C]
    hidden_states = self.proj_in(input=hidden_states)
    for block in self.transformer_blocks:
        hidden_states = block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                              timestep=timestep, cross_attention_kwargs=cross_attention_kwargs,
                              class_labels=class_labels)
    hidden_states, residual = _promoted(self.proj_out(input=hidden_states), residual)
    return ops.temporal_unpermute_residual(hidden_states, residual, num_frames,
                                           backend=backend["temporal_unpermute_residual"])


def _group_norm_silu(x, norm, backend):
    """``silu(norm(x))`` on the fused op, for ``x`` in either layout: the VAE decoder's convolutions hand its ResNet
    blocks channels-last activations, which the CPU and Triton kernels read as they are (on an H100 the Triton
    kernel's channels-last GroupNorm+SiLU took a third of PyTorch's GPU time, and the VAE decode alone went from
    0.169 s, with those activations left to PyTorch, to 0.110 s: run 11 in benchmarks/results/gpu_runs.md)."""
    return ops.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                               backend=backend["group_norm_silu"])


def fused_resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """``ResnetBlock2D.forward`` (see :func:`_resnet_is_fusable`) with each GroupNorm+SiLU pair fused:
    ``input_tensor [N, C, H, W]``, ``temb [N, T]`` or None -> ``[N, C_out, H', W']``."""
    norm1, norm2 = self.norm1, self.norm2
    if _opaque(norm1, norm2):
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    backend = getattr(self, PATCH_ATTRIBUTE)
    hidden_states = _group_norm_silu(input_tensor, norm1, backend)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None and self.time_embedding_norm == "default":  # other norms ignore temb (no projection)
        hidden_states = hidden_states + temb
    hidden_states = _group_norm_silu(hidden_states, norm2, backend)
    if not _identity_dropout(self.dropout):
        hidden_states = self.dropout(hidden_states)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    output = _residual_plus_conv(input_tensor, self.conv2, hidden_states)
    return output if self.output_scale_factor == 1 else output / self.output_scale_factor


def _residual_plus_conv(residual, conv, x):
    """``residual + conv(x)``. A float32 CPU inference call on channels-last tensors with a plain ``nn.Conv2d`` runs
    as one oneDNN convolution with the add fused into its output (``torch.ops.mkldnn._convolution_pointwise``, the
    op inductor fuses into; the same sums). Measured on 2 AMD EPYC Zen 4 cores against the two ops: 1.19x and
    1.20x at the VAE decoder's ``[16, 32, 256, 256]`` and ``[16, 64, 128, 128]``, no different on the UNet's
    contiguous ``[16, 80, 32, 32]``, which keeps the two ops."""
    if (is_channels_last(x) and type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not _hooked(conv)
            and not isinstance(conv.padding, str) and x.device.type == "cpu" and x.dtype is torch.float32
            and autocast_dtype(x) is None
            and is_channels_last(residual) and residual.dtype is torch.float32
            and torch.backends.mkldnn.is_available() and plain_inference_call(x, residual, conv.weight, conv.bias)):
        spatial = [(size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for size, pad, dilation, kernel, stride
                   in zip(x.shape[2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride)]
        if tuple(residual.shape) == (x.shape[0], conv.out_channels, *spatial):
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation),
                conv.groups, "add", None, None, [], None)
    return residual + conv(x)


def fused_geglu_forward(self, hidden_states, *args, **kwargs):
    """``GEGLU.forward`` with the split, GELU and product fused: ``[..., D]`` -> ``[..., inner]``. A plain
    ``nn.Linear`` projection runs with it in :func:`animatelcm.ops.linear_geglu` (on the CPU its output, the
    largest activation of the block, is never materialised), its operands in autocast's dtype under autocast, as
    the layer would compute; any other projection (an unfused LoRA layer, one with a hook that casts or moves its
    weights, or quantized weights) runs as it is."""
    backend = getattr(self, PATCH_ATTRIBUTE)
    if type(self.proj) is nn.Linear and not _opaque(self.proj):
        weight, bias = self.proj.weight, self.proj.bias
        autocast = autocast_dtype(hidden_states)
        if autocast is not None:  # the projection's operands as autocast gives them to the nn.Linear replaced here
            hidden_states, weight, bias = (t if t is None or t.dtype is torch.float64 else t.to(autocast)
                                           for t in (hidden_states, weight, bias))
        return ops.linear_geglu(hidden_states, weight, bias, backend=backend["linear_geglu"])
    return ops.geglu(self.proj(hidden_states), backend=backend["geglu"])


def fast_linear_forward(self, input):
    """``nn.Linear.forward`` on :func:`animatelcm.ops.linear`: ``input [..., in]`` -> ``[..., out]``."""
    return ops.linear(input, self.weight, self.bias)


def _is_pointwise_conv(layer) -> bool:
    """A plain (LoRA-free) 1x1 convolution: the same arithmetic as ``nn.Linear`` on channels-last tokens."""
    return (type(layer) is nn.Conv2d and layer.kernel_size == (1, 1) and layer.stride == (1, 1)
            and layer.padding == (0, 0) and layer.dilation == (1, 1) and layer.groups == 1)


def _token_projection(layer, tokens, linear: bool):
    """``layer`` (an ``nn.Linear``-like module, or a plain 1x1 convolution) on ``tokens [..., C]``."""
    return layer(tokens) if linear else ops.linear(tokens, layer.weight.flatten(1), layer.bias)


def _spatial_tokens_fusable(self, layer, x, backend) -> bool:
    return ((self.use_linear_projection or _is_pointwise_conv(layer)) and isinstance(self.norm, nn.GroupNorm)
            and not (backend.name == "auto" and is_channels_last(x)) and not _opaque(self.norm, layer))


def fused_spatial_input(self, hidden_states):
    """``Transformer2DModel._operate_on_continuous_inputs`` with the GroupNorm fused into the permute to tokens
    (:func:`animatelcm.ops.temporal_group_norm` with one frame): ``hidden_states [B, C, H, W]`` ->
    ``(tokens [B, H*W, inner], inner)``. A 1x1-convolution ``proj_in`` runs as the equal matrix product on the
    tokens; a LoRA-wrapped one (or a channels-last input under ``backend="auto"``, or hooked layers) runs
    diffusers' code."""
    backend = getattr(self, PATCH_ATTRIBUTE)
    if not _spatial_tokens_fusable(self, self.proj_in, hidden_states, backend):
        return type(self)._operate_on_continuous_inputs(self, hidden_states)
    batch, channels, height, width = hidden_states.shape
    norm = self.norm
    tokens = ops.temporal_group_norm(hidden_states, 1, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                     backend=backend["temporal_group_norm"])
    tokens = tokens.view(batch, height * width, channels)
    tokens = _token_projection(self.proj_in, tokens, self.use_linear_projection)
    return tokens, tokens.shape[-1]


def fused_spatial_output(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """``Transformer2DModel._get_output_for_continuous_inputs`` with the permute back fused with the residual add
    (:func:`animatelcm.ops.temporal_unpermute_residual` with one frame): ``hidden_states [B, H*W, inner]``,
    ``residual [B, C, H, W]`` -> ``[B, C, H, W]``; ``proj_out`` as in :func:`fused_spatial_input`."""
    backend = getattr(self, PATCH_ATTRIBUTE)
    if not _spatial_tokens_fusable(self, self.proj_out, residual, backend):
        return type(self)._get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height, width,
                                                            inner_dim)
    out, residual = _promoted(_token_projection(self.proj_out, hidden_states, self.use_linear_projection), residual)
    return ops.temporal_unpermute_residual(out.reshape(batch_size * height * width, 1, out.shape[-1]), residual, 1,
                                           backend=backend["temporal_unpermute_residual"])


def _resnet_is_fusable(module) -> bool:
    """GroupNorm + SiLU blocks whose time embedding, if any, is added before norm2 ("default"); the VAE's blocks
    ("group", no time embedding) run the same arithmetic. "scale_shift" modulates after norm2: left alone."""
    return (isinstance(module.norm1, nn.GroupNorm) and isinstance(module.norm2, nn.GroupNorm)
            and isinstance(module.nonlinearity, nn.SiLU)
            and (module.time_embedding_norm == "default" or module.time_emb_proj is None)
            and module.time_embedding_norm != "scale_shift")


@dataclass
class PatchRecord:
    """What patch_pipeline changed, to undo it exactly."""

    backend: str
    options: tuple
    methods: list = field(default_factory=list)        # (module, name, instance attribute it shadowed or None,
                                                       #  what the patch installed)
    processors: list = field(default_factory=list)     # (attention module, original processor)
    schedulers: tuple = ()                             # (the original scheduler, the patch's), when swapped
    classes: list = field(default_factory=list)        # (the pipeline, its class before fast_properties)


def _override(module, name, function, backend, record):
    setattr(module, PATCH_ATTRIBUTE, backend)
    _install(module, name, _bound(function, module), record)


def _bound(function, module):
    """``function`` bound to ``module`` as a picklable callable (a bound method pickles by its name, which the
    module does not have, so ``torch.save`` of a patched model could not be loaded back)."""
    return functools.partial(function, module)


def _install(module, name, replacement, record):
    """Set ``module.name = replacement`` (an instance attribute), remembering what it shadowed."""
    record.methods.append((module, name, vars(module).get(name), replacement))
    setattr(module, name, replacement)


def _runs_a_patch(module) -> bool:
    """Whether ``module`` already runs a patch: another patched pipeline's that shares this model (diffusers'
    ``from_pipe`` shares them), or a patched model's copied with it. Patching it again would stack two patches
    whose undoing in the wrong order breaks both; it is left to the patch it runs."""
    attributes = vars(module)
    forward = attributes.get("forward")
    return (PATCH_ATTRIBUTE in attributes
            or (isinstance(forward, functools.partial)
                and forward.func in (lean_transformer_block_forward, direct_attention_forward))
            or isinstance(forward, GraphedForward))


def _check_patchable(pipe):
    from diffusers.models.unets.unet_motion_model import UNetMotionModel

    unet = getattr(pipe, "unet", None)
    if isinstance(getattr(unet, "_orig_mod", None), UNetMotionModel):
        raise TypeError("patch_pipeline: pipe.unet is already torch.compile'd; patch first, then compile: "
                        "patch_pipeline(pipe); pipe.unet = torch.compile(pipe.unet) (the fused ops trace as custom "
                        "ops)")
    if not isinstance(unet, UNetMotionModel):
        raise TypeError(f"patch_pipeline: expected a pipeline whose unet is a diffusers UNetMotionModel (AnimateDiff "
                        f"pipelines), got {type(unet).__name__}")
    if any(type(m).__name__ == "SplitInferenceModule" for m in unet.modules()):
        raise ValueError("patch_pipeline: FreeNoise split inference (enable_free_noise_split_inference) wraps the "
                         "modules this patch replaces; patch before enabling it is not supported either. Disable "
                         "split inference (plain FreeNoise works) or leave this pipeline unpatched.")


def patch_pipeline(pipe, backend: str = "auto", attention: bool = True, norms: bool = True, scheduler: bool = True,
                   cuda_graph: bool = False, linear: bool = True):
    """Run ``pipe`` (``AnimateDiffPipeline``, ``AnimateDiffVideoToVideoPipeline``, ``AnimateDiffControlNetPipeline``,
    ``AnimateLCMPipeline``, ...) on the fused kernels; returns ``pipe``.

    ``backend`` forces one kernel backend for every patched op that implements it (refused here when this process
    cannot run it at all, and at the call when it cannot run an op's inputs, each error saying why); the ops
    without it, and all of them under ``"auto"``, let the dispatcher pick.
    ``attention`` (temporal attention, and every attention module's direct processor call), ``norms`` (the fused
    normalisation and activation kernels: GroupNorm+SiLU in the ResNet blocks of the UNet and the VAE, the
    motion-module and spatial-transformer norms and permutes, GEGLU) and ``scheduler`` (diffusers' ``LCMScheduler``
    swapped for :class:`animatelcm.LCMScheduler`; that one, or the pipeline's own, draws each next step's noise on a
    background thread) switch the three parts; ``linear`` the ``nn.Linear`` layers' CPU GEMM library (see the
    module docstring; nothing is installed where :func:`animatelcm.ops.cpu_gemm_library` keeps PyTorch's or the
    UNet is not on the CPU). ``cuda_graph`` replays the UNet's forward from a CUDA graph
    captured per input signature (GPU inputs without gradients only; see :mod:`animatelcm.cuda_graphs`). Patching
    again with the same options does nothing; with other options the first patch is undone first. Undo with
    :func:`unpatch_pipeline`.
    """
    from diffusers import LCMScheduler as DiffusersLCMScheduler
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    from .schedulers import LCMScheduler

    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"patch_pipeline: backend={backend!r} is not one of auto, {', '.join(BACKENDS)}")
    unusable = backend != "auto" and ops.backend_report()[backend]
    if unusable:
        raise ops.BackendUnavailableError(f"patch_pipeline: backend={backend!r} cannot run in this process: "
                                          f"{unusable}. Use backend='auto' (usable here: "
                                          f"{', '.join(ops.available_backends())})")
    _check_patchable(pipe)
    options = (backend, attention, norms, scheduler, cuda_graph, linear)
    existing = getattr(pipe, PATCH_ATTRIBUTE, None)
    if existing is not None:
        if existing.options == options:
            return pipe
        unpatch_pipeline(pipe)
    record = PatchRecord(backend=backend, options=options)
    resolved = PatchBackend.resolve(backend)
    onednn_linear = (linear and ops.cpu_gemm_library() == "onednn"
                     and any(p.device.type == "cpu" for p in pipe.unet.parameters()))
    controlnet = getattr(pipe, "controlnet", None)  # a ControlNetModel, SparseControlNetModel or MultiControlNetModel
    denoisers = [pipe.unet] + ([controlnet] if isinstance(controlnet, nn.Module) else [])
    for module in (module for model in denoisers for module in model.modules()):
        # a hooked module's forward is the hook's wrapper: replacing it drops the hook
        if fast_properties.has_own_hook(module) or _runs_a_patch(module):
            continue
        if isinstance(module, AnimateDiffTransformer3D):
            if norms:
                _override(module, "forward", fused_motion_module_forward, resolved, record)
            if attention:
                for block in module.transformer_blocks:
                    for attn in (getattr(block, "attn1", None), getattr(block, "attn2", None)):
                        if (attn is not None and not attn.is_cross_attention
                                and not isinstance(attn.processor, TemporalAttentionProcessor)):
                            record.processors.append((attn, attn.processor))
                            attn.set_processor(TemporalAttentionProcessor(attn.processor, resolved))
        elif norms and isinstance(module, ResnetBlock2D) and _resnet_is_fusable(module):
            _override(module, "forward", fused_resnet_forward, resolved, record)
        elif norms and type(module) is BasicTransformerBlock and _block_is_fusable(module):
            _override(module, "forward", lean_transformer_block_forward, resolved, record)
        elif norms and type(module) is GEGLU:
            _override(module, "forward", fused_geglu_forward, resolved, record)
        elif isinstance(module, Transformer2DModel):
            if norms:
                _override(module, "_operate_on_continuous_inputs", fused_spatial_input, resolved, record)
                _override(module, "_get_output_for_continuous_inputs", fused_spatial_output, resolved, record)
            if attention and backend in ("auto", "cpp"):
                for block in module.transformer_blocks:
                    attn = getattr(block, "attn1", None)
                    if (attn is not None and not attn.is_cross_attention
                            and not isinstance(attn.processor, TemporalAttentionProcessor)):
                        record.processors.append((attn, attn.processor))
                        attn.set_processor(SpatialSelfAttentionProcessor(attn.processor, resolved))
        elif onednn_linear and type(module) is nn.Linear:
            _override(module, "forward", fast_linear_forward, resolved, record)
        elif attention and type(module) is Attention:
            _install(module, "forward", _bound(direct_attention_forward, module), record)
    vae = getattr(pipe, "vae", None)
    for module in vae.modules() if vae is not None else ():  # decode, and encode for video-to-video
        if fast_properties.has_own_hook(module) or _runs_a_patch(module):
            continue
        if norms and isinstance(module, ResnetBlock2D) and _resnet_is_fusable(module):
            _override(module, "forward", fused_resnet_forward, resolved, record)
        elif onednn_linear and type(module) is nn.Linear:
            _override(module, "forward", fast_linear_forward, resolved, record)
        elif attention and type(module) is Attention:
            _install(module, "forward", _bound(direct_attention_forward, module), record)
    fast_properties.install(pipe, record.classes)  # its models get theirs during each call
    if cuda_graph and not _runs_a_patch(pipe.unet):
        _install(pipe.unet, "forward", GraphedForward(pipe.unet, pipe.unet.forward), record)
    if scheduler and type(pipe.scheduler) is DiffusersLCMScheduler:
        original, entry = pipe.scheduler, pipe.config.get("scheduler")
        pipe.scheduler = LCMScheduler.from_config(original.config)
        record.schedulers = (original, pipe.scheduler)
        if entry is not None:  # save_pretrained still records diffusers' class, so the folder loads without animatelcm
            pipe.register_to_config(scheduler=entry)
    if scheduler and isinstance(pipe.scheduler, LCMScheduler):  # the swapped-in one, or the pipeline's own
        _install(pipe.scheduler, "draw_noise_ahead", True, record)
    setattr(pipe, PATCH_ATTRIBUTE, record)
    return pipe


def unpatch_pipeline(pipe):
    """Undo :func:`patch_pipeline`: the original forwards, attention processors, scheduler and classes come back,
    except where something else replaced the patch's since (an offload hook's forward, a processor or scheduler set
    after patching stays); returns ``pipe`` (unchanged if it was not patched)."""
    record = getattr(pipe, PATCH_ATTRIBUTE, None)
    if record is None:
        return pipe
    for module, name, shadowed, installed in reversed(record.methods):
        if vars(module).get(name) is installed:  # else something wrapped it since (an offload hook): leave that
            if shadowed is None:
                delattr(module, name)
            else:
                setattr(module, name, shadowed)
        if hasattr(module, PATCH_ATTRIBUTE):
            delattr(module, PATCH_ATTRIBUTE)
    for attn, processor in record.processors:
        if isinstance(attn.processor, TemporalAttentionProcessor):  # else set since (an IP-Adapter's, say): leave it
            attn.set_processor(processor)
    fast_properties.restore(record.classes)
    if record.schedulers and pipe.scheduler is record.schedulers[1]:  # else the user's choice since: leave it
        pipe.scheduler = record.schedulers[0]
    delattr(pipe, PATCH_ATTRIBUTE)
    return pipe


def is_patched(pipe) -> bool:
    """Whether ``pipe`` currently runs on the patch."""
    return getattr(pipe, PATCH_ATTRIBUTE, None) is not None
