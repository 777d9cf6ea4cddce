"""Backbones as named stages, per-domain masks over stage inputs, and per-domain heads."""
