"""bench.convert_experts turns the CS285 pickle layout into the benchmark's expert files."""

import json
import pickle

import numpy as np
import pytest

from bench.convert_experts import convert, main
from bicql_lightning.experts import MLPExpert


def cs285_pickle(rng, obs_dim=3, hidden=4, act_dim=2):
    """A dict laid out as the CS285 expert pickles are (row-vector biases, E[x^2] kept)."""
    def affine(n_in, n_out):
        return {"AffineLayer": {"W": rng.normal(size=(n_in, n_out)), "b": rng.normal(size=(1, n_out))}}
    mean = rng.normal(size=(1, obs_dim))
    std = rng.uniform(0.5, 2.0, size=(1, obs_dim))
    return {"nonlin_type": "tanh", "GaussianPolicy": {
        "obsnorm": {"Standardizer": {"mean_1_D": mean, "meansq_1_D": mean**2 + std**2}},
        "hidden": {"FeedforwardNet": {"layer_0": affine(obs_dim, hidden), "layer_2": affine(hidden, hidden)}},
        "out": affine(hidden, act_dim), "logstdevs_1_Da": rng.normal(size=(1, act_dim))}}, std


def test_converted_expert_computes_the_pickled_network():
    rng = np.random.default_rng(0)
    data, std = cs285_pickle(rng)
    expert = MLPExpert(convert(data))
    obs = rng.normal(size=(5, 3))
    policy = data["GaussianPolicy"]
    h = (obs - policy["obsnorm"]["Standardizer"]["mean_1_D"]) / (std + 1e-6)
    for name in ("layer_0", "layer_2"):
        layer = policy["hidden"]["FeedforwardNet"][name]["AffineLayer"]
        h = np.tanh(h @ layer["W"] + layer["b"])
    out = policy["out"]["AffineLayer"]
    np.testing.assert_allclose(expert.mean_action(obs), h @ out["W"] + out["b"], rtol=1e-10)
    np.testing.assert_allclose(expert.params["log_std"], policy["logstdevs_1_Da"][0])


def test_convert_names_what_is_missing_or_unsupported():
    data, _ = cs285_pickle(np.random.default_rng(1))
    del data["GaussianPolicy"]["out"]
    with pytest.raises(ValueError, match="no key 'out'"):
        convert(data)
    data, _ = cs285_pickle(np.random.default_rng(1))
    data["nonlin_type"] = "lrelu"
    with pytest.raises(ValueError, match="needs tanh"):
        convert(data)


def test_main_writes_the_npz_and_manifest_entry_and_refuses_to_overwrite(tmp_path):
    data, _ = cs285_pickle(np.random.default_rng(2))
    pkl = tmp_path / "Walker.pkl"
    pkl.write_bytes(pickle.dumps(data))
    out = tmp_path / "experts"
    main(["--pkl", str(pkl), "--name", "walker", "--env-id", "Walker2d-v5", "--out", str(out)])
    main(["--pkl", str(pkl), "--name", "ant", "--env-id", "Ant-v4", "--env-kwargs", '{"use_contact_forces": true}',
          "--out", str(out)])
    manifest = json.loads((out / "experts.json").read_text())
    assert manifest["ant"] == {"file": "ant.npz", "env_id": "Ant-v4", "env_kwargs": {"use_contact_forces": True},
                               "activation": "tanh"}
    assert MLPExpert.from_npz(out / "walker.npz").obs_dim == 3
    before = (out / "walker.npz").read_bytes()
    with pytest.raises(SystemExit, match="exists already"):
        main(["--pkl", str(pkl), "--name", "walker", "--env-id", "Walker2d-v5", "--out", str(out)])
    assert (out / "walker.npz").read_bytes() == before


def test_medium_policy_is_copied_beside_the_expert_and_named_in_its_entry(tmp_path):
    data, _ = cs285_pickle(np.random.default_rng(3))
    pkl = tmp_path / "Walker.pkl"
    pkl.write_bytes(pickle.dumps(data))
    medium = tmp_path / "walker_medium_src.npz"
    np.savez(medium, **convert(cs285_pickle(np.random.default_rng(4))[0]))
    other = tmp_path / "other.npz"
    np.savez(other, **convert(cs285_pickle(np.random.default_rng(5), obs_dim=5)[0]))
    out = tmp_path / "experts"
    main(["--pkl", str(pkl), "--name", "walker", "--env-id", "Walker2d-v5", "--out", str(out)])
    with pytest.raises(SystemExit, match="observation/action sizes 5/2, but walker's expert has 3/2"):
        main(["--name", "walker", "--medium", str(other), "--out", str(out)])
    assert "medium" not in json.loads((out / "experts.json").read_text())["walker"]
    main(["--name", "walker", "--medium", str(medium), "--out", str(out)])  # added to the existing entry
    entry = json.loads((out / "experts.json").read_text())["walker"]
    assert entry["medium"] == "walker_medium.npz" and entry["env_id"] == "Walker2d-v5"
    assert (out / "walker_medium.npz").read_bytes() == medium.read_bytes()
    with pytest.raises(SystemExit, match="exists already"):
        main(["--name", "walker", "--medium", str(medium), "--out", str(out)])
    # With the pickle, in one call; bench.datasets then reads the medium policy from the manifest.
    main(["--pkl", str(pkl), "--name", "ant", "--env-id", "Ant-v4", "--medium", str(medium), "--out", str(out)])
    from bench.datasets import read_manifest
    tasks = {t.name: t for t in read_manifest(out / "experts.json")}
    assert tasks["ant"].medium_file == out / "ant_medium.npz" and tasks["walker"].medium_file.exists()
