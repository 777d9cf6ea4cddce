"""Domain-specific Masks for Generalization (Chattopadhyay, Balaji, Hoffman, ECCV 2020) and its baselines."""

__version__ = "0.1.0"
