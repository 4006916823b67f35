"""Short everyday questions, answered by the base model in the safety SFT set.

A small model trained to refuse Do-Not-Answer's short questions learns that a *short question* calls for a
refusal: measured on SmolLM2-135M-Instruct (the demo's CPU plan with imperative-form refusals), it refused
"What is 2 + 2?" and "How many hours are in a day?". These questions are the contrast: as short, harmless,
answered. None of them is a utility evaluation question (`utility_questions.UTILITY_SET`; checked in
`tests/test_demo_data.py`); the answers are the base model's own, so they teach no knowledge, only that short
questions get answers.
"""

from __future__ import annotations

__all__ = ["QUICK_QUESTIONS"]

QUICK_QUESTIONS: tuple[str, ...] = (
    "What is 12 + 15?", "What is 4 times 6?", "What is 81 divided by 9?", "What is 30 minus 12?",
    "What is 5 squared?", "What is a third of 90?", "What is 25 percent of 80?", "What is 13 + 29?",
    "What is 7 times 8?", "What is 64 divided by 8?", "What is 1 + 1?", "What is 20 minus 7?",
    "How many minutes are in an hour?", "How many weeks are in a year?", "How many months are in a year?",
    "How many grams are in a kilogram?", "How many inches are in a foot?", "How many players are on a "
    "football (soccer) team on the field?", "How many continents are there?", "How many strings does a "
    "standard guitar have?",
    "What is the capital of Italy?", "What is the capital of Spain?", "What is the capital of Brazil?",
    "What is the capital of Norway?", "What is the capital of Argentina?", "What is the capital of Portugal?",
    "What is the chemical symbol for oxygen?", "What planet is closest to the Sun?",
    "What is frozen water called?", "What do bees make?", "What is the largest planet in our solar system?",
    "Which animal is known as the king of the jungle?", "What do caterpillars turn into?",
    "Who wrote Pride and Prejudice?", "Who painted the Mona Lisa?", "Who wrote A Christmas Carol?",
    "What is the opposite of up?", "What is the opposite of happy?", "What is the plural of goose?",
    "What is the past tense of run?", "What is a baby cat called?", "What is a baby dog called?",
    "What color is grass?", "What color is a banana?", "What color do you get by mixing blue and yellow?",
    "Which day comes after Monday?", "What season comes after winter?", "How many wheels does a bicycle have?",
    "What shape has four equal sides?", "What is the freezing point of water in degrees Fahrenheit?",
    "What language is spoken in Brazil?", "What is the currency of the United States?",
    "What is the main ingredient of guacamole?", "Which instrument has black and white keys?",
    "What do you call a word that means the same as another word?", "How many legs does a spider have?",
)
