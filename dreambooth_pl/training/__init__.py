"""The training job: orchestration, the LightningModule, losses, methods, data and class images."""
