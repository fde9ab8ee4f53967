"""Read a Hugging Face model folder: config.json and *.safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from deepserve.errors import ModelLoadError
from deepserve.models.config import ModelConfig


class HFCheckpoint:
    """A local transformers-style folder (config.json, one or more .safetensors files)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.raw_config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path / 'config.json'}: cannot be read as JSON ({exc})") \
                from exc
        self.files = sorted(path.glob("*.safetensors"))
        if not self.files:
            raise ModelLoadError(f"{path}: no *.safetensors files; deepserve loads "
                                 "safetensors weights (convert .bin with transformers' "
                                 "save_pretrained(safe_serialization=True))")

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf_config(self.raw_config, str(self.path / "config.json"))

    def __len__(self) -> int:
        from safetensors import safe_open

        count = 0
        for f in self.files:
            with safe_open(str(f), framework="pt") as st:
                count += len(list(st.keys()))
        return count

    def tensors(self, config: ModelConfig, skip: frozenset[str] = frozenset(),
                layers: range | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor (with ``layers``, of those layers only,
        besides the model-wide tensors)."""
        from safetensors import safe_open

        for f in self.files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118
                    if layers is not None and name.startswith("model.layers.") and \
                            int(name.split(".", 3)[2]) not in layers:
                        continue
                    yield name, st.get_tensor(name)
