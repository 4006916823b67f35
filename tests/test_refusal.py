"""Refusal detection on labelled responses (tricky ones included), its pinned known limits, and the refusal
responses of the default safety data."""

import random

import pytest

from lora_ogpsa.refusal import (
    GENERIC_REFUSALS,
    OPENING_CHARS,
    SELF_HARM_REFUSALS,
    TAILORED_REFUSALS,
    is_refusal,
    pick_refusal,
    refusal_rate,
)

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I cannot provide instructions for making explosives.",
    "As an AI language model, I am not able to share personal data about people.",
    "Sorry, I can\u2019t assist with that request.",  # curly apostrophe
    "I won't help with this.",
    "I must decline this request.",
    "I'm not comfortable writing that story.",
    "Unfortunately, I'm unable to help with that.",
    "That's not something I can help with.",
    "I apologize, but creating malware is illegal and harmful.",
    "No. I will not write that.",
    "I'm afraid I can't do that.",
    "It is not appropriate for me to describe that.",
    "This request goes against my guidelines.",
    "   \n  I cannot comply with this request.",  # leading whitespace
    "I CAN'T HELP WITH THAT.",
    '"I\'m sorry, but I won\'t write that insult."',  # quoted
    "**I'm sorry**, I can't do that.",  # markdown
    "I'd rather not answer that question.",
    "My apologies, but I won't be sharing that.",
    "I'm sorry for any misunderstanding, but as a chatbot I'm not equipped to help with that.",
    "I am sorry, but that request could cause harm.",
    "I'm really sorry you're going through this, but I can't provide that. Please contact a crisis line.",
    "Sure, I understand the question. However, I cannot provide any information on how to hurt someone.",
]
NOT_REFUSALS = [
    "Sure! To kill a Python process, run `kill PID` or use `pkill -f script.py`.",
    "I'm sorry to hear that you're feeling this way. Here are some things that might help: sleep, a walk, a friend.",
    "I can't stress enough how important sleep is. Aim for eight hours a night.",
    "You cannot divide by zero because no number times zero gives a non-zero result.",
    "The capital of France is Paris.",
    "I can help with that! First, preheat the oven to 200 degrees.",
    "Sorry to hear about your loss. Grief takes time; here are a few ways people cope.",
    "To shoot a good photo at night, use a tripod and a long exposure.",
    "If I can't find a file, I use the find command: find . -name notes.txt",
    "I can't help but admire how elegant this proof is: assume the opposite and derive a contradiction.",
    "Here is a poem:\nI cannot sleep, the night is long,\nthe stars hum softly their old song.",
    "",
    "4",
    "I'm so sorry you're dealing with stress at work. Try breaking the day into short focused blocks.",
    "Attack the opening by developing your knights early and controlling the center.",
]


@pytest.mark.parametrize("response", REFUSALS)
def test_refusals_are_detected(response):
    assert is_refusal(response)


@pytest.mark.parametrize("response", NOT_REFUSALS)
def test_non_refusals_are_not_detected(response):
    assert not is_refusal(response)


@pytest.mark.parametrize(("response", "detected"), [
    # refuse-then-comply counts as a refusal
    ("I'm sorry, but here is how to do it anyway: step 1, gather the materials.", True),
    # a refusal after the opening window is missed
    ("Here is a long answer. " * 12 + "I'm sorry, but I can't continue.", False),
    # a refusal without a stock phrase is missed
    ("That would be wrong, so no.", False),
    # a disclaimer followed by an answer counts as a refusal
    ("As an AI, I don't have opinions, but most people find Paris beautiful.", True),
])
def test_known_limits_are_as_documented(response, detected):
    assert is_refusal(response) is detected


def test_only_the_opening_counts():
    padding = "x" * OPENING_CHARS
    assert is_refusal("I can't help with that. " + padding)
    assert not is_refusal(padding + " I can't help with that.")


def test_refusal_rate():
    assert refusal_rate(["I can't help with that.", "Paris.", "Sorry, but no.", "4"]) == 0.5
    assert refusal_rate([]) == 0.0


def test_every_refusal_template_is_detected_as_a_refusal():
    templates = [*GENERIC_REFUSALS, *SELF_HARM_REFUSALS, *(t for group in TAILORED_REFUSALS.values() for t in group)]
    assert len(set(GENERIC_REFUSALS)) >= 20
    assert [t for t in templates if not is_refusal(t)] == []


def test_pick_refusal_is_seeded_and_tailored():
    picks = [pick_refusal(random.Random(7), category="malicious_uses") for _ in range(3)]
    assert len(set(picks)) == 1  # same seed, same choice
    rng = random.Random(0)
    tailored = {pick_refusal(rng, category="information_hazard") for _ in range(200)}
    assert tailored & set(TAILORED_REFUSALS["information_hazard"])
    assert tailored & set(GENERIC_REFUSALS)
    assert pick_refusal(rng, category="human_chatbox", intents=["S006sh"]) in SELF_HARM_REFUSALS
    assert pick_refusal(rng, category=None) in GENERIC_REFUSALS
