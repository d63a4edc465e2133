"""fetch-release from a local fake hub through huggingface_hub's real code paths (metadata, resumed transfer,
checks, lock file), convert with a fake torch (no torch installed), then Pipeline.from_release samples without torch.

The variant is a small stand-in registered in the manifest: the official key names and formats with the small
parity fixtures' weights (tests/fixtures/ditdh_small.npz, rae_decoder_small.npz), sklearn GMM pickles."""

import hashlib
import json
import pickle
import sys
import types

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

from mmfm_jax.cli import run
from mmfm_jax.release import manifest
from mmfm_jax.release.fetch import LOCK_FILE, ReleaseError, fetch_release

REPO = "someone/mm-fm-test"
VARIANT = "tiny/mode-gmm"
K, C, G = 4, 32, 16


class FakeTensor:
    def __init__(self, a):
        self.a, self.dtype = np.asarray(a), "float32"

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.a


def fake_torch(payloads):
    """A ``torch`` stand-in whose ``load`` returns the payload registered for the file's name."""
    import contextlib

    torch = types.ModuleType("torch")
    torch.Tensor, torch.bfloat16 = FakeTensor, "bfloat16"
    torch.load = lambda path, map_location=None, weights_only=None: payloads[str(path).rsplit("/", 1)[-1]]
    torch.serialization = types.SimpleNamespace(safe_globals=lambda globs: contextlib.nullcontext())
    return torch


