"""Checkpoints: the one weight table, the safetensors reader, Hugging Face loading, Orbax, and placement on meshes."""
