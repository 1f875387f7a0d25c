"""Turn Gaussian MLP expert pickles of the CS285 homework layout into the benchmark's ``.npz``.

    python -m bench.convert_experts --pkl Walker2d.pkl --name walker2d --env-id Walker2d-v5 --out DIR
    python -m bench.convert_experts --pkl Ant.pkl --name ant --env-id Ant-v4 \\
        --env-kwargs '{"use_contact_forces": true}' --out DIR

The experts in ../shared/experts came from that layout (their README): a pickled dict
``{"nonlin_type": "tanh", "GaussianPolicy": {"obsnorm": {"Standardizer": {"mean_1_D",
"meansq_1_D"}}, "hidden": {"FeedforwardNet": {layer: {"AffineLayer": {"W", "b"}}}}, "out":
{"AffineLayer": ...}, "logstdevs_1_Da"}}``. This writes ``DIR/NAME.npz`` in the format of
:class:`bicql_lightning.experts.MLPExpert` and adds NAME to ``DIR/experts.json`` (made if
missing), so that ``bench.datasets`` and ``bench.run`` take the new task from that manifest.
It refuses to overwrite a file or a manifest entry. Unpickling runs code from the file:
convert only files you trust.

``--medium FILE.npz`` (protocol version 2) copies a medium-quality policy, already in the
``.npz`` format (e.g. ``../shared/experts/walker2d_medium.npz``), beside the expert and names
it in the entry's ``medium`` field; without ``--pkl`` it adds it to an existing entry:

    python -m bench.convert_experts --name walker2d --medium ../shared/experts/walker2d_medium.npz --out DIR
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
from pathlib import Path

import numpy as np

from bicql_lightning.experts import MLPExpert


def convert(data: dict) -> dict[str, np.ndarray]:
    """The arrays of :class:`MLPExpert` from the pickled dict (two tanh hidden layers)."""
    try:
        if data["nonlin_type"] != "tanh":
            raise ValueError(f"the expert's hidden layers use {data['nonlin_type']!r}; MLPExpert needs tanh")
        policy = data["GaussianPolicy"]
        norm = policy["obsnorm"]["Standardizer"]
        layers = policy["hidden"]["FeedforwardNet"]
        if len(layers) != 2:
            raise ValueError(f"the expert has {len(layers)} hidden layers; MLPExpert needs 2")
        hidden = [layers[name]["AffineLayer"] for name in sorted(layers)]
        out = policy["out"]["AffineLayer"]
        log_std = policy["logstdevs_1_Da"]
    except KeyError as err:
        raise ValueError(f"not a Gaussian MLP expert of the CS285 layout: no key {err} (see bench.convert_experts)")
    mean = np.asarray(norm["mean_1_D"], np.float64).reshape(-1)
    # The pickle keeps E[x^2]; the standard deviation is recovered from it.
    std = np.sqrt(np.maximum(0.0, np.asarray(norm["meansq_1_D"], np.float64).reshape(-1) - mean**2))
    arrays = {"obs_mean": mean, "obs_std": std, "log_std": np.asarray(log_std, np.float64).reshape(-1),
              "w_out": np.asarray(out["W"], np.float64), "b_out": np.asarray(out["b"], np.float64).reshape(-1)}
    for i, layer in enumerate(hidden):
        arrays[f"w{i}"] = np.asarray(layer["W"], np.float64)
        arrays[f"b{i}"] = np.asarray(layer["b"], np.float64).reshape(-1)
    MLPExpert(arrays)  # checks every array is there
    return arrays


def add_medium(manifest: dict, name: str, medium: Path, out: Path) -> Path:
    """Copy ``medium`` to ``out/NAME_medium.npz`` and name it in ``manifest[name]``; checks it
    is an MLPExpert with the expert's observation and action sizes."""
    target = out / f"{name}_medium.npz"
    if target.exists() or manifest[name].get("medium"):
        raise SystemExit(f"{target} or the medium of {name!r} exists already: nothing was written")
    policy = MLPExpert.from_npz(medium)
    expert = MLPExpert.from_npz(out / manifest[name]["file"])
    if (policy.obs_dim, policy.act_dim) != (expert.obs_dim, expert.act_dim):
        raise SystemExit(f"{medium} has observation/action sizes {policy.obs_dim}/{policy.act_dim}, but "
                         f"{name}'s expert has {expert.obs_dim}/{expert.act_dim}: it is another task's policy")
    shutil.copyfile(medium, target)
    manifest[name] = {**manifest[name], "medium": target.name}
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pkl", default=None, help="the pickled expert (omit to add --medium to an existing entry)")
    parser.add_argument("--name", required=True, help="task name in the manifest (also the .npz's name)")
    parser.add_argument("--env-id", default=None, help="Gymnasium id, e.g. Walker2d-v5 (with --pkl)")
    parser.add_argument("--env-kwargs", default="{}", help="JSON keyword arguments for gym.make")
    parser.add_argument("--medium", default=None, help="a medium-quality policy .npz to name in the entry")
    parser.add_argument("--out", required=True, help="folder of the .npz files and experts.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    target, manifest_path = out / f"{args.name}.npz", out / "experts.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if args.pkl is None:
        if args.medium is None or args.name not in manifest:
            parser.error("without --pkl, --medium adds a medium policy to an existing entry of --out's manifest "
                         f"(it lists {sorted(manifest)})")
        medium = add_medium(manifest, args.name, Path(args.medium), out)
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"{medium}: the medium policy of {args.name!r} in {manifest_path}")
        return
    if args.env_id is None:
        parser.error("--pkl needs --env-id")
    if target.exists() or args.name in manifest:
        raise SystemExit(f"{target} or the entry {args.name!r} in {manifest_path} exists already: choose another "
                         "--name or --out (nothing was written)")
    with open(args.pkl, "rb") as f:
        arrays = convert(pickle.load(f))
    out.mkdir(parents=True, exist_ok=True)
    np.savez(target, **arrays)
    manifest[args.name] = {"file": target.name, "env_id": args.env_id, "env_kwargs": json.loads(args.env_kwargs),
                           "activation": "tanh"}
    if args.medium is not None:
        add_medium(manifest, args.name, Path(args.medium), out)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{target}: obs dim {arrays['obs_mean'].shape[0]}, action dim {arrays['b_out'].shape[0]}; "
          f"{manifest_path} lists {sorted(manifest)}")


if __name__ == "__main__":
    main()
