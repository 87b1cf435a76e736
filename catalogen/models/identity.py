"""What a resolved model is, and the error of one that is missing.

Apart from catalogen.models (which finds, checks and caches models) because every resolver needs
them, catalogen.models.rembg included: it would otherwise import the module that calls it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelIdentity:
    repo: str  # as configured
    revision: str  # the Hub commit, or "sha256:…" of a local folder's files
    path: str  # the local folder the weights load from
    kind: str
    variant: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def short(self) -> str:
        return f"{self.repo}@{self.revision.removeprefix('sha256:')[:12]}"


class MissingModelsError(RuntimeError):
    """Models that are not on this machine while the Hub may not be contacted."""

    def __init__(self, missing: list[str]):
        self.missing = missing
        listed = "\n".join(f"  - {m}" for m in missing)
        super().__init__(
            f"{len(missing)} model(s) missing from the local cache and the Hub is off limits "
            f"(offline mode):\n{listed}\nDownload them first with `catalogen models prepare` on a "
            "machine that can reach the Hub, or unset HF_HUB_OFFLINE."
        )
