"""The echo phantom: procedural apical-four-chamber-like echo videos in the EchoNet-Dynamic layout, with known EF,
volumes, LV tracings and patient identity (see :func:`generate_phantom`)."""

from datamodules.phantom.anatomy import cm_per_pixel
from datamodules.phantom.generate import PhantomConfig, describe_video, generate_phantom
from datamodules.phantom.tracings import ef_from_tracings

__all__ = ["PhantomConfig", "cm_per_pixel", "describe_video", "ef_from_tracings", "generate_phantom"]
