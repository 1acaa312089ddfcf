"""The trainer: train state, the one jitted step, the loop, checkpoints, metrics and the CLI.

    python -m jaxalign.train --config configs/dpo.py --workdir DIR --config.KEY=VALUE ...

Programmatic use: ``jaxalign.train.loop.train(config, workdir)`` with a config from
``jaxalign.train.config.base_config()`` (or a recipe's ``get_config()``). See README.md here.
"""
