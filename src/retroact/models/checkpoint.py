"""The on-disk checkpoint layout shared by IL, RL and :class:`~retroact.models.hf.HFPolicy`.

::

    CKPT/retroact.json   manifest (below)
    CKPT/<role dir>/     a PEFT adapter (``lora``) or a full model (``full``), via save_pretrained
    CKPT/tokenizer/      the tokenizer

Roles map to directories; the shared-model ablation maps both roles to one directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from retroact.models.base import ROLES, Role

MANIFEST = "retroact.json"


class CheckpointManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    base_model: str
    """Path (or hub name) of the frozen base model the adapters sit on."""
    finetune: Literal["lora", "full"]
    roles: dict[Literal["planner", "reflector"], str]
    """Role -> directory name inside the checkpoint."""
    version: int = 0
    """Adapter version: 0 after IL, +1 per RL iteration."""
    stage: str = "il"

    @property
    def missing_roles(self) -> list[Role]:
        """Roles without a directory (``retroact il`` with ``roles: [planner]`` writes such checkpoints)."""
        return [r for r in ROLES if r not in self.roles]


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_manifest(path: str | Path) -> CheckpointManifest:
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a RetroAct checkpoint (no {MANIFEST})")
    try:
        return CheckpointManifest.model_validate_json(file.read_text(encoding="utf-8"))
    except ValidationError as err:
        raise ValueError(f"{file}: invalid checkpoint manifest: {err}") from None


def save_manifest(path: str | Path, manifest: CheckpointManifest) -> None:
    file = Path(path) / MANIFEST
    tmp = file.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, file)


def replace_dir(staging: Path, final: Path) -> None:
    """Move a fully written ``staging`` directory to ``final``; a kill leaves one of the two whole."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)
