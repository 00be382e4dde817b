"""The Ray-free core of training: the optimisation step, checkpoints, metrics sinks and validation.

``mpalign.train`` (the Ray Train entry point), ``tune/sweep_alpha.py`` and ``benchmarks/bench_train_step.py`` all run
the step defined here, so a benchmark on a machine without Ray times exactly what a training worker executes.
Nothing in this package imports Ray.
"""
