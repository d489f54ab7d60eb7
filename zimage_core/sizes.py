"""The image sizes Z-Image takes: one owner, free of torch, so the main job checks them before anything loads."""

MULTIPLE = 16  # VAE ÷8, then the DiT's 2×2 patches
MAX_SIDE = 4096  # pixels per side
