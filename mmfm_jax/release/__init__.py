"""The official MM-FM release: its manifest, ``fetch`` (huggingface_hub) and ``convert`` (to torch-free formats)."""
