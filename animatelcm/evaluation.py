"""Evaluation in the miniature world (issue 6): a small video network trained on real moving-shapes clips to
recognise colour, shape and direction, whose features give an FVD analogue (Frechet distance between real and
generated clips) and whose accuracy on the prompted attributes gives a CLIPSIM analogue; plus teacher fidelity
(MSE to a reference sample from the same noise).

Clips are ``[B, F, 3, H, W]`` floats in [-1, 1] (the datasets' ``pixel_values`` layout).
"""

from __future__ import annotations

import torch
from torch import nn

from .training.synthetic import COLOURS, DIRECTIONS, SHAPES

ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "direction": DIRECTIONS}


class AttributeNet(nn.Module):
    """Spatio-temporal conv net: ``forward(clips [B, F, 3, H, W]) -> {attribute: logits [B, n]}``;
    ``features(clips) -> [B, feature_dim]`` (the FVD-analogue embedding)."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(block(3, width, (1, 2, 2)), block(width, width, (2, 2, 2)),
                                  block(width, 2 * width, (2, 2, 2)), block(2 * width, 2 * width, (1, 2, 2)))
        self.project = nn.Linear(2 * width, feature_dim)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.dim() != 5 or clips.shape[2] != 3:
            raise ValueError(f"AttributeNet expects clips [B, F, 3, H, W], got {tuple(clips.shape)}")
        x = self.body(clips.permute(0, 2, 1, 3, 4).float())
        return self.project(x.mean(dim=(2, 3, 4)))

    def forward(self, clips: torch.Tensor) -> dict:
        features = torch.nn.functional.silu(self.features(clips))
        return {name: head(features) for name, head in self.heads.items()}


def attribute_labels(dataset, indices) -> dict:
    """``{attribute: int64 [len(indices)]}`` for clips of a :class:`MovingShapes` dataset."""
    triples = [dataset.attributes(i) for i in indices]
    return {name: torch.tensor([ATTRIBUTES[name].index(t[k]) for t in triples])
            for k, name in enumerate(ATTRIBUTES)}


def train_attribute_net(dataset, steps: int = 300, batch_size: int = 16, learning_rate: float = 2e-3,
                        seed: int = 0, progress: bool = True) -> AttributeNet:
    """Train an :class:`AttributeNet` on clips of ``dataset`` (a MovingShapes) with cross-entropy on the three
    attributes."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    net = AttributeNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="attribute net", disable=not progress):
        indices = torch.randint(0, len(dataset), (batch_size,), generator=generator).tolist()
        clips = torch.stack([dataset[i]["pixel_values"] for i in indices])
        labels = attribute_labels(dataset, indices)
        logits = net(clips)
        loss = sum(nn.functional.cross_entropy(logits[name], labels[name]) for name in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def attribute_accuracy(net: AttributeNet, clips: torch.Tensor, labels: dict, batch_size: int = 32) -> dict:
    """Fraction of ``clips`` whose predicted attribute equals ``labels[attribute]`` (int64 ``[B]``), per attribute
    given; the CLIPSIM analogue when ``labels`` are the prompted attributes of generated clips."""
    predictions = {name: [] for name in labels}
    for part in clips.split(batch_size):
        logits = net(part)
        for name in labels:
            predictions[name].append(logits[name].argmax(dim=1))
    return {name: (torch.cat(predictions[name]) == labels[name]).float().mean().item() for name in labels}


@torch.no_grad()
def clip_features(net: AttributeNet, clips: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``[B, feature_dim]`` float64 features of ``clips``."""
    return torch.cat([net.features(part).double() for part in clips.split(batch_size)])


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` (FVD's formula), in float64."""
    if features_a.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with one D; got {tuple(features_a.shape)} and "
                         f"{tuple(features_b.shape)}")
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)

    def sqrt_psd(matrix):
        values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
        return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T

    root_a = sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def teacher_fidelity(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error between samples and the teacher's reference samples from the same noise."""
    if samples.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(samples.shape)} vs {tuple(reference.shape)}")
    return float((samples.float() - reference.float()).pow(2).mean())
