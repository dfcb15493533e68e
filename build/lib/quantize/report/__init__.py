"""What a person reads: one run's report.md, and `quantize compare` across runs."""
