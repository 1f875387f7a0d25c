"""Online reward transfer: Stable-Baselines3 SAC trained from scratch on a reward source.

    python -m bench.datasets --manifest ../shared/experts/experts.json --out DATA
    python -m bench.run ... --checkpoints CKPT          # the BiCQL-ML / IQ-Learn cells
    python -m bench.transfer_online --manifest ../shared/experts/experts.json --data DATA \\
        --checkpoints CKPT --results bench/results/transfer_online.jsonl

A run is (task, reward source, seed). SAC trains in ``gym.make(env_id, **env_kwargs)``
with its reward replaced by the source's, for ``--steps`` environment steps (default
100k), and every ``--eval-every`` steps its deterministic actions are scored on the
*true* reward: the protocol's reset seeds 10000..10009, normalised by the task's
reference returns. Every source gets the same SAC settings (``SAC_SETTINGS``). One JSON
line per finished run is appended to ``--results``; runs already there are skipped.

Reward sources:

* ``true``: the environment's reward (the upper bound);
* ``constant``: +1 per step, the survival bonus that passes for success on tasks that
  terminate when the agent falls;
* ``bicql:REGIME:DEMOS:N``: the ``RewardNet`` of the BiCQL-ML checkpoint ``bench.run``
  saved for that cell and the run's seed, through ``LearnedRewardWrapper``;
* ``bicql_shaped:REGIME:DEMOS:N``: the same checkpoint's reward shaped by its own soft
  value, r(s,a) + γ(1-terminated)V(s') - V(s) (``ShapedReward``, potential-based: the
  same optimal policies as the reward alone);
* ``bicql_bonus:REGIME:DEMOS:N``: the same checkpoint's reward plus the ``constant``
  source's +1 per step (``LearnedRewardWrapper(..., survival_bonus=1.0)``): the level the
  likelihood leaves free, set to what the constant pays, so that against ``constant`` the
  run measures what the learned reward adds to survival;
* ``bicql_ranked:REGIME:DEMOS:N``: the same checkpoint's reward ranked among the cell's D
  (``RankedReward``: the share of D's pairs it scores lower, in [0, 1]);
  ``untrained_ranked:REGIME:DEMOS:N``, its control, the same network with fresh weights;
* ``bicql_advantage:REGIME:DEMOS:N``: the same checkpoint's soft advantage Q(s,a) - V(s)
  ranked the same way (``RankedReward`` over ``SoftAdvantage``);
* ``bicql_likelihood:REGIME:DEMOS:N``: the log-likelihood of the pair under the same
  checkpoint's controller, ranked the same way (``RankedReward`` over ``PolicyLogLikelihood``);
  ``bicql_relative_likelihood:REGIME:DEMOS:N`` the same less that of the controller's
  greedy action at the state (``PolicyLogLikelihood(relative=True)``);
* ``iqlearn:REGIME:DEMOS:N``: IQ-Learn's recovered reward Q(s,a) - γ(1-done)V(s') of
  that cell's checkpoint; ``iqlearn_bonus:REGIME:DEMOS:N`` the same plus +1 per step.

``--variant NAME`` marks runs whose checkpoints were trained with other settings than the
benchmark's (``bench.run --configs DIR --checkpoints OTHER``): rows record it and the
report names their source ``SOURCE (NAME)``, beside the default's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import minari
import numpy as np
import torch

from bench.datasets import Task, read_manifest
from bench.machine import machine
from bench.run import EVAL_SEEDS, OFFLINE, append_line, checkpoint_path, git_commit, versions
from bicql_lightning import IQLearn, LearnedRewardWrapper, RankedReward, RewardNet, ShapedReward, load_transitions
from bicql_lightning.callbacks import normalized_score, rollout_episodes

DEFAULT_SOURCES = ("true", "constant", "bicql:with-mixed:sub20:1", "bicql:expert-only:full:1",
                   "iqlearn:with-mixed:sub20:1")
# The same for every source: SB3's SAC defaults (two 256x256 networks, Adam 3e-4, batch
# 256, automatic entropy tuning) with the RL Zoo's MuJoCo warm-up of 10k random steps.
SAC_SETTINGS = {"learning_starts": 10_000}
# Learned sources and the bench.run algorithm whose checkpoint each reads.
LEARNED = {"bicql": "bicql", "bicql_shaped": "bicql", "bicql_bonus": "bicql", "bicql_ranked": "bicql",
           "bicql_advantage": "bicql", "bicql_likelihood": "bicql",
           "bicql_relative_likelihood": "bicql", "untrained_ranked": "bicql",
           "iqlearn": "iqlearn", "iqlearn_bonus": "iqlearn"}
# The checkpoint sources ranked by ``RankedReward.from_checkpoint``, each with the score it ranks.
RANKED_SCORE = {"bicql_ranked": "reward", "bicql_advantage": "soft_advantage", "bicql_likelihood": "log_likelihood",
                "bicql_relative_likelihood": "relative_log_likelihood"}
# Sources that pay a rank among the cell's D, and so need D (``ranking_data``).
RANKED = set(RANKED_SCORE) | {"untrained_ranked"}
# What the ``*_bonus`` sources add per step: the ``constant`` source's reward.
SURVIVAL_BONUS = 1.0


class ConstantReward(gym.Wrapper):
    """Reward +1 per step (the environment's own reward in ``info["true_reward"]``)."""

    def step(self, action: Any):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, 1.0, terminated, truncated, dict(info, true_reward=reward)


class IQLearnReward:
    """IQ-Learn's recovered reward with ``RewardNet.predict``'s signature, one transition at a time."""

    def __init__(self, model: IQLearn):
        self.model = model.eval()

    def predict(self, state, action, next_state, done) -> np.ndarray:
        batch = [np.asarray(x)[None] for x in (state, action, next_state, done)]
        return self.model.predict_reward(*batch)


def parse_source(text: str) -> tuple[str, tuple[str, str, int] | None]:
    """``"true"``/``"constant"``, or ``"KIND:REGIME:DEMOS:N"``, KIND one of ``LEARNED`` -> (kind, cell)."""
    kind, _, rest = text.partition(":")
    if kind in ("true", "constant") and not rest:
        return kind, None
    parts = rest.split(":")
    if kind not in LEARNED or len(parts) != 3 or not parts[2].isdigit():
        raise argparse.ArgumentTypeError(f"reward source {text!r}: use true, constant, bicql:REGIME:DEMOS:N, "
                                         "bicql_shaped:REGIME:DEMOS:N, bicql_ranked:REGIME:DEMOS:N "
                                         "(untrained_ranked: its control), bicql_advantage:REGIME:DEMOS:N, "
                                         "bicql_likelihood:REGIME:DEMOS:N, bicql_relative_likelihood:REGIME:DEMOS:N, "
                                         "iqlearn:REGIME:DEMOS:N, or "
                                         "bicql_bonus/iqlearn_bonus:REGIME:DEMOS:N "
                                         "(e.g. bicql:with-mixed:sub20:1)")
    return kind, (parts[0], parts[1], int(parts[2]))


def source_checkpoint(checkpoints: Path, task: Task, source: str, seed: int) -> Path | None:
    kind, cell = parse_source(source)
    if cell is None:
        return None
    regime, demos, n = cell
    return checkpoint_path(checkpoints, task, regime, demos, n, seed, algo=LEARNED[kind])


def make_env(task: Task, source: str, checkpoint: Path | None) -> gym.Env:
    """The task's environment with the source's reward."""
    env = task.make_env()
    kind, _ = parse_source(source)
    if kind == "true":
        return env
    if kind == "constant":
        return ConstantReward(env)
    if kind.endswith("_bonus"):
        return LearnedRewardWrapper(env, learned_reward(kind.removesuffix("_bonus"), str(checkpoint)),
                                    survival_bonus=SURVIVAL_BONUS)
    if kind in RANKED:
        return LearnedRewardWrapper(env, learned_reward(kind, str(checkpoint), ranking_data(task, source)))
    return LearnedRewardWrapper(env, learned_reward(kind, str(checkpoint)))


def ranking_data(task: Task, source: str) -> str:
    """The dataset a ``RANKED`` source ranks against: the cell's D (D_E itself where expert-only)."""
    regime, demos, n = parse_source(source)[1]
    return task.dataset_id(OFFLINE.get(regime, f"expert-n{n}"))


@functools.lru_cache(maxsize=4)
def learned_reward(kind: str, checkpoint: str, data: str | None = None
                   ) -> RewardNet | ShapedReward | RankedReward | IQLearnReward:
    """A checkpoint's reward, loaded once for the training environment and every evaluation one."""
    if kind == "bicql":
        return RewardNet.from_checkpoint(checkpoint)
    if kind == "bicql_shaped":
        return ShapedReward.from_checkpoint(checkpoint)
    if kind in RANKED_SCORE:
        return RankedReward.from_checkpoint(checkpoint, data, score=RANKED_SCORE[kind])
    if kind == "untrained_ranked":
        return RankedReward.fit(untrained(RewardNet.from_checkpoint(checkpoint)), *pairs(data))
    return IQLearnReward(IQLearn.load_from_checkpoint(checkpoint, map_location="cpu"))


def untrained(net: RewardNet, seed: int = 0) -> RewardNet:
    """The control for ``bicql_ranked``: the same network and observation normalisation with
    freshly drawn weights, so its ranks order D's pairs at random (smoothly in (s, a)).
    The draw is the same for every run and leaves the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in net.net:
            if isinstance(layer, torch.nn.Linear):
                layer.reset_parameters()
    return net.eval()


def pairs(dataset_id: str) -> tuple[np.ndarray, np.ndarray]:
    data = load_transitions(dataset_id)
    return data.observations, data.actions


def references(task: Task) -> tuple[float, float]:
    """(R_random, R_expert) recorded in the task's expert dataset by ``bench.datasets``."""
    meta = minari.load_dataset(task.dataset_id("expert-n1")).storage.metadata
    return float(meta["ref_min_score"]), float(meta["ref_max_score"])


def evaluate(model, task: Task, refs: tuple[float, float], source: str = "true",
             checkpoint: Path | None = None) -> dict[str, float | None]:
    """Deterministic actions, one episode per protocol seed, scored on the true reward.

    The episodes run in the source's environment (its reward wrapper changes no observation
    or termination, so the score is the same as in the bare one), which says what the policy
    is paid for: the source's return, the episode length (survival) and, where MuJoCo reports
    it, the mean forward velocity (speed).
    """
    envs = [make_env(task, source, checkpoint) for _ in range(EVAL_SEEDS[1])]
    try:
        ep = rollout_episodes(envs, lambda obs: model.predict(obs, deterministic=True)[0],
                              list(range(EVAL_SEEDS[0], EVAL_SEEDS[0] + EVAL_SEEDS[1])),
                              info_keys=("true_reward", "x_velocity"))
    finally:
        for env in envs:
            env.close()
    true = ep["return"] if source == "true" else ep["true_reward"]
    velocity = ep["x_velocity"] / ep["length"]
    ret = float(true.mean())
    return {"return": ret, "return_std": float(true.std()), "normalized_score": normalized_score(ret, *refs),
            "source_return": float(ep["return"].mean()), "length": float(ep["length"].mean()),
            "x_velocity": float(velocity.mean()) if np.isfinite(velocity).all() else None}


def train(task: Task, source: str, seed: int, steps: int, eval_every: int, checkpoint: Path | None,
          settings: dict | None = None, verbose: bool = True, progress: Path | None = None) -> dict:
    """One SAC run; returns its result row (the curve holds one point per evaluation).

    ``progress``: a JSON file rewritten after every evaluation with the curve so far, so a
    run stopped early still shows how far it got (the results file gets finished runs only).
    """
    from stable_baselines3 import SAC

    refs = references(task)
    env = make_env(task, source, checkpoint)
    settings = {**SAC_SETTINGS, **(settings or {})}
    model = SAC("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **settings)
    curve, start, done = [], time.perf_counter(), 0
    while done < steps:
        chunk = min(eval_every, steps - done)
        model.learn(total_timesteps=chunk, reset_num_timesteps=False)
        done += chunk
        point = {"steps": done, **evaluate(model, task, refs, source, checkpoint),
                 "wall_s": round(time.perf_counter() - start, 1)}
        curve.append(point)
        if progress is not None:
            progress.parent.mkdir(parents=True, exist_ok=True)
            progress.write_text(json.dumps({"task": task.name, "source": source, "seed": seed, "steps": steps,
                                            "curve": curve}) + "\n")
        if verbose:
            print(f"{task.name} {source} seed={seed}: {done} steps, score={point['normalized_score']:.1f} "
                  f"({point['wall_s']}s)", flush=True)
    env.close()
    scores = np.array([p["normalized_score"] for p in curve])
    return {"task": task.name, "env_id": task.env_id, "source": source, "seed": seed, "steps": steps,
            "eval_every": eval_every, "normalized_score": float(scores[-1]), "return": curve[-1]["return"],
            "auc": float(scores.mean()), "curve": curve, "checkpoint": str(checkpoint) if checkpoint else None,
            "sac_settings": settings, "random_return": refs[0], "expert_return": refs[1],
            "wall_s": curve[-1]["wall_s"], "machine": machine(gpu_used=False, threads=True),
            "versions": {**versions(), **_sb3_version()}, "commit": git_commit(), "protocol": 2}


def _sb3_version() -> dict[str, str]:
    from importlib import metadata
    try:
        return {"stable-baselines3": metadata.version("stable-baselines3")}
    except metadata.PackageNotFoundError:
        return {}


def report(rows: list[dict], out: Path) -> str:
    """``out/curves_<task>.png`` (one line per source, mean over seeds at each evaluation; the
    protocol's sources in one panel, the others beside the true and constant rewards) and
    ``out/table.md``: final score and area under the curve relative to the true reward's, both
    compared at the last evaluation every run of the task reached (runs stopped early count
    up to where they stopped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = ["| task | reward source | seeds | steps compared | final normalised score | AUC / true's AUC |",
             "|---|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        common = min(r["curve"][-1]["steps"] for r in task_rows)
        curves: dict[str, list[dict[int, float]]] = {}
        for r in task_rows:
            curves.setdefault(label(r), []).append({p["steps"]: p["normalized_score"] for p in r["curve"]})
        area, means = {}, {}
        for source, runs in curves.items():
            steps = sorted(set.intersection(*(set(c) for c in runs)))
            means[source] = (steps, [float(np.mean([c[s] for c in runs])) for s in steps])
            area[source] = float(np.mean([m for s, m in zip(*means[source]) if s <= common]))
        for source, runs in curves.items():
            final = float(np.mean([c[common] for c in runs]))
            ratio = area[source] / area["true"] if area.get("true") else None
            lines.append(f"| {task} | {source} | {len(runs)} | {common} | {final:.1f} | "
                         f"{'–' if ratio is None else f'{ratio:.2f}'} |")
        # The protocol's sources on the left; options and variants on the right, beside the
        # true and constant rewards, so that neither panel needs more colours than it has.
        options = [s for s in curves if s not in DEFAULT_SOURCES]
        panels = [("the protocol's sources", [s for s in curves if s in DEFAULT_SOURCES])]
        if options:
            panels.append(("options and variants", [s for s in ("true", "constant") if s in curves] + options))
        colour = {s: plt.cm.tab20(i % 20) for i, s in enumerate(curves)}
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6), squeeze=False, sharey=True)
        for ax, (title, sources) in zip(axes[0], panels):
            for source in sources:
                n = len(curves[source])
                ax.plot(*means[source], marker="o", ms=3, color=colour[source],
                        label=f"{source} ({n} seed{'s' if n > 1 else ''})")
            ax.set_xlabel("environment steps")
            ax.set_title(f"{task}: {title}", fontsize=10)
            ax.axhline(0, color="gray", lw=0.6)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
        axes[0][0].set_ylabel("normalised score (true reward), mean over seeds")
        fig.suptitle(f"{task}: SAC from scratch on each reward source")
        fig.tight_layout()
        fig.savefig(out / f"curves_{task}.png", dpi=120)
        plt.close(fig)
    lines += diagnostics(rows, out)
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


DIAGNOSTICS = (("source_return", "return on the source's reward"), ("length", "episode length (steps)"),
               ("x_velocity", "mean forward velocity"))


def diagnostics(rows: list[dict], out: Path) -> list[str]:
    """What each source paid SAC for, from runs whose evaluations recorded it: per task,
    ``out/diagnostics_<task>.png`` (the source's own return, the episode length and the forward
    velocity of the evaluation episodes, mean over seeds) and table lines at the last
    evaluation every such run reached."""
    import matplotlib.pyplot as plt

    rows = [r for r in rows if all("length" in p for p in r["curve"])]
    lines = []
    if rows:
        lines = ["", "| task | reward source | seeds | steps | return on the source's reward | episode length | "
                 "mean forward velocity |", "|---|---|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in rows}):
        task_rows = [r for r in rows if r["task"] == task]
        common = min(r["curve"][-1]["steps"] for r in task_rows)
        fig, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(5 * len(DIAGNOSTICS), 3.8))
        for source in dict.fromkeys(label(r) for r in task_rows):
            runs = [{p["steps"]: p for p in r["curve"]} for r in task_rows if label(r) == source]
            steps = sorted(set.intersection(*(set(c) for c in runs)))
            finals = []
            for ax, (key, title) in zip(axes, DIAGNOSTICS):
                values = [[c[s][key] for c in runs] for s in steps]
                known = [(s, float(np.mean(v))) for s, v in zip(steps, values) if None not in v]
                if known:
                    ax.plot(*zip(*known), marker="o", label=source)
                ax.set_xlabel("environment steps")
                ax.set_title(title, fontsize=10)
                final = [c[common][key] for c in runs]
                finals.append("–" if None in final else f"{np.mean(final):.2f}")
            lines.append(f"| {task} | {source} | {len(runs)} | {common} | {' | '.join(finals)} |")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{task}: what each source paid SAC for (deterministic evaluation episodes)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"diagnostics_{task}.png", dpi=110)
        plt.close(fig)
    return lines


def run_key(row: dict) -> tuple:
    return row["task"], row["source"], row.get("variant"), row["seed"], row["steps"]


def label(row: dict) -> str:
    """The source as tables and figures name it: with its variant, where the run has one."""
    return f"{row['source']} ({row['variant']})" if row.get("variant") else row["source"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--data", required=True, help="Minari root made by bench.datasets (reference returns)")
    parser.add_argument("--results", required=True, help="JSON-lines file (appended to; resumable)")
    parser.add_argument("--checkpoints", default=None, help="bench.run's --checkpoints folder (learned sources)")
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--sources", nargs="*", default=list(DEFAULT_SOURCES))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100_000, help="environment steps per run (default 100k)")
    parser.add_argument("--eval-every", type=int, default=10_000)
    parser.add_argument("--learning-starts", type=int, default=SAC_SETTINGS["learning_starts"],
                        help="SAC's random warm-up steps (a tiny smoke run needs fewer)")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="train nothing: write DIR/curves_<task>.png and DIR/table.md from --results (and "
                             "--also files, e.g. runs stopped early)")
    parser.add_argument("--also", nargs="*", default=[], help="more results files for --report")
    parser.add_argument("--variant", default=None,
                        help="a name for checkpoints trained with other settings than the benchmark's "
                             "(e.g. reward_level=data): recorded in each row, shown next to the source")
    args = parser.parse_args(argv)
    if args.report:
        rows = [json.loads(line) for path in [args.results, *args.also] if Path(path).exists()
                for line in Path(path).read_text().splitlines() if line.strip()]
        if not rows:
            parser.error(f"--report: {args.results} {' '.join(args.also)} hold no runs")
        print(report(rows, Path(args.report)))
        return
    for source in args.sources:
        try:
            parse_source(source)
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
    os.environ["MINARI_DATASETS_PATH"] = str(Path(args.data).resolve())
    checkpoints = Path(args.checkpoints) if args.checkpoints else None
    results = Path(args.results)
    done = set()
    if results.exists():
        done = {run_key(json.loads(line)) for line in results.read_text().splitlines() if line.strip()}
    results.parent.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in read_manifest(args.manifest) if args.tasks is None or t.name in args.tasks]
    for task in tasks:
        for seed in args.seeds:
            for source in args.sources:
                if (task.name, source, args.variant, seed, args.steps) in done:
                    continue
                ckpt = None
                if parse_source(source)[1] is not None:
                    ckpt = source_checkpoint(checkpoints, task, source, seed) if checkpoints else None
                    if ckpt is None or not ckpt.exists():
                        print(f"{task.name} {source} seed={seed}: skipped, no checkpoint {ckpt} "
                              "(run that bench.run cell with --checkpoints first)", flush=True)
                        continue
                torch.manual_seed(seed)
                tag = source.replace(':', '_') + (f"_{args.variant}" if args.variant else "")
                progress = results.parent / f"{results.stem}.progress" / f"{task.name}_{tag}_{seed}.json"
                row = train(task, source, seed, args.steps, args.eval_every, ckpt,
                            {"learning_starts": min(args.learning_starts, args.steps)}, progress=progress)
                progress.unlink(missing_ok=True)
                if args.variant:
                    row["variant"] = args.variant
                append_line(results, json.dumps(row))
                print(f"{task.name} {label(row)} seed={seed}: final={row['normalized_score']:.1f} auc={row['auc']:.1f} "
                      f"wall={row['wall_s']}s", flush=True)


if __name__ == "__main__":
    main()
