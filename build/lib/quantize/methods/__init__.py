"""How to make it: one module per method, and what they share.

    configs.py      each method's recipe settings (pydantic; no torch)
    registry.py     method name → the module that builds it
    int8.py rtn.py gptq.py awq.py gguf.py      the methods: build(config, base, out_dir, calib, calib_info) -> dict
    engine.py       streamed layer-by-layer calibration (one decoder layer in memory at a time)
    statistics.py   per-linear input statistics: GPTQ's Hessian, llama.cpp's importance matrix (Σx²)
    grids.py        integer grids: scale/zero per group, rounding, the mse observer
    weight_only.py  group sizes, the per-linear solve loop and the writers shared by RTN, GPTQ and AWQ
"""
