"""The LAION aesthetic predictor v2 head: an MLP over an L2-normalised CLIP image embedding.

The published model (christophschuhmann/improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE`)
is `Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16),
Linear(16, 1)` with no activations, over CLIP ViT-L/14's image embedding divided by its L2 norm; its
output is a rating on the AVA scale (about 1 to 10). Its layers keep the original's names
(`layers.0`, `layers.2`, `layers.4`, `layers.6`, `layers.7`), so its state dict loads as saved.

The weights load from a safetensors file only (the original is a pickle: see README, "score"). Their
sizes are read from the file, so the tiny profile's head (32-dim input, see
catalogen/models/tiny/vision.py) loads through the same code.

May import: catalogen.models.loading (the cache) and below; no stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from catalogen.models.loading import ModelIdentity, cached

KIND = "aesthetic"
# Positions of the Linear layers in the original nn.Sequential (Dropouts sit at 1, 3 and 5).
LINEAR_AT = (0, 2, 4, 6, 7)
_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}
PREFIX = "layers."


class AestheticHead(torch.nn.Module):
    """The predictor's MLP; `sizes` are the widths from input to output, e.g. (768, 1024, 128, 64, 16, 1)."""

    def __init__(self, sizes: tuple[int, ...]):
        super().__init__()
        if len(sizes) != len(LINEAR_AT) + 1 or sizes[-1] != 1:
            raise ValueError(f"an aesthetic head has {len(LINEAR_AT)} linear layers ending in 1 output; got {sizes}")
        modules: list[torch.nn.Module] = []
        widths = iter(zip(sizes, sizes[1:]))
        for position in range(LINEAR_AT[-1] + 1):
            if position in _DROPOUTS:
                modules.append(torch.nn.Dropout(_DROPOUTS[position]))
            else:
                modules.append(torch.nn.Linear(*next(widths)))
        self.layers = torch.nn.Sequential(*modules)

    @property
    def input_size(self) -> int:
        return self.layers[0].in_features

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Scores of L2-normalised embeddings (batch, input_size) -> (batch,)."""
        return self.layers(embedding).squeeze(-1)


def sizes_of(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """The layer widths a state dict holds (its `layers.N.weight` shapes), checked to chain."""
    shapes = []
    for position in LINEAR_AT:
        weight = state.get(f"{PREFIX}{position}.weight")
        if weight is None or weight.ndim != 2:
            raise ValueError(f"not an aesthetic head: no 2-d {PREFIX}{position}.weight among {sorted(state)[:8]}")
        shapes.append(tuple(weight.shape))
    for (out_size, _), (_, next_in) in zip(shapes, shapes[1:]):
        if out_size != next_in:
            raise ValueError(f"not an aesthetic head: layer widths do not chain ({shapes})")
    return (shapes[0][1], *(out_size for out_size, _ in shapes))


def weights_file(path: str | Path) -> Path:
    """The head's safetensors file: the path itself, or the one .safetensors file in the folder."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.rglob("*.safetensors"))
    if len(found) != 1:
        raise ValueError(f"expected one .safetensors file for the aesthetic head in {path}, found {len(found)}")
    return found[0]


def head_from_file(path: str | Path) -> AestheticHead:
    """An `AestheticHead` with the weights of a safetensors file (never a pickle), in eval mode."""
    from safetensors.torch import load_file

    state = load_file(str(weights_file(path)))
    state = {key[key.index(PREFIX):]: value for key, value in state.items() if PREFIX in key}
    head = AestheticHead(sizes_of(state))
    head.load_state_dict(state, strict=True)
    return head.float().eval()


def load_head(identity: ModelIdentity, device: str, budget_gb: float | None = None) -> AestheticHead:
    """The head on `device`, in float32 whatever the run's dtype (it is 1 M weights), once per process."""

    def build() -> AestheticHead:
        return head_from_file(identity.path).to(device)

    return cached((KIND, identity.repo, identity.revision, device, "float32"), device, build, budget_gb)
