r"""Implicit Q-learning (IQL, Kostrikov et al. 2021): the offline RL learner of the collection.

It trains on the offline data D alone, with the dataset's rewards or with a learned reward
(``reward``: a BiCQL-ML checkpoint), so that a recovered reward can be judged by the
controller it trains (benchmark version 2's reward transfer). Each update, on a batch of D:

1. value, expectile regression onto the target critics' minimum:
   :math:`L_V = \mathbb E[|\tau - 1(u < 0)|\,u^2]`, :math:`u = \min_i\bar Q_i(s,a) - V(s)`;
2. critics, TD regression onto the value of the next state:
   :math:`L_Q = \sum_i \mathbb E[(Q_i(s,a) - r - \gamma(1-\text{terminated})V(s'))^2]`;
3. policy, advantage-weighted regression:
   :math:`L_\pi = -\mathbb E[\min(e^{\beta(\min_i\bar Q_i(s,a) - V(s))}, w_{max})\log\pi(a|s)]`.

No action outside the data is ever evaluated. Box policies are the clipped Gaussian of
:mod:`bicql_lightning.densities` (exact censored likelihood), Discrete ones categorical.

Two commands train BiCQL-ML's reward and then a controller on it::

    bicql fit --config configs/quickstart_mixed.yaml      # BiCQL-ML: 3,000 updates, one checkpoint
    bicql fit --config configs/quickstart_mixed.yaml --model bicql_lightning.IQL \
        --model.reward lightning_logs/quickstart_mixed/version_0/checkpoints/epoch=2-step=6000.ckpt
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from .base import OfflineModule, check_common_hparams
from .densities import GaussianPolicy
from .distributed import full_precision
from .losses import Metrics
from .networks import QEnsemble, mlp
from .ranked import rank_among
from .reward import RewardNet
from .spaces import SpaceSpec, check_spec

Batch = dict[str, Tensor]


# ============================================================================ losses
def expectile_loss(diff: Tensor, expectile: float) -> Tensor:
    r""":math:`\mathbb E[|\tau - 1(u<0)|\,u^2]` of ``diff`` = :math:`u`: above the mean for :math:`\tau > 1/2`."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


def awr_weights(advantage: Tensor, beta: float, max_weight: float) -> Tensor:
    r""":math:`\min(\exp(\beta A), w_{max})`, computed so that a large advantage cannot overflow."""
    return torch.exp((beta * advantage).clamp(max=float(np.log(max_weight))))


def iql_td_target(reward: Tensor, next_value: Tensor, terminated: Tensor, gamma: float) -> Tensor:
    """:math:`r + \\gamma(1-\\text{terminated})V(s')` (no gradient is meant to flow through it)."""
    return reward + gamma * (1.0 - terminated) * next_value


