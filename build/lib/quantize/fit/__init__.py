"""Where it fits: the model's shape, the GPU table, the memory a context needs (KV cache, compute buffer), the
VRAM fit, weight bytes per format from the shape alone, and what a CPU process holds."""
