"""The ``echo-lvdm`` application: the console script and one module per command (see :mod:`echo_lvdm.main`).

The top of the one-way import order: datamodules ← lightning_modules ← callbacks ← echo_lvdm. Nothing below imports
from here.
"""
