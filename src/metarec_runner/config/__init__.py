"""Every config value, checked in one place before torch, data or MLflow are touched.

:func:`check_config` runs at the top of every ``metarec train`` job
(:func:`metarec_runner.cli.train.train_job`), before the job imports torch or builds the dataset, so a
typo is reported in well under a second instead of after the data is loaded. It raises the first
problem as a one-line :class:`~metarec_runner.errors.ConfigError` that names the key as the user
types it (``algo.inner_lr``), the value, and the fix::

    algo.inner_lr: must be a number, got 'abc'; set algo.inner_lr to a positive number like 0.01

The schema is declarative: :data:`SCHEMA` maps each dotted key to a :class:`Spec` (its type,
range or choices, whether ``null`` is allowed, and an example value for the hint). A key is
checked only when the composed config has it (the options of a group have different keys), and
keys the schema does not know are left to the classes that take them. :data:`RULES` are the
checks that relate several keys (a contradictory ``trainer.monitor_mode``, support and query
sizes that no task allowed by ``splitter.min_interactions`` can hold, ...): a rule that involves
several keys blames the one the user typed on the command line.

The module imports OmegaConf, the standard library and the torch-free
:mod:`metarec_runner.evaluate.metric_specs` only. Choices that the runtime modules define
(protocols, relevance rules, losses, ...) are restated here and compared with theirs by
``tests/test_config_checks.py``.
"""
