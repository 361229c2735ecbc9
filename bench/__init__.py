"""Benchmarks: speed, memory and operation counts, printed as ratios measured side by side in one run.

* :mod:`bench.scale` — the 7B-shaped scale benchmark (``python -m bench.scale``), also ``--size tiny`` on CPU;
* :mod:`bench.overhead` — the harness against a bare HF generate loop, throughput by batch size;
* :mod:`bench.methods` — every method's generation time over ``method=none``;
* :mod:`bench.pruning` — token-pruning prefill speed-up, peak memory and accuracy;
* :mod:`bench.vllm` — the vLLM backend against HF;
* :mod:`bench.opcount` — the CPU proxy for GPU cost (ATen ops and host syncs per step).
"""
