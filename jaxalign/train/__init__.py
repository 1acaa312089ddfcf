"""The trainer: builders, the one jitted step, the step runner, checkpoints, metrics and the CLI.

    python -m jaxalign.train --config configs/dpo.py --workdir DIR --config.KEY=VALUE ...

Programmatic use: ``jaxalign.train.loop.train(config, workdir)`` with a config from
``jaxalign.train.config.base_config()`` (or a recipe's ``get_config()``). Drivers compose
``jaxalign.train.build`` and ``jaxalign.train.runner.StepRunner``. See README.md here.
"""
