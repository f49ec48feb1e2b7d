"""The Δ-ML potential: descriptors, Morse prior, element networks, ensemble training, calculator."""

from alflow.model.descriptors import SymmetryFunctions
from alflow.model.morse import MorseParameters
from alflow.model.potential import DeltaPotential
from alflow.model.training import TrainingSettings

__all__ = ["DeltaPotential", "MorseParameters", "SymmetryFunctions", "TrainingSettings"]
