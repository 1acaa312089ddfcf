"""The command-line sampler: completions for a file of prompts, from a checkpoint or a run.

Sampling
--------

    python -m jaxalign.sample --model PATH --prompts FILE --output OUT.jsonl \\
        [--num-samples 1] [--max-new-tokens 128] [--temperature 1.0] [--top-p 1.0] [--top-k 0] \\
        [--seed 0] [--batch-size 16] [--dtype float32|bfloat16] \\
        [--mesh-data -1 --mesh-fsdp 1 --mesh-tensor 1] [--prompt-key prompt] [--tokenizer DIR]

* ``PATH``: a Hugging Face checkpoint directory (``config.json`` + safetensors), or a run
  directory written by ``python -m jaxalign.train``: the policy of its newest usable
  checkpoint (only ``state.params["model"]`` is read, checked against the saved checksums),
  or its ``export/`` when it has no checkpoint. The architecture and tokenizer come from the
  run's ``model.path`` / ``model.tokenizer`` (``jaxalign.sample.load``).
* ``FILE``: anything the data pipeline reads (``.jsonl``, ``.jsonl.gz``, ``.parquet``):
  prompt-only records (``{"prompt": "text"}`` or ``{"prompt": [messages]}``; ``--prompt-key``
  names another key), or preference / SFT records (their prompt). Message lists go through
  the tokenizer's chat template (with the generation prompt); BOS as in training.
* Stops at the tokenizer's EOS, the chat template's end-of-turn token (``<|im_end|>``,
  ``<|eot_id|>``, ...) and the model config's ``eos_token_id``; the stop token counts in
  ``tokens`` and ``logps`` but is not in the completion text.
* ``OUT.jsonl``: one line per prompt, in input order: ``{"index", "prompt" (as given),
  "completions": [text, ...], "tokens": [count, ...], "finish_reasons": ["stop" | "length",
  ...], "logps": [summed log-prob of each completion under the model, ...]}``. It is written
  to ``OUT.jsonl.tmp-<pid>`` and renamed at the end: a killed run leaves no complete-looking
  file. A progress bar (stderr) shows prompts and tokens/s; a summary line ends the run.
* Sampling is ``jaxalign.sampling.sample``: sample ``s`` of prompt ``i`` depends only on
  ``(seed, i, s)``; ``--temperature 0`` is greedy. Prompts are padded to buckets of powers of
  two up to the model's context. Parameters are placed on the ``(data, fsdp, tensor)`` mesh
  as in training. One process (no multi-host sampling from this command).
* Exit codes: 0 done; 2 bad input, with one line on stderr: a missing model directory or
  ``config.json``, a missing or empty prompts file, a malformed record (``file:line``), a
  prompt that with ``--max-new-tokens`` exceeds the model's context (``file:line`` and both
  numbers), an unknown option or an out-of-range value.
"""

from jaxalign.sample.cli import main

__all__ = ["main"]
