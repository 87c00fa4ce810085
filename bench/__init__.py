"""The benchmark suite of ``make bench``.

One module per benchmark (items of the benchmark issue): :mod:`bench.pipelined`
(1, a slot for the pipelined runtime), :mod:`bench.sampling_overhead` (2),
:mod:`bench.weight_sync` (3), :mod:`bench.reward_throughput` (4),
:mod:`bench.learner_batching` (5), :mod:`bench.scaling` (6, with the model in
:mod:`bench.pipeline_sim`) and :mod:`bench.gpu` (7). Shared pieces:
:mod:`bench.harness` (interleaved repeats, paired ratios, memory),
:mod:`bench.results` (the JSON schema), :mod:`bench.environment` (machine,
versions, date), :mod:`bench.report` (``docs/benchmarks.md``),
:mod:`bench.workload` and :mod:`bench.cluster` (models, groups, Ray and the
reward server). Run ``python -m bench --help``.
"""
