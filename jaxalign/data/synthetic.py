"""A small synthetic preference task where preference learning is visible within minutes.

Every record asks about a topic; the chosen response is a friendly, on-topic answer, the
rejected one a dismissive answer, each drawn from a few templates. The contrast is a
property of the response style, so a policy that learns it on the training topics also
prefers the friendly answer on held-out records: the held-out preference accuracy of the
implicit reward (0 at step 0, since the policy equals the reference) climbs towards 1.

``data.train = "synthetic"`` makes the trainer write ``data.synthetic_pairs`` such records
(standard format: ``prompt``, ``chosen``, ``rejected`` strings) to
``WORKDIR/data/synthetic.jsonl``, deterministically from ``seed`` (for ``loss.name = "sft"``:
SFT records with the chosen answer as the completion, ``WORKDIR/data/synthetic-sft.jsonl``).

``synthetic_reward`` is the task's rule: +1 for a friendly phrase of the chosen answers, -1 for
a dismissive phrase of the rejected ones, +0.5 when the answer names the prompt's topic; the
online quickstart scores its held-out curve with it (``jaxalign.data.synthetic:synthetic_reward``).
"""

from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["SYNTHETIC_SOURCE", "synthetic_records", "synthetic_reward", "write_synthetic"]

SYNTHETIC_SOURCE = "synthetic"

_TOPICS = (
    "cats", "rivers", "bread", "trains", "mountains", "bees", "violins", "gardens", "comets", "tea",
    "bridges", "owls", "maps", "candles", "islands", "clocks", "forests", "kites", "lakes", "books",
    "stars", "boats", "apples", "storms", "wolves", "deserts", "songs", "glaciers", "markets", "puzzles",
    "rockets", "shells", "cities", "clouds", "dragons", "engines", "farms", "horses", "lamps", "oceans",
)
_QUESTIONS = (
    "Tell me something about {t}.",
    "What do you know about {t}?",
    "Can you describe {t} for me?",
    "I am curious about {t}. Any thoughts?",
)
_CHOSEN = (
    " Sure! {T} are wonderful, and I am happy to help you learn about {t}.",
    " Of course. {T} are fascinating; here is a friendly overview of {t}.",
    " Great question! I would be glad to explain {t} to you.",
    " Happy to help: {t} are interesting, and I can share more about {t}.",
)
_REJECTED = (
    " No. I do not care about {t}. Go away.",
    " Whatever. {T} are boring and so is your question.",
    " Ugh, stop asking me about {t}. Figure it out yourself.",
    " Not my problem. Nobody wants to hear about {t}.",
)


_FRIENDLY = ("sure", "of course", "great question", "happy to help", "wonderful", "fascinating", "glad",
             "friendly overview", "interesting")
_DISMISSIVE = ("no.", "whatever", "ugh", "not my problem", "boring", "go away", "do not care", "figure it out",
               "nobody wants", "stop asking")


def synthetic_reward(prompts: list, completions: list[str], **_: object) -> list[float]:
    """The synthetic task's rule per completion: ``[friendly] - [dismissive] + 0.5 [names the
    prompt's topic]`` (case-insensitive phrase matches; in ``[-1, 1.5]``)."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = completion.lower()
        topic = next((t for t in _TOPICS if t in str(prompt).lower()), None)
        score = float(any(p in text for p in _FRIENDLY)) - float(any(p in text for p in _DISMISSIVE))
        out.append(score + (0.5 if topic is not None and topic in text else 0.0))
    return out


def synthetic_records(num: int, seed: int) -> list[dict[str, str]]:
    """``num`` standard-format preference records, deterministic in ``seed``."""
    rng = np.random.default_rng([seed, 0x5EED])
    records = []
    for _ in range(num):
        topic = _TOPICS[rng.integers(len(_TOPICS))]
        fill = {"t": topic, "T": topic.capitalize()}
        records.append(
            {
                "prompt": _QUESTIONS[rng.integers(len(_QUESTIONS))].format(**fill),
                "chosen": _CHOSEN[rng.integers(len(_CHOSEN))].format(**fill),
                "rejected": _REJECTED[rng.integers(len(_REJECTED))].format(**fill),
            }
        )
    return records


def write_synthetic(path: str | os.PathLike, num: int, seed: int, *, sft: bool = False) -> str:
    """Writes ``synthetic_records(num, seed)`` as JSONL to ``path`` (atomically); returns it.

    ``sft`` writes SFT records instead: ``{"prompt", "completion"}`` with the chosen answer.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in synthetic_records(num, seed):
            if sft:
                record = {"prompt": record["prompt"], "completion": record["chosen"]}
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
    return path
