"""Plain ``nn.Module`` building blocks the LightningModules (systems) are assembled from."""

from lightning_modules.components.discriminator import (
    NLayerDiscriminator,
    hinge_discriminator_loss,
    hinge_generator_loss,
)

__all__ = ["NLayerDiscriminator", "hinge_discriminator_loss", "hinge_generator_loss"]
