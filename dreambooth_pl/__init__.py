"""DreamBooth (Ruiz et al., CVPR 2023) with PyTorch Lightning and Hydra."""
