"""Multi-domain datasets: one module per data format, plus the shared domain/split machinery."""

from dmg.data.domains import DomainSplits, choose_domains

__all__ = ["DomainSplits", "choose_domains"]
