"""Models in Flax NNX.

``layers`` (shared transformer building blocks), ``ditdh`` (the DiTDH flow model), ``gm_head`` (GMFlow's output
head), ``mlp`` (a small MLP velocity field), the encoders ``dinov2``, ``siglip``, ``mae`` (with ``vit_encoder``)
and ``encoders`` (the encoders by name), ``decoder`` (the RAE pixel decoder), ``inception`` (FID Inception-v3).
"""
