"""Checks of a composed config before anything runs: every mistake is one line naming the key and the fix.

Two kinds of check:
- ``check_overrides`` compares the config with the one the same config groups give without the user's values
  (the "reference"): a key the reference lacks is a typo (``+epoch=3``), and a value whose type differs from the
  reference's default (``optim.lr=abc``) is rejected. New keys and groups are covered automatically.
- ``check_settings`` checks the ranges of the top-level keys and that the folders and stores can be written.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf

from dmg.data.domains import choose_domains
from dmg.errors import BadValue, SetupError, UserError, check_count
from dmg.runs.stores import check_store_uri

RESUME_MODES = ("auto", "skip_finished", "never")
KEEP_CHECKPOINTS = ("selected", "all", "none")
DOMAIN_KEYS = ("target", "sources")  # one domain name or a list of names, whatever the dataset's default looks like
COUNTS = {"epochs": 1, "batch_size": 1, "eval_batch_size": 1, "seed": 0, "num_workers": 0}


def choices() -> dict[str, tuple[str, ...]]:
    """The keys that take one of a few names; the samplers and precisions are read from the modules that
    implement them (imported here, not at the top: they import torch, seconds that a typo elsewhere need not wait)."""
    from dmg.data.sampling import SAMPLERS
    from dmg.engine.compute import PRECISIONS

    return {"resume": RESUME_MODES, "keep_checkpoints": KEEP_CHECKPOINTS, "sampler": SAMPLERS, "precision": PRECISIONS}


def check_overrides(cfg: DictConfig, overrides: Sequence[str], config_name: str = "config") -> None:
    """Reject unknown keys and values of the wrong type, by comparison with the reference config."""
    reference = compose(config_name, overrides=group_choices(overrides))
    for key, known in _unknown_keys(reference, cfg):
        name = key.rpartition(".")[2]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        where = f"the keys of {key.rpartition('.')[0]}" if "." in key else "the top-level keys"
        raise UserError(f"unknown setting {key!r}: {hint}{where} are {', '.join(known)}")
    for key, default, value in _leaves(reference, cfg):
        problem = domains_problem(value) if key in DOMAIN_KEYS else type_problem(default, value)
        if problem:
            raise BadValue(key, f"{problem} (default: {_show(default)})", value)


def _unknown_keys(reference: DictConfig, actual: DictConfig, prefix: str = "") -> Iterator[tuple[str, list[str]]]:
    """``(key, the keys known there)`` for every key of ``actual`` that the reference config does not define."""
    known = [str(key) for key in reference]
    for key in actual:
        if key == "hydra":
            continue
        if key not in reference:
            yield f"{prefix}{key}", known
            continue
        inner, outer = _value(reference, key), _value(actual, key)
        if isinstance(inner, DictConfig) and isinstance(outer, DictConfig):
            yield from _unknown_keys(inner, outer, f"{prefix}{key}.")


def group_choices(overrides: Sequence[str]) -> list[str]:
    """The overrides that choose config-group options (``dataset=pacs``, ``+sweep=dmg_search``), not values."""
    repository = GlobalHydra.instance().config_loader().repository
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [override.input_line for override in parsed if repository.group_exists(override.key_or_group)]


def _leaves(reference: DictConfig, actual: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(key, default, value)`` for every setting the reference gives a default (interpolations resolved)."""
    for key in reference:
        if key == "hydra" or key in actual and OmegaConf.is_interpolation(actual, key):
            continue  # an interpolated value is checked where it comes from (method.optimizer: ${optim.network})
        default, value = _value(reference, key), _value(actual, key)
        if default is None or default is UNRESOLVED or value is UNRESOLVED:
            continue
        if isinstance(default, DictConfig) and isinstance(value, DictConfig):
            yield from _leaves(default, value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", default, value


UNRESOLVED = object()


def _value(node: DictConfig, key: Any) -> Any:
    """``node[key]``, or ``UNRESOLVED`` if it is absent, missing or its interpolation fails (checked where used)."""
    try:
        return node[key] if key in node and not OmegaConf.is_missing(node, key) else UNRESOLVED
    except Exception:  # noqa: BLE001 - omegaconf raises many types for an interpolation it cannot resolve
        return UNRESOLVED


def type_problem(default: Any, value: Any) -> str | None:
    """What is wrong with ``value`` where the config's default is ``default``; None if its type fits."""
    checks = (
        (bool, lambda v: isinstance(v, bool), "true or false"),
        (int, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        (float, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
        ((list, ListConfig), lambda v: isinstance(v, (list, ListConfig)), "a list such as [a,b]"),
        ((Mapping, DictConfig), lambda v: isinstance(v, (Mapping, DictConfig)), "a mapping such as {a: 1}"),
    )
    for kind, fits, expected in checks:
        if isinstance(default, kind):
            return None if fits(value) else expected
    return None  # strings and anything else: checked by the code that uses them


def domains_problem(value: Any) -> str | None:
    """What is wrong with a ``target`` or ``sources`` value: one name (``target=c``) and a list (``[a,b]``) both fit."""
    names = value if isinstance(value, (list, ListConfig)) else [value]
    if all(isinstance(name, (str, int)) and not isinstance(name, bool) for name in names):
        return None
    return "one domain name or a list of names such as [a,b]"


def _show(value: Any) -> str:
    """A default as the command line writes it: ``0.001``, ``[conv3, fc]``."""
    if isinstance(value, ListConfig):
        return "[" + ", ".join(map(_show, value)) + "]"
    if isinstance(value, DictConfig):
        return "{" + ", ".join(f"{key}: {_show(item)}" for key, item in value.items()) + "}"
    return str(value) if isinstance(value, str) else repr(value)


def check_settings(cfg: DictConfig) -> None:
    """Ranges of the top-level settings, then whether the checkpoint folder and tracking store are usable."""
    for key, least in COUNTS.items():
        check_count(key, cfg[key], least)
    for key, names in (("resume", RESUME_MODES), ("keep_checkpoints", KEEP_CHECKPOINTS)):
        if cfg[key] not in names:
            raise BadValue(key, f"one of {', '.join(names)}", cfg[key])
    check_listed_domains(cfg)
    check_writable_folder(cfg.checkpoint_dir, "checkpoint_dir")
    check_store_uri(str(cfg.tracking.uri), "tracking.uri")
    for key, names in choices().items():
        if cfg[key] not in names:
            raise BadValue(key, f"one of {', '.join(names)}", cfg[key])


def check_listed_domains(cfg: DictConfig) -> None:
    """The target and source names, where the dataset's config lists its domains (``dataset.domains``: a list, or a
    mapping of names to folders); others (Rotated MNIST's angles, an image folder's subfolders) are checked when the
    dataset is built."""
    domains = cfg.dataset.get("domains")
    if isinstance(domains, (ListConfig, DictConfig)):
        choose_domains([str(name) for name in domains], cfg.target, cfg.sources)


def check_writable_folder(path: str | os.PathLike, key: str) -> None:
    """The folder exists and is writable, or can be created; nothing is created here."""
    folder = Path(path).expanduser().absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SetupError(f"{key}={path}: {existing} is a file, not a folder; give a folder to write into")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SetupError(f"{key}={path}: {existing} is not writable by this user; give a writable folder")
