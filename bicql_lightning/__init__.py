"""bicql-lightning: BiCQL-ML offline inverse reinforcement learning for PyTorch Lightning."""

from .bc import BehaviorCloning
from .callbacks import FitPolicy, RolloutEvaluation, TargetNetworkUpdate, normalized_score
from .datamodule import OfflineIRLDataModule, TransitionStore
from .densities import ActionProposal, GaussianPolicy
from .distributed import AtomicCheckpointIO
from .datasets import DatasetError, Transitions, collect_dataset, evaluate_policy, load_transitions
from .iql import IQL
from .iqlearn import IQLearn
from .module import BiCQLML
from .networks import EnsembleLinear, ObservationEncoder, QEnsemble, polyak_update
from .policies import BoltzmannPolicy, QPolicy, TiltedPriorPolicy
from .ranked import RankedReward
from .reward import CheckpointError, LearnedRewardWrapper, RewardNet
from .seeds import SeedBatch, fit_seeds
from .shaping import PolicyLogLikelihood, ShapedReward, SoftAdvantage, SoftValuePotential
from .spaces import SpaceSpec, space_spec
from . import tabular  # noqa: F401 - registers the tabular MDPs' Gymnasium ids

__version__ = "0.1.0"

__all__ = [
    "ActionProposal", "AtomicCheckpointIO", "BehaviorCloning", "BiCQLML", "BoltzmannPolicy", "CheckpointError",
    "DatasetError", "EnsembleLinear", "FitPolicy", "GaussianPolicy", "IQL", "IQLearn", "LearnedRewardWrapper",
    "ObservationEncoder", "OfflineIRLDataModule", "PolicyLogLikelihood", "QEnsemble", "QPolicy", "RankedReward",
    "RewardNet",
    "RolloutEvaluation", "SeedBatch", "ShapedReward", "SoftAdvantage", "SoftValuePotential",
    "TiltedPriorPolicy", "SpaceSpec", "TargetNetworkUpdate",
    "TransitionStore",
    "Transitions", "collect_dataset", "evaluate_policy", "fit_seeds", "load_transitions", "normalized_score",
    "polyak_update", "space_spec",
]
