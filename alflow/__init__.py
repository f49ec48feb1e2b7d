"""alflow: active learning of Δ-ML interatomic potentials, orchestrated with FireWorks."""

__version__ = "0.1.0"
