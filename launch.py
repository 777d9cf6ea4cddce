"""The one entry point: compose the config with Hydra, run the experiment, return the metric to optimise.

python launch.py                                   # DMG on the embedded Rotated MNIST
python launch.py method=aggregate target=rot0 optim.lr=3e-4
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from dmg.errors import UserError
from dmg.experiment import run

log = logging.getLogger("dmg")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except UserError as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        log.error("error: %s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
