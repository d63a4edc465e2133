"""Reading torch ``.pt`` files without torch: a fake ``torch`` module checks the weights_only / allowlist /
trust_pickle logic, the state-dict selection and the error messages (the real-torch check is launch/verify_torch_pt.py).
"""

import argparse
import contextlib
import pickle
import sys
import types

import numpy as np
import pytest

from mmfm_jax.convert.common import load_state_dict, select_state_dict
from mmfm_jax.data.stats import load_stats
from mmfm_jax.torch_io import TRUST_PICKLE_ENV, CheckpointError, torch_load, trust_pickle_from_env


class FakeTensor:
    def __init__(self, a, dtype="float32"):
        self.a, self.dtype = np.asarray(a), dtype

    def detach(self):
        return self

    def cpu(self):
        return self

    def float(self):
        return FakeTensor(self.a.astype(np.float32))

    def numpy(self):
        if self.dtype == "bfloat16":
            raise TypeError("Got unsupported ScalarType BFloat16")
        return self.a


def refusal(name):
    return pickle.UnpicklingError(
        "Weights only load failed. This file can still be loaded, to do so you have two options...\n\tWeightsUnpickler "
        f"error: Unsupported global: GLOBAL {name} was not an allowed global by default. Please use ...")


def fake_torch(payload, needs=(), safe_globals=True, scan=False, error=None):
    """A ``torch`` stand-in whose ``load`` refuses, under weights_only, every global in ``needs`` not allowlisted."""
    torch = types.ModuleType("torch")
    torch.Tensor, torch.bfloat16, torch.calls, allowed = FakeTensor, "bfloat16", [], []

    @contextlib.contextmanager
    def safe(globs):
        allowed.extend(f"{g.__module__}.{g.__qualname__}" for g in globs)
        yield
        del allowed[:]

    def load(path, map_location=None, weights_only=None):
        torch.calls.append(dict(path=path, map_location=map_location, weights_only=weights_only, allowed=list(allowed)))
        if error is not None:
            raise error
        missing = [n for n in needs if n not in allowed]
        if weights_only and missing:
            raise refusal(missing[0])
        return payload

    torch.load = load
    torch.serialization = types.SimpleNamespace()
    if safe_globals:
        torch.serialization.safe_globals = safe
    if scan:
        torch.serialization.get_unsafe_globals_in_checkpoint = lambda path: list(needs)
    return torch


@pytest.fixture
def pt(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"not read by the fake torch")

    def install(*args, **kwargs):
        torch = fake_torch(*args, **kwargs)
        monkeypatch.setitem(sys.modules, "torch", torch)
        return path, torch

    return install


