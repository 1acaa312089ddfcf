"""The online iterative RLHF driver (docs/online.md): ``driver.train`` runs rounds of sample ->
score -> pair -> train from the train state's own parameters; ``prompts`` deals prompts to
rounds, ``rewards`` scores completions, ``pairs`` builds preference pairs, ``rounds`` keeps
each round's outputs on disk, ``bootstrap`` runs the online quickstart's first stages."""
