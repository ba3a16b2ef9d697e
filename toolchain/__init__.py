"""diffusion-compress: prune, distill while unlearning, quantize and export diffusion models."""

__version__ = "0.1.0"