# ============================================================================ the module
class IQL(OfflineModule):
    r"""Implicit Q-learning on the offline data, with the dataset's or a learned reward.

    Args:
        spaces: observation/action spaces as a :class:`SpaceSpec` dict. Left ``None``,
            it is taken from the data module at ``setup`` (the CLI links it).
        reward: ``None`` trains on the dataset's rewards; a path to a checkpoint holding a
            :class:`~bicql_lightning.RewardNet` (a BiCQL-ML checkpoint) trains on that
            learned reward instead: the frozen network relabels every batch of D on the
            training device, exactly the rewards a one-time relabelling of D would give.
        reward_scale: the rewards are multiplied by this before use; ``"returns"``: by
            1000 / (max − min) of D's episode returns under the reward trained on, the IQL
            paper's normalisation for MuJoCo locomotion, derived once at the start of the fit
            (and kept in the checkpoint) from whichever reward that is, dataset's or learned.
        reward_centre: subtract the reward's mean over D's pairs before scaling, derived once
            at the start of the fit and kept in the checkpoint. A learned reward's constant per
            step is one the expert's likelihood leaves free, and on a task that ends episodes
            by failure that constant decides how much surviving pays; centring makes D's
            average pair earn 0, whatever level the reward was trained at. Measured on such
            a task it is harmful: below-average steps then cost, so ending the episode pays,
            and on hopper IQL learns to fall at once (bench/NOTES.md). Off by default.
        reward_rank: replace each reward by its rank among D's pairs, in [0, 1] (the share of
            D's pairs below it, as :class:`~bicql_lightning.RankedReward` pays), before
            centring and scaling. A learned reward is ranked by its network's output before
            the bound, which still orders the pairs that the bound's floor rounds to one
            value. D's sorted values are derived once at the start of the fit and kept in
            the checkpoint. Ranks squeeze the top of the scale (on hopper a near-expert gait
            that falls earned 0.76 per step, the expert's pairs 0.88), so the advantages
            among good actions shrink: with mixed data IQL on ranks learned a gait that
            falls on one seed in three, on the learned reward (16.1) and on the true one
            (74.7), and beside medium data it gained nothing (bench/NOTES.md). Off by
            default.
        hidden_sizes: hidden widths of the critics, the value and the policy.
        gamma: discount :math:`\gamma`.
        expectile: :math:`\tau` of the value's expectile regression (0.7: the IQL paper's
            MuJoCo setting).
        beta: inverse temperature :math:`\beta` of the policy's advantage weights (3.0).
        max_weight: :math:`w_{max}`, the advantage weights' cap (100).
        lr: Adam learning rate of the critics, the value and the policy.
        updates_per_sec_every: updates between two throughput measurements.
        log_every_n_updates: training metrics are logged every N updates; ``None`` follows
            the Trainer's ``log_every_n_steps``.
        sample_seed: seed of the module's random stream (stochastic acting only).

    Logged: ``iql/value_loss``, ``iql/q_loss``, ``iql/policy_loss``, ``iql/advantage``,
    ``iql/weight``, ``iql/reward``; ``train/updates_per_sec``, ``train/updates``.
    The target critics follow ``q_net`` through :class:`~bicql_lightning.TargetNetworkUpdate`
    (added unless configured).
    """

    model_name = "IQL"

    def __init__(
        self,
        spaces: dict[str, Any] | None = None,
        reward: str | None = None,
        reward_scale: float | Literal["returns"] = 1.0,
        reward_centre: bool = False,
        reward_rank: bool = False,
        hidden_sizes: list[int] = [256, 256],  # noqa: B006 - jsonargparse needs a literal
        gamma: float = 0.99,
        expectile: float = 0.7,
        beta: float = 3.0,
        max_weight: float = 100.0,
        lr: float = 3e-4,
        updates_per_sec_every: int = 100,
        log_every_n_updates: int | None = None,
        sample_seed: int | None = None,
    ):
        super().__init__()
        if not 0.0 < expectile < 1.0:
            raise ValueError(f"expectile must be in (0, 1), got {expectile}")
        if beta < 0 or max_weight <= 0:
            raise ValueError(f"beta must be >= 0 and max_weight > 0, got {beta} and {max_weight}")
        if reward_scale != "returns" and (isinstance(reward_scale, str) or not reward_scale > 0):
            raise ValueError(f"reward_scale must be a positive number or 'returns', got {reward_scale!r}")
        check_common_hparams(gamma, hidden_sizes, log_every_n_updates)
        self.save_hyperparameters()
        self._init_state()
        # Read (and checked: a missing, truncated or foreign file fails here) before any data.
        self.reward_net = None if reward is None else RewardNet.from_checkpoint(reward).requires_grad_(False)
        if spaces is not None:
            self._build(check_spec(dict(spaces)))

    def _build(self, spaces: SpaceSpec) -> None:
        hp = self.hparams
        self._adopt_spaces(spaces)
        if self.reward_net is not None and dict(self.reward_net.spaces) != dict(spaces):
            raise ValueError(f"The reward checkpoint {hp.reward!r} was trained on spaces {dict(self.reward_net.spaces)}, "
                             f"not on this data's {dict(spaces)}: pass a reward learned on the same environment.")
        self.q_net = QEnsemble(spaces, hp.hidden_sizes, ensemble_size=2)
        self.target_q_net = copy.deepcopy(self.q_net).requires_grad_(False)
        self.value_net = mlp(spaces["obs_dim"], hp.hidden_sizes, 1)
        self.policy: nn.Module = (mlp(spaces["obs_dim"], hp.hidden_sizes, spaces["action_dim"]) if self.discrete
                                  else GaussianPolicy(spaces, hp.hidden_sizes, "clipped"))
        if hp.reward_scale == "returns":  # 0 until derived from D; a checkpoint keeps it
            self.register_buffer("returns_scale", torch.zeros(()))
        if hp.reward_centre:  # NaN until derived from D; a checkpoint keeps it
            self.register_buffer("reward_mean", torch.full((), float("nan")))
        if hp.reward_rank:  # D's sorted values: empty until derived from D; a checkpoint keeps them
            self.register_buffer("rank_reference", torch.empty(0))
        self.built = True

    def on_fit_start(self) -> None:
        super().on_fit_start()
        hp = self.hparams
        rank = hp.reward_rank and self.rank_reference.numel() == 0
        centre = hp.reward_centre and bool(torch.isnan(self.reward_mean))
        scale = hp.reward_scale == "returns" and not float(self.returns_scale) > 0
        if not (rank or centre or scale):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "offline_store", None) is None:
            option = "reward_rank=True" if rank else "reward_centre=True" if centre else "reward_scale='returns'"
            raise ValueError(f"IQL({option}) reads D's pairs: fit it with an OfflineIRLDataModule.")
        store = datamodule.offline_store
        rewards = self.store_rewards(store, ranked=not rank)  # one relabelling of D serves all three
        if rank:  # first: centring and the returns' spread are those of the ranks
            self.rank_reference = torch.sort(rewards.float()).values.to(self.device)
            rewards = rank_among(rewards.to(self.device), self.rank_reference).double().to(rewards.device)
        if centre:  # first: the returns' spread is that of the centred reward
            self.reward_mean.fill_(float(rewards.mean()))
        if scale:
            self.returns_scale.fill_(self.episode_returns_scale(store.episode_number, self._centred(rewards)))

    @torch.no_grad()
    def store_rewards(self, store: Any, chunk: int = 65536, ranked: bool = True) -> Tensor:
        """The reward of every pair of ``store`` (D), neither centred nor scaled (float64); where
        ``reward_rank``, ranked, or with ``ranked=False`` what is ranked (a learned reward's
        output before the bound)."""
        out = torch.empty(len(store), dtype=torch.float64, device=store.episode_number.device)
        for start in range(0, len(store), chunk):
            index = torch.arange(start, min(start + chunk, len(store)), device=out.device)
            batch = {k: v.to(self.device) for k, v in store.take(index).items()}
            out[start:start + len(index)] = self._raw_rewards(batch, ranked).double().to(out.device)
        return out

    @staticmethod
    def episode_returns_scale(episode: Tensor, rewards: Tensor) -> float:
        """1000 / (max − min) of the episode returns of pairs with these episode numbers and rewards."""
        returns = torch.zeros(int(episode.max()) + 1, dtype=torch.float64, device=episode.device)
        returns.index_add_(0, episode, rewards.to(torch.float64))
        returns = returns[torch.unique(episode)]  # episode numbers need not be contiguous
        spread = float(returns.max() - returns.min())
        if not spread > 0:
            raise ValueError("IQL(reward_scale='returns'): every episode of D has the same return under this reward, "
                             "so there is nothing to normalise by; give a number instead.")
        return 1000.0 / spread

    def configure_optimizers(self):
        lr = self.hparams.lr
        return (torch.optim.Adam(self.value_net.parameters(), lr=lr), torch.optim.Adam(self.q_net.parameters(), lr=lr),
                torch.optim.Adam(self.policy.parameters(), lr=lr))

    def configure_callbacks(self):
        from .callbacks import TargetNetworkUpdate

        if any(isinstance(cb, TargetNetworkUpdate) for cb in self.trainer.callbacks):
            return []
        return [TargetNetworkUpdate()]

    # ------------------------------------------------------------------ pieces
    def _q(self, net: QEnsemble, enc: Tensor, action: Tensor) -> Tensor:
        """Each critic's Q at the data actions, ``(E, B)``."""
        if self.discrete:
            q_all = full_precision(net(enc))
            return q_all.gather(2, action.long().view(1, -1, 1).expand(q_all.shape[0], -1, 1)).squeeze(2)
        return full_precision(net(enc, action))

    def _value(self, enc: Tensor) -> Tensor:
        return full_precision(self.value_net(enc)).squeeze(-1)

    @torch.no_grad()
    def rewards(self, batch: Batch) -> Tensor:
        """The rewards training uses: the dataset's or the learned reward's, ranked where
        ``reward_rank``, centred where ``reward_centre``, times ``reward_scale``."""
        scale = self.returns_scale if self.hparams.reward_scale == "returns" else self.hparams.reward_scale
        return scale * self._centred(self._raw_rewards(batch))

    def _centred(self, rewards: Tensor) -> Tensor:
        return rewards - self.reward_mean.to(rewards.dtype) if self.hparams.reward_centre else rewards

    def _raw_rewards(self, batch: Batch, ranked: bool = True) -> Tensor:
        rank = ranked and self.hparams.reward_rank
        if rank and self.rank_reference.numel() == 0:
            raise ValueError("IQL(reward_rank=True) ranks rewards among D's pairs, which are read at the start of "
                             "a fit: fit it (or load a fitted checkpoint) before asking for its rewards.")
        if self.reward_net is None:
            r = batch["reward"]
        else:  # ranks read the output before the bound, whose floor ties most of D
            head = self.reward_net.logit if self.hparams.reward_rank else self.reward_net
            r = full_precision(head(batch["obs"], batch["action"]))
        return (rank_among(r, self.rank_reference) if rank else r).float()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # D's sorted values are as many as D's pairs: take the checkpoint's size before loading them.
        key = prefix + "rank_reference"
        if key in state_dict and hasattr(self, "rank_reference"):
            self.rank_reference = torch.empty_like(state_dict[key], device=self.rank_reference.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _log_prob(self, enc: Tensor, action: Tensor) -> Tensor:
        if self.discrete:
            return torch.log_softmax(full_precision(self.policy(enc)), -1).gather(
                1, action.long().view(-1, 1)).squeeze(1)
        return self.policy.log_prob(enc, action)

    # ------------------------------------------------------------------ objectives
    def value_objective(self, enc: Tensor, action: Tensor) -> tuple[Tensor, Metrics]:
        with torch.no_grad():
            target_q = self._q(self.target_q_net, enc, action).min(0).values
        diff = target_q - self._value(enc)
        loss = expectile_loss(diff, self.hparams.expectile)
        return loss, {"iql/value_loss": loss.detach(), "iql/advantage": diff.detach().mean()}

    def q_objective(self, enc: Tensor, action: Tensor, reward: Tensor, next_enc: Tensor,
                    terminated: Tensor) -> tuple[Tensor, Metrics]:
        with torch.no_grad():
            target = iql_td_target(reward, self._value(next_enc), terminated, self.hparams.gamma)
        q = self._q(self.q_net, enc, action)  # (E, B)
        loss = (q - target).pow(2).mean(1).sum()
        return loss, {"iql/q_loss": loss.detach(), "iql/reward": reward.mean()}

    def policy_objective(self, enc: Tensor, action: Tensor) -> tuple[Tensor, Metrics]:
        hp = self.hparams
        with torch.no_grad():
            advantage = self._q(self.target_q_net, enc, action).min(0).values - self._value(enc)
            weight = awr_weights(advantage, hp.beta, hp.max_weight)
        loss = -(weight * self._log_prob(enc, action)).mean()
        return loss, {"iql/policy_loss": loss.detach(), "iql/weight": weight.mean()}

    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> None:
        data = batch["offline"]
        v_opt, q_opt, pi_opt = self._optimizer_list()
        enc, next_enc = self.encoder(data["obs"]), self.encoder(data["next_obs"])
        metrics: Metrics = {}
        metrics.update(self._step(v_opt, self.value_objective, enc, data["action"]))
        metrics.update(self._step(q_opt, self.q_objective, enc, data["action"], self.rewards(data), next_enc,
                                  data["terminated"]))
        metrics.update(self._step(pi_opt, self.policy_objective, enc, data["action"]))
        self._finish_step(metrics)

    def validation_step(self, batch: dict[str, Batch], batch_idx: int) -> None:
        expert = batch["expert"]
        nll = -self._log_prob(self.encoder(expert["obs"]), expert["action"]).mean()
        self.log("val/expert_nll", nll, prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------------ acting
    @torch.no_grad()
    def act(self, obs: np.ndarray | Tensor, deterministic: bool = True) -> np.ndarray:
        """Action(s) for raw observation(s): the policy's greedy action or a draw from it."""
        obs_t, single = self._obs_tensor(obs)
        enc = self.encoder(obs_t)
        if self.discrete:
            logits = full_precision(self.policy(enc))
            action = logits.argmax(1) if deterministic else torch.distributions.Categorical(logits=logits).sample()
        else:
            action = self.policy.mode(enc) if deterministic else self.policy.sample(enc)
        out = action.cpu().numpy()
        return out[0] if single else out