def training_checkpoint():
    return {"model": {"w": FakeTensor(np.zeros((2, 3), np.float32))},
            "ema": {"w": FakeTensor(np.arange(6, dtype=np.float32).reshape(2, 3)), "b": FakeTensor([1.5], "bfloat16")},
            "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "args": argparse.Namespace(model="DiTDH-XL", lr=1e-4), "step": 5}


def test_pt_without_torch_names_torch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    for name in ("ckpt.pt", "pt_inception.pth", "stat.pt"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"ckpt\.pt needs torch"):
        load_state_dict(tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"pt_inception\.pth needs torch"):
        load_state_dict(tmp_path / "pt_inception.pth", prefer_ema=False)
    with pytest.raises(CheckpointError, match=r"stat\.pt needs torch"):
        load_stats(tmp_path / "stat.pt")


@pytest.mark.parametrize("value, want", [(None, False), ("", False), ("0", False), ("false", False), (" Off ", False),
                                         ("no", False), ("1", True), ("true", True), ("YES", True), ("on", True)])
def test_trust_pickle_env(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    else:
        monkeypatch.setenv(TRUST_PICKLE_ENV, value)
    assert trust_pickle_from_env() is want


def test_trust_pickle_env_rejects_other_values(monkeypatch):
    monkeypatch.setenv(TRUST_PICKLE_ENV, "maybe")
    with pytest.raises(CheckpointError, match="MMFM_TRUST_PICKLE='maybe'"):
        trust_pickle_from_env()


def test_namespace_allowlisted_in_one_read_and_ema_selected(pt):
    path, torch = pt(training_checkpoint(), needs=["argparse.Namespace"])
    sd = load_state_dict(path)
    assert sorted(sd) == ["b", "w"]
    np.testing.assert_array_equal(sd["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert sd["b"].dtype == np.float32 and sd["b"].tolist() == [1.5]  # bf16 -> float32
    assert [(c["weights_only"], c["allowed"], c["map_location"]) for c in torch.calls] == [
        (True, ["argparse.Namespace"], "cpu")]  # one read (an XL training checkpoint is ~13 GB)
    # no ema: model; prefer_ema=False: model even when ema is there
    ck = training_checkpoint()
    assert load_state_dict(path, prefer_ema=False)["w"].sum() == 0
    del ck["ema"]
    pt(ck, needs=["argparse.Namespace"])
    assert load_state_dict(path)["w"].sum() == 0


def test_other_global_refused_with_trust_pickle_hint(pt):
    ck = {**training_checkpoint(), "extra": object()}
    path, torch = pt(ck, needs=["argparse.Namespace", "mypkg.Custom"])
    with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
    msg = str(e.value)
    assert str(path) in msg and "mypkg.Custom" in msg and "argparse.Namespace" not in msg
    assert "trust_pickle=True" in msg and "MMFM_TRUST_PICKLE=1" in msg and "weights_only=False" in msg
    assert [c["weights_only"] for c in torch.calls] == [True]
    # whatever the order of the globals in the file: one read
    path, torch = pt(ck, needs=["mypkg.Custom", "argparse.Namespace"])
    with pytest.raises(CheckpointError, match="refused the global"):
        torch_load(path)
    assert len(torch.calls) == 1
    path, torch = pt(ck, needs=["mypkg.Custom", "argparse.Namespace"], scan=True)
    with pytest.raises(CheckpointError, match=r"global\(s\) mypkg\.Custom\. If you trust"):
        torch_load(path)
    # torch >= 2.6 scans the file: every unsafe global is named, the allowlisted ones left out
    path, torch = pt(ck, needs=["argparse.Namespace", "mypkg.Custom", "other.Thing"], scan=True)
    with pytest.raises(CheckpointError, match=r"mypkg\.Custom, other\.Thing\. If you trust"):
        torch_load(path)


def test_trust_pickle_loads_with_weights_only_false(pt, monkeypatch):
    path, torch = pt(training_checkpoint(), needs=["argparse.Namespace", "mypkg.Custom"])
    assert load_state_dict(path, trust_pickle=True)["w"].shape == (2, 3)
    assert [c["weights_only"] for c in torch.calls] == [False]
    monkeypatch.setenv(TRUST_PICKLE_ENV, "1")
    path, torch = pt(training_checkpoint(), needs=["mypkg.Custom"])
    assert load_state_dict(path)["w"].shape == (2, 3)
    assert [c["weights_only"] for c in torch.calls] == [False]


def test_old_torch_without_safe_globals(pt):
    path, torch = pt(training_checkpoint(), needs=["argparse.Namespace"], safe_globals=False)
    with pytest.raises(CheckpointError, match=r"argparse\.Namespace.*trust_pickle=True"):
        load_state_dict(path)
    assert len(torch.calls) == 1


def test_unparsed_refusal_still_explained(pt):
    path, _ = pt({}, error=pickle.UnpicklingError("Weights only load failed.\n\tWeightsUnpickler error: odd thing"))
    with pytest.raises(CheckpointError, match="WeightsUnpickler error: odd thing.*trust_pickle"):
        load_state_dict(path)


def test_corrupt_file_is_not_a_refusal(pt):
    path, torch = pt({}, error=pickle.UnpicklingError("invalid load key, 'x'."))
    with pytest.raises(CheckpointError, match=r"could not read checkpoint .*ckpt\.pt: UnpicklingError: invalid load"):
        load_state_dict(path)
    assert len(torch.calls) == 1


def test_non_tensor_value_names_the_key(pt):
    ck = training_checkpoint()
    ck["ema"]["step_count"] = 3
    path, _ = pt(ck)
    with pytest.raises(CheckpointError, match=r"'step_count' is a int, not a tensor"):
        load_state_dict(path)
    path, _ = pt([FakeTensor([1.0])])
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_state_dict(path)


def test_select_state_dict():
    raw = {"a.weight": 1}
    assert select_state_dict(raw) is raw
    assert select_state_dict({"state_dict": raw, "epoch": 3}) is raw
    assert select_state_dict({"ema": raw, "model": {}}) is raw
    assert select_state_dict({"ema": {}, "model": raw}, prefer_ema=False) is raw
    module = types.SimpleNamespace(state_dict=lambda: raw)  # a whole pickled module (trust_pickle only)
    assert select_state_dict(module) is raw and select_state_dict({"ema": module}) is raw


def test_official_stats_via_fake_torch(pt):
    var = np.random.default_rng(0).random((4, 2, 3)).astype(np.float32)
    path, _ = pt({"mean": None, "var": FakeTensor(var)})
    v, m = load_stats(path)
    assert m is None and v.shape == (6, 4)
    np.testing.assert_array_equal(v, var.transpose(1, 2, 0).reshape(6, 4))
    path, _ = pt({"mean": FakeTensor(-var, "bfloat16"), "var": FakeTensor(var)})
    v, m = load_stats(path)
    np.testing.assert_array_equal(m, -v)
    for bad in ({"var": None}, {"mean": None}, {"var": FakeTensor(var[0])}, {"var": FakeTensor(var), "mean": 0.0},
                [FakeTensor(var)]):
        path, _ = pt(bad)
        with pytest.raises(CheckpointError, match=r"ckpt\.pt: (expected|state dict entry 'mean')"):
            load_stats(path)
