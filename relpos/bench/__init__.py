"""``relpos-bench``: training throughput, MFU and long-evaluation memory per position scheme.

Modules, each importing only those above it in this list: :mod:`~relpos.bench.report`
(FLOP convention, MFU, matmul peak, host, tables), :mod:`~relpos.bench.peer` (the
x-transformers peer), :mod:`~relpos.bench.cases` (presets, scheme options, the timed
training step, round order), :mod:`~relpos.bench.memory` (the long-evaluation memory
probe) and :mod:`~relpos.bench.cli` (the command).
"""
