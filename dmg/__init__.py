"""Domain-specific Masks for Generalization (Chattopadhyay, Balaji, Hoffman, ECCV 2020) and its baselines."""

from omegaconf import OmegaConf

__version__ = "0.1.0"


def _join(names) -> str:
    """``${dmg.join:${target}}``: one domain name, or several joined by ``+`` (run names, tags)."""
    return "+".join(map(str, names)) if isinstance(names, (list, tuple)) or OmegaConf.is_list(names) else str(names)


OmegaConf.register_new_resolver("dmg.join", _join, replace=True)
