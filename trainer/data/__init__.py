"""Where prompts come from and how responses are scored: the tasks (`tasks`: the synthetic arithmetic task, JSONL
math datasets, the prompt stream) and the reward functions (`rewards`). The shipped MATH-style sample lives here
too (`math_sample.jsonl`)."""