def _tensors(npz, prefix):
    return {k[len(prefix):]: FakeTensor(npz[k]) for k in npz.files if k.startswith(prefix)}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, fixtures_dir):
    """The fake hub's files, the torch payloads of its .pt files, and the manifest entries of the test variant."""
    root = tmp_path_factory.mktemp("hub")
    d = np.load(fixtures_dir / "ditdh_small.npz")
    dec = np.load(fixtures_dir / "rae_decoder_small.npz")
    payloads = {"mode.pt": {"ema": _tensors(d, "param/"), "model": {}},
                "guide.pt": {"ema": _tensors(d, "param_guide/")},
                "model.pt": _tensors(dec, "param/"),
                "stat.pt": {"mean": None, "var": FakeTensor(dec["input/latent_var"])},
                "pt_inception.pth": {}}
    r = np.random.default_rng(0)
    x = r.normal(size=(40, 8))
    gm = GaussianMixture(K, covariance_type="diag", max_iter=200, random_state=0).fit(x)
    files = {
        "checkpoints/tiny/mode.pt": b"main" * 100, "checkpoints/autoguidance/guide.pt": b"guide" * 50,
        "decoders/tiny/model.pt": b"decoder" * 30, "normalization_stats/tiny/stat.pt": b"stat" * 10,
        "gmm/tiny/cls.pkl": pickle.dumps({"model": gm, "labels": gm.predict(x)}),
        "gmm/tiny/spatial.pkl": pickle.dumps({"means": r.normal(size=(K, C * G * G)), "variances": np.full(K, 0.5),
                                              "weights": gm.weights_}),
        "fid_reference/ref.npz": b"ref" * 20, "elsewhere/pt_inception.pth": b"inception" * 20,
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    entries = {"checkpoints/tiny/mode-gmm": ("checkpoints/tiny/mode.pt", "ditdh"),
               "checkpoints/autoguidance/dit-s-mode-tiny": ("checkpoints/autoguidance/guide.pt", "ditdh"),
               "gmm/tiny/cls": ("gmm/tiny/cls.pkl", "cls_gmm"), "gmm/tiny/spatial": ("gmm/tiny/spatial.pkl",
                                                                                     "spatial_gmm"),
               "decoders/tiny": ("decoders/tiny/model.pt", "decoder"),
               "normalization_stats/tiny": ("normalization_stats/tiny/stat.pt", "stats"),
               "fid_reference/tiny": ("fid_reference/ref.npz", "fid_reference"),
               "inception/tiny": ("inception/pt_inception.pth", "inception")}
    roles = dict(model="checkpoints/tiny/mode-gmm", guide="checkpoints/autoguidance/dit-s-mode-tiny",
                 cls_gmm="gmm/tiny/cls", spatial_gmm="gmm/tiny/spatial", decoder="decoders/tiny",
                 stats="normalization_stats/tiny", fid_reference="fid_reference/tiny", inception="inception/tiny")
    conv = dict(manifest.VARIANTS["dinov2-b/mode-gmm-100k"]["conventions"], latent_grid=G, latent_channels=C,
                num_modes=16, decoder_preset="parity", shift=1.0, dtype="float32", encoder=None)
    return dict(root=root, files=files, payloads=payloads, entries=entries,
                variant=dict(encoder_key="tiny", roles=roles, conventions=conv))


@pytest.fixture
def registered(hub, monkeypatch):
    from fake_hub import FakeHub

    with FakeHub(hub["root"], REPO, cut_once=("checkpoints/tiny/mode.pt",)) as fake:
        for key, (path, kind) in hub["entries"].items():
            e = dict(path=path, kind=kind, size=None, sha256=None)
            if kind == "inception":
                e["url"] = f"{fake.endpoint}/files/elsewhere/pt_inception.pth"
            monkeypatch.setitem(manifest.FILES, key, e)
        monkeypatch.setitem(manifest.VARIANTS, VARIANT, hub["variant"])
        yield fake


def test_fetch_resumes_verifies_and_records(hub, registered, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64)  # stream small files in pieces
    fake, out = registered, tmp_path / "artifacts"
    # an earlier run was killed while downloading the Inception weights (not on the hub: a plain URL)
    (out / "inception").mkdir(parents=True)
    (out / "inception" / "pt_inception.pth.incomplete").write_bytes(hub["files"]["elsewhere/pt_inception.pth"][:50])
    with pytest.raises(SystemExit) as e:  # the command line
        run(["mmfm-jax", "fetch-release", f"--variant={VARIANT}", f"--dir={out}", f"--repo={REPO}",
             f"--endpoint={fake.endpoint}", "--dry-run"])
    assert e.value.code == 0 and not out.joinpath("checkpoints").exists()
    dry = fetch_release(VARIANT, out, repo_id=REPO, endpoint=fake.endpoint, dry_run=True)
    assert dry["files"]["model"]["size"] == 400 and dry["files"]["model"]["status"] == "to download"
    s = fetch_release(VARIANT, out, repo_id=REPO, endpoint=fake.endpoint)
    assert {v["status"] for v in s["files"].values()} == {"downloaded"} and len(s["files"]) == 8
    for role, key in hub["variant"]["roles"].items():
        rel = manifest.FILES[key]["path"]
        src = "elsewhere/pt_inception.pth" if role == "inception" else rel
        assert (out / rel).read_bytes() == hub["files"][src]
    lock = json.loads((out / LOCK_FILE).read_text())
    rec = lock["files"]["checkpoints/tiny/mode.pt"]
    assert rec["sha256"] == hashlib.sha256(hub["files"]["checkpoints/tiny/mode.pt"]).hexdigest()
    assert rec["size"] == 400 and len(rec["commit"]) == 40 and lock["repo_id"] == REPO
    # the transfer cut in the middle and the killed one were resumed with range requests, not restarted
    ranged = {(p, r) for m, p, r in fake.requests if m == "GET" and r}
    assert ranged == {("checkpoints/tiny/mode.pt", "bytes=192-"), ("elsewhere/pt_inception.pth", "bytes=50-")}
    # a second run finds everything present: no request at all
    n = len(fake.requests)
    again = fetch_release(VARIANT, out, repo_id=REPO, endpoint=fake.endpoint)
    assert {v["status"] for v in again["files"].values()} == {"present"} and len(fake.requests) == n
    # a damaged file of the same size is caught by verify=True and moved aside
    (out / "decoders/tiny/model.pt").write_bytes(b"x" * 210)
    with pytest.raises(ReleaseError, match="sha256"):
        fetch_release(VARIANT, out, repo_id=REPO, endpoint=fake.endpoint, verify=True)
    assert (out / "decoders/tiny/model.pt.bad").exists()
    s = fetch_release(VARIANT, out, repo_id=REPO, endpoint=fake.endpoint, verify=True)
    assert s["files"]["decoder"]["status"] == "downloaded"
    assert (out / "decoders/tiny/model.pt").read_bytes() == hub["files"]["decoders/tiny/model.pt"]
    with pytest.raises(manifest.ManifestError, match="does not name"):
        fetch_release("mae-b/mode-gmm-25k", out)


def test_convert_then_sample_without_torch(hub, registered, tmp_path, monkeypatch):
    import jax.numpy as jnp
    from flax import nnx

    from mmfm_jax.api import Pipeline
    from mmfm_jax.data.preprocess import mmfm_pixels
    from mmfm_jax.models.dinov2 import Dinov2, Dinov2Config, encode_mmfm
    from mmfm_jax.release.convert import convert_release

    out = tmp_path / "artifacts"
    fetch_release(VARIANT, out, repo_id=REPO, endpoint=registered.endpoint, evaluation=False)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(hub["payloads"]))
    with pytest.raises(SystemExit) as e:
        run(["mmfm-jax", "convert", f"--variant={VARIANT}", f"--dir={out}", "--no-eval"])
    assert e.value.code == 0
    desc = json.loads((out / "converted" / VARIANT / "pipeline.json").read_text())
    assert set(desc["files"]) == {"model", "guide", "decoder", "stats", "source"}
    assert (out / "converted" / desc["files"]["model"]).suffix == ".safetensors"
    assert convert_release(VARIANT, out, evaluation=False)["converted"] == []  # once
    # a hub repository id: fetched and converted into $MMFM_CACHE first
    monkeypatch.setenv("MMFM_CACHE", str(tmp_path / "cache"))
    bare = Pipeline.from_release(REPO, variant=VARIANT, guide=False, decoder=False, endpoint=registered.endpoint)
    assert bare.guide is None and bare.decoder is None and bare.main[2].use_y_conditioning
    assert (tmp_path / "cache" / "someone--mm-fm-test" / "converted" / VARIANT / "pipeline.json").exists()
    with pytest.raises(ValueError, match="no encoder"):
        bare.encode(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="neither a folder nor a hub repository"):
        Pipeline.from_release(str(tmp_path / "missing"), variant=VARIANT)

    monkeypatch.setitem(sys.modules, "torch", None)  # from here on, `import torch` fails
    enc = Dinov2(Dinov2Config.preset("fixture_small", hidden_size=C), rngs=nnx.Rngs(0))
    enc.precompute_pos_embed(224)
    pipe = Pipeline.from_release(out, variant=VARIANT, encoder=enc)
    assert pipe.main[2].use_y_conditioning and pipe.guide is not None and pipe.source.n_modes == K
    img, modes = pipe.sample(4, seed=0, steps=3, return_modes=True)
    assert img.shape == (4, 64, 64, 3) and img.dtype == np.uint8 and set(modes.tolist()) <= set(range(K))
    plain = pipe.sample(4, seed=0, steps=3, guidance=1.0)
    assert not np.array_equal(img, plain)  # guidance 1.5 (the release's) differs from none
    crops = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    z = pipe.encode(crops)  # resized to 224, DINOv2, normalised by the release's statistics
    want = encode_mmfm(enc, mmfm_pixels(jnp.asarray(crops), 224), pipe.var, pipe.mean)[0]
    assert z.shape == (2, G * G, C)
    np.testing.assert_allclose(z, np.asarray(want), rtol=1e-5, atol=1e-5)
    assert pipe.decode(z).shape == (2, 64, 64, 3) and pipe.decode(z).dtype == np.uint8
