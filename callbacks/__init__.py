"""Lightning callbacks of echo-lvdm: coverage and faithfulness measured while a generator trains, prediction writers
(latent cache, privacy-filtered synthetic datasets), checkpoints, sample and config logging.

Imports run one way: datamodules ← lightning_modules ← callbacks ← echo_lvdm. Nothing here imports the commands.
"""

from callbacks.checkpoint import Checkpoint
from callbacks.config_logging import LoggerSaveConfigCallback
from callbacks.coverage import CoverageCallback, CoverageMeasures
from callbacks.latent_cache import LatentCacheWriter
from callbacks.reid_checkpoint import CalibratedCheckpoint
from callbacks.synthetic_writer import SyntheticDatasetWriter
from callbacks.video_logging import VideoLogger

__all__ = ["CalibratedCheckpoint", "Checkpoint", "CoverageCallback", "CoverageMeasures", "LatentCacheWriter",
           "LoggerSaveConfigCallback", "SyntheticDatasetWriter", "VideoLogger"]
