"""The one manifest of the official MM-FM release (hub model repository ``luo00042/mm-fm``, ~160 GB in all).

``FILES``: every file we use, by role name -> ``path`` in the hub repository (or ``url`` for files the repository
does not hold), ``kind`` (how ``convert`` reads it), ``size`` (bytes) and ``sha256``. Sizes and checksums are not
published with the release card: ``None`` here means "not known in advance"; ``fetch`` then takes the size from the
hub's file metadata and records size, sha256 and the repository commit in ``<dir>/mmfm_release.lock.json`` on the
first verified download (an LFS file's sha256 is checked against the hub's LFS object id), and checks them from
then on. Fill them in here once known and every download is checked against them.

``VARIANTS``: what one sampling setup needs (role -> file key, ``None`` where no file exists) and its conventions
(the official sampling setup: 50-point Euler grid to t = 0.999 with the resolution shift sqrt(768 * 256 / 4096),
AutoGuidance 1.5 with the DiT-S guide, bf16, the RAE ViT-XL decoder, DINOv2-B with registers as the encoder).
Where a fact is not in the release card, the manifest says so (``UNKNOWN``) and ``fetch`` refuses that role.
"""

from __future__ import annotations

import copy
import math
from typing import Any

REPO_ID = "luo00042/mm-fm"
REPO_TYPE = "model"
REVISION = "main"  # no commit is published with the card; the commit downloaded is recorded in the lock file
UNKNOWN = "unknown: not in the release card"
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")


def _f(path: str, kind: str, **kw: Any) -> dict[str, Any]:
    return dict(path=path, kind=kind, size=None, sha256=None, **kw)


FILES: dict[str, dict[str, Any]] = {
    **{f"checkpoints/dinov2-b/{n}": _f(f"checkpoints/dinov2-b/{n}.pt", "ditdh")
       for n in ("uncond-gmm-25k", "uncond-gmm-100k", "mode-gmm-25k", "mode-gmm-100k")},
    **{f"checkpoints/{e}/{n}": _f(f"checkpoints/{e}/{n}.pt", "ditdh")
       for e in ("siglip2-b", "mae-b") for n in ("uncond-gmm-25k", "mode-gmm-25k")},
    **{f"checkpoints/autoguidance/{n}": _f(f"checkpoints/autoguidance/{n}.pt", "ditdh")
       for n in ("dit-s-uncond-gmm-25k", "dit-s-mode-gmm-25k")},
    "gmm/dinov2-b/cls": _f("gmm/dinov2-b/gmm_n8192_diag_k-means++.pkl", "cls_gmm"),
    "gmm/dinov2-b/spatial": _f("gmm/dinov2-b/spatial_gmm_from_cls_n8192_diag_k-means++_flip.pkl", "spatial_gmm"),
    "decoders/dinov2-b": _f("decoders/dinov2-b/ViTXL_n08/model.pt", "decoder"),
    "normalization_stats/dinov2-b": _f("normalization_stats/dinov2-b/stat.pt", "stats"),
    "fid_reference": _f("fid_reference/VIRTUAL_imagenet256_labeled.npz", "fid_reference"),
    # not in the release repository: pytorch-fid's FID Inception weights (its GitHub release)
    "inception": _f("inception/pt_inception-2015-12-05-6726825d.pth", "inception", url=INCEPTION_URL),
}

_DINOV2 = dict(encoder="facebook/dinov2-with-registers-base", encoder_preset="base", image_size=224, crop_size=256,
               latent_grid=16, latent_channels=768, num_modes=8192, decoder_preset="XL", stats_use_mean=True,
               num_points=50, t_end=0.999, shift=math.sqrt(768 * 16 * 16 / 4096), dtype="bfloat16",
               guide_scale=1.5, guide_t_min=0.0, guide_t_max=1.0, fid="FID-50K (ADM evaluator)")


def _variant(enc: str, name: str, fid: float | None, fid_ag: float | None) -> dict[str, Any]:
    mode = name.startswith("mode")
    known = enc == "dinov2-b"
    roles = {
        "model": f"checkpoints/{enc}/{name}",
        "guide": f"checkpoints/autoguidance/dit-s-{'mode' if mode else 'uncond'}-gmm-25k" if known else None,
        "cls_gmm": f"gmm/{enc}/cls" if known else UNKNOWN,
        "spatial_gmm": f"gmm/{enc}/spatial" if known else UNKNOWN,
        "decoder": f"decoders/{enc}" if known else UNKNOWN,
        "stats": f"normalization_stats/{enc}" if known else UNKNOWN,
        "fid_reference": "fid_reference",
        "inception": "inception",
    }
    conv = dict(_DINOV2, use_y_conditioning=mode, released_fid=fid, released_fid_guided=fid_ag)
    if not known:
        conv.update(encoder=UNKNOWN, encoder_preset=UNKNOWN)
    return dict(encoder_key=enc, roles=roles, conventions=conv)


VARIANTS: dict[str, dict[str, Any]] = {
    "dinov2-b/uncond-gmm-25k": _variant("dinov2-b", "uncond-gmm-25k", 4.84, 4.03),
    "dinov2-b/uncond-gmm-100k": _variant("dinov2-b", "uncond-gmm-100k", 3.84, 3.17),
    "dinov2-b/mode-gmm-25k": _variant("dinov2-b", "mode-gmm-25k", 4.77, 4.07),
    "dinov2-b/mode-gmm-100k": _variant("dinov2-b", "mode-gmm-100k", 3.20, 2.78),
    "siglip2-b/uncond-gmm-25k": _variant("siglip2-b", "uncond-gmm-25k", 8.23, None),
    "siglip2-b/mode-gmm-25k": _variant("siglip2-b", "mode-gmm-25k", 7.25, None),
    "mae-b/uncond-gmm-25k": _variant("mae-b", "uncond-gmm-25k", 17.03, None),
    "mae-b/mode-gmm-25k": _variant("mae-b", "mode-gmm-25k", 16.24, None),
}


class ManifestError(ValueError):
    """An unknown variant, or a role whose file the release card does not name."""


def variant(name: str) -> dict[str, Any]:
    """A deep copy of ``VARIANTS[name]`` (``ManifestError`` listing the variants if unknown)."""
    if name not in VARIANTS:
        raise ManifestError(f"unknown release variant {name!r}; variants: {', '.join(VARIANTS)}")
    return copy.deepcopy(VARIANTS[name])


def files_for(name: str, guide: bool = True, evaluation: bool = True) -> dict[str, str]:
    """role -> file key of what variant ``name`` needs (``guide``: the AutoGuidance guide; ``evaluation``: the FID
    reference batch and the Inception weights). ``ManifestError`` naming the roles the card does not give."""
    roles = variant(name)["roles"]
    want = {r: k for r, k in roles.items() if k is not None and (guide or r != "guide")
            and (evaluation or r not in ("fid_reference", "inception"))}
    missing = sorted(r for r, k in want.items() if k == UNKNOWN)
    if missing:
        raise ManifestError(f"release variant {name!r}: the release card does not name the file(s) for "
                            f"{', '.join(missing)}; only the dinov2-b variants are complete")
    return want
