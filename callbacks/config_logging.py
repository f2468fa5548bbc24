"""``LoggerSaveConfigCallback``: the resolved config of an ``echo-lvdm`` run, saved with the run in every dashboard.

Lightning's :class:`~lightning.pytorch.cli.SaveConfigCallback` writes ``config.yaml`` into the log directory; this
subclass also hands it to the run's loggers through ``save_config``, the hook Lightning provides for exactly this.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

__all__ = ["LoggerSaveConfigCallback", "WANDB_CONFIG_FILE"]

# Not "config.yaml": in a wandb run's files/ that name is wandb's own record of run.config.
WANDB_CONFIG_FILE = "lightning_config.yaml"


class LoggerSaveConfigCallback(SaveConfigCallback):
    """``SaveConfigCallback`` (``config.yaml`` in the log dir, same arguments) that also gives the resolved config,
    exactly as ``--print_config`` prints it, to each logger of the Trainer, once, on global rank 0:

    * ``WandbLogger``: the nested dict (``model.init_args.lr``, ``data.root``, …) is merged into the run config
      (``allow_val_change``: Lightning's own hyperparameters may be there already), and the YAML is saved into the run
      as ``files/lightning_config.yaml``;
    * ``TensorBoardLogger``: the YAML as text under the tag ``config`` (TEXT tab), at step 0;
    * other loggers (CSV, …): nothing more; ``config.yaml`` sits next to their files.
    """

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                run.config.update(yaml.safe_load(text), allow_val_change=True)
                path = Path(run.dir) / WANDB_CONFIG_FILE
                path.write_text(text)
                run.save(str(path), base_path=run.dir, policy="now")
            elif isinstance(logger, TensorBoardLogger):
                # TensorBoard renders text as Markdown: indent by 4 spaces to show the YAML as a code block.
                logger.experiment.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()),
                                           global_step=0)
