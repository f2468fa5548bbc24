"""The four systems (LightningModules) of echo-lvdm, with their networks (``components``), samplers, search and the
metrics they log (``metrics``).

Imports run one way: datamodules ← lightning_modules ← callbacks ← echo_lvdm. Nothing here imports callbacks or the
commands.
"""

from lightning_modules.diffusion import VideoDiffusionModule
from lightning_modules.ef_regressor import EFRegressorModule
from lightning_modules.reid import NotCalibratedError, ReIDModule, load_reid
from lightning_modules.vae import VAEModule, export_vae

__all__ = ["EFRegressorModule", "NotCalibratedError", "ReIDModule", "VAEModule", "VideoDiffusionModule", "export_vae",
           "load_reid"]
