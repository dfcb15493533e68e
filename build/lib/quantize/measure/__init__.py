"""What an artefact is worth: perplexity and KL divergence to the base (llama.cpp's protocol), speed
(llama-bench semantics), lm-eval tasks, process memory."""
