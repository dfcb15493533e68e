"""quantize: recipe → calibrate → quantize → evaluate → fit → report."""

__version__ = "0.1.0"
