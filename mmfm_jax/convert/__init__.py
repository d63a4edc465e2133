"""Checkpoint converters: official and hub weights -> our parameters, with strict key and shape checks.

``ditdh`` (``load_official_ditdh``, ``convert_ditdh_state_dict``), ``decoder`` (``load_decoder``), ``encoders``
(``load_encoder`` for any MM-FM encoder), ``dinov2`` / ``siglip`` / ``mae`` (``load_dinov2``, ``load_siglip``,
``load_mae`` from hub safetensors, no torch), ``inception`` (``load_inception``); shared: ``common`` (state-dict
reading, ``KeyTracker``), ``hf_vit`` (hub directory resolution, safetensors).
"""
