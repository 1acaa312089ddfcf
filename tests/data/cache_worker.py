"""One process of the shared-cache test: ``python cache_worker.py PORT PROCESS_ID DATA TOKENIZER CACHE OUT``.

Starts jax.distributed on 127.0.0.1 and builds this process's loaders as the trainer does
(process 0 writes the tokenized cache before a barrier, process 1 opens it after; process 1's
``write_store`` is replaced by one that fails, so that a second writer would be caught), then saves
its data fingerprint and first batches to OUT.
"""

from __future__ import annotations

import pickle
import sys

import jax

from jaxalign import parallel
from jaxalign.data import cache as cache_module, pipeline
from jaxalign.tokenizers import load_tokenizer
from jaxalign.train.config import base_config


def _refuse(*args, **kwargs):
    raise AssertionError("process 1 tried to write the cache")


def main() -> None:
    port, q, data, tokenizer_dir, cache, out = sys.argv[1:]
    q = int(q)
    parallel.initialize_distributed({"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": q,
                                     "initialization_timeout": 60, "heartbeat_timeout": 30})
    if q == 1:
        cache_module.write_store = _refuse
    config = base_config()
    config.data.update(train=data, cache_dir=cache, on_bad_record="skip", max_length=192, max_prompt_length=96,
                       buckets=(64, 128, 192), batch_size=4, eval_pairs=9)
    config.progress_bar = False
    loaders = pipeline.build_loaders_from_config(config, load_tokenizer(tokenizer_dir), shard_index=q, shard_count=2,
                                                 writer=q == 0, barrier=lambda: parallel.barrier("data-cache"))
    result = {"fingerprint": loaders.train.fingerprint, "batches": [next(loaders.train) for _ in range(3)],
              "mapped": type(loaders.train.examples.tokens).__name__}
    with open(f"{out}/process{q}.pkl", "wb") as f:
        pickle.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
