"""What goes in: base models (a local HF folder, a hub id, a GGUF, a bundled model) read one tensor at a time,
and text for calibration and evaluation."""
