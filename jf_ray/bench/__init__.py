"""Benchmarks, one module each, behind ``jf-ray bench <decoders|collect|train|serve>`` (docs/benchmarking.md).

``common`` holds what every benchmark shares: the machine record written into each JSON report and the one
speed-up function. ``decoders`` times decoders side by side in one process (also the timing core of
``jf-ray eval`` and the job's evaluation), ``collect`` trajectory collection, ``train`` Ray Train throughput,
``serve`` the Serve app (or any OpenAI-compatible server) under a closed-loop HTTP load. Modules are imported
by their users, so that importing this package loads neither torch nor Ray.
"""
