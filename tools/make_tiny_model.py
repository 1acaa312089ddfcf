"""Write a tiny randomly initialised Hugging Face checkpoint plus a tokenizer to a local directory.

    python tools/make_tiny_model.py OUT_DIR [--family llama|qwen2|mistral|gpt2]
        [--tokenizer bpe|qwen] [--hidden 64] [--layers 2] [--heads 4] [--kv-heads N]
        [--rope-scaling llama3|linear] [--attention-bias] [--tied] [--sliding-window W]
        [--seed 0] [--overwrite]

The result loads with ``jaxalign.models.from_pretrained(OUT_DIR)`` and with
``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys

from jaxalign.models.config import FAMILIES
from jaxalign.models.tiny import TOKENIZERS, write_tiny_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", help="directory to write (must not already hold a checkpoint unless --overwrite)")
    p.add_argument("--family", choices=FAMILIES, default="llama")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="bpe",
                   help="bpe: small trained byte-level BPE (default); qwen: the real Qwen2.5 vocabulary (151k rows)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: heads // 2; gpt2: heads)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 2x hidden; gpt2: 4x)")
    p.add_argument("--max-position", type=int, default=512)
    p.add_argument("--rope-scaling", choices=("llama3", "linear"), default=None)
    p.add_argument("--attention-bias", action="store_true", help="q/k/v/o biases (llama only)")
    p.add_argument("--tied", action="store_true", help="tie input and output embeddings")
    p.add_argument("--sliding-window", type=int, default=None, help="attention window (mistral only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in out_dir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        out = write_tiny_checkpoint(
            a.out_dir, family=a.family, tokenizer=a.tokenizer, seed=a.seed, overwrite=a.overwrite,
            hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads,
            intermediate_size=a.intermediate, max_position=a.max_position, rope_scaling=a.rope_scaling,
            attention_bias=a.attention_bias, tie_embeddings=a.tied, sliding_window=a.sliding_window,
        )
    except FileExistsError as e:
        print(f"make_tiny_model: error: {e} (command line: --overwrite)", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"make_tiny_model: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a tiny {a.family} checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
