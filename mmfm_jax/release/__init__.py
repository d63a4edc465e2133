"""The official MM-FM release: its manifest, ``fetch`` (huggingface_hub) and ``convert`` (to torch-free formats).

``manifest`` (``variant``, ``files_for``), ``fetch`` (``fetch_release``), ``convert`` (``convert_release``,
``converted_dir``); the CLI runs them as ``mmfm-jax fetch-release`` and ``mmfm-jax convert``.
"""
