"""Export the default GGUF as a Hugging Face checkpoint directory, for peers that read
no GGUF (vLLM 0.32's CPU build): config.json, tokenizer files and model.safetensors
with the file's weights dequantized to float32 by transformers (the same values every
system serves; the tied output head is left to ``tie_word_embeddings``).

    .venv/bin/python benchmarks/export_hf.py build/smollm2-hf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deepserve.loader.resolve import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default=None, help="a GGUF path (default: the packaged one)")
    args = ap.parse_args()
    gguf = Path(resolve_model(args.model)[0])
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    # the exported weights are plain tensors: drop the note that they came from a GGUF
    cfg_path = args.out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, args.out / "model.safetensors", metadata={"format": "pt"})
    print(f"wrote {args.out}: {len(state)} tensors from {gguf.name}")


if __name__ == "__main__":
    main()
