"""Scripts run with an engine's own interpreter (runtimes/engines.py); they import nothing of quantize."""
