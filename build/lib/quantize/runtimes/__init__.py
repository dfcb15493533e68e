"""Where an artefact runs: llama.cpp for GGUF, transformers (with the package its quantization_config names)
for HF folders. Loading only; what is measured on them lives in `measure`."""
