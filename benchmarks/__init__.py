"""The zoo's benchmark suite: ``python -m benchmarks all`` (or ``make bench``).

Subcommands ``kernel``, ``model``, ``decode``, ``compile``, ``export`` and ``all`` each measure one
area side by side with NX-AI's PyTorch reference where there is one, write every figure into
``benchmarks/results/bench.json`` and PNG plots next to it, and print a table of the targets
(met / missed with the measured ratio). ``cells.py`` and ``export.py`` also run standalone.
"""
