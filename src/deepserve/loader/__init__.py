"""Checkpoint readers: GGUF files and Hugging Face safetensors folders."""
