"""A reward the tiny random-init model can learn in a few GRPO steps on the CPU (tests/recipes/tiny-grpo.yaml)."""


def letter_a(completions, **kwargs):
    """The share of the completion's characters that are the letter a."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [text.count("a") / max(1, len(text)) for text in texts]
