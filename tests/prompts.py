"""Prompts shared by the engine tests: varied lengths, languages and formats."""

SMOLLM_CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

VARIED_PROMPTS = [
    SMOLLM_CHAT.format("What is the capital of France?"),
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    ",
    "In 2024, the population of the city grew by 12345 people, which",
    "Les Misérables est un roman de Victor Hugo qui",
    "東京は日本の首都です。大阪は",
    "List three colors: red,",
    "Q: Why is the sky blue?\nA:",
]
