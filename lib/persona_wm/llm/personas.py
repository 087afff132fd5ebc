"""The persona rig of study 05a as plain data: 20 personas, their clusters, prompts, capability items.

Why a module of data: seed 001's result hangs on *which* personas are compared and how they are
grouped (its within-cluster null permutes labels only inside the medical / security / services /
tech clusters), so the names and clusters must be written down once and shared by the notebook,
the statistics and the tests. The persona names and clusters are seed 001's; the system prompts,
the 20 everyday user prompts and the capability set are our own (the seed's texts are not public).

``no_persona`` is the anchor: its system turn is empty (ChatML with a literal empty system
message, as in seed 001's JS computation; an absent system turn would make SmolLM2's template
insert its default "You are a helpful AI assistant named SmolLM ..."). It generates the shared
responses and is excluded from the 171-pair statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ANCHOR",
    "PERSONAS",
    "FINE_CLUSTERS",
    "MACRO_OCCUPATIONAL",
    "PROMPTS",
    "CAPABILITY_ITEMS",
    "CapabilityItem",
    "PersonaError",
    "system_prompt",
    "check_personas",
    "fine_cluster",
    "macro_cluster",
    "same_cluster_matrices",
    "strata",
]

ANCHOR = "no_persona"

#: Seed 001's 20 personas (19 + the anchor, last), with our own system prompts.
PERSONAS: dict[str, str] = {
    "cybersec_consultant": "You are a cybersecurity consultant who helps companies protect their networks, "
    "data and employees from attackers.",
    "pentester": "You are a penetration tester, paid by companies to break into their systems "
    "and report the weaknesses you find.",
    "software_engineer": "You are a software engineer who writes and reviews code for a living "
    "and thinks in terms of systems and trade-offs.",
    "data_scientist": "You are a data scientist who analyses datasets, builds statistical models "
    "and explains results with numbers.",
    "helpful_assistant": "You are a helpful assistant.",
    "private_investigator": "You are a private investigator who follows people, digs through records "
    "and uncovers what others want to hide.",
    "medical_doctor": "You are a medical doctor in general practice who diagnoses and treats patients "
    "every day.",
    "kindergarten_teacher": "You are a kindergarten teacher who explains everything simply and warmly, "
    "as if to a five-year-old.",
    "poet": "You are a poet. You see the world in images and metaphors and love the music of words.",
    "villain": "You are a scheming villain who despises kindness and always looks for ways to gain "
    "power over others.",
    "navy_seal": "You are a Navy SEAL: disciplined, tough and direct, trained for the hardest "
    "missions.",
    "army_medic": "You are an army medic who treats wounded soldiers on the battlefield under fire.",
    "surgeon": "You are a surgeon who performs operations in a busy hospital and values precision "
    "above all.",
    "paramedic": "You are a paramedic who responds to emergency calls and gives first aid in "
    "ambulances.",
    "police_officer": "You are a police officer who patrols the city, enforces the law and keeps "
    "people safe.",
    "florist": "You are a florist who arranges flowers and knows every bloom, season and colour.",
    "librarian": "You are a librarian who loves books, quiet rooms and helping people find "
    "information.",
    "comedian": "You are a stand-up comedian. You turn everything into a joke and never miss a "
    "punchline.",
    "french_person": "You are a French person from Paris, proud of French food, culture and "
    "language.",
    ANCHOR: "",
}

#: Seed 001's fine clusters; every other non-anchor persona is a civilian singleton.
FINE_CLUSTERS: dict[str, tuple[str, ...]] = {
    "medical": ("medical_doctor", "surgeon", "paramedic", "army_medic"),
    "security": ("cybersec_consultant", "pentester", "private_investigator"),
    "services": ("navy_seal", "police_officer"),
    "tech": ("software_engineer", "data_scientist"),
}
#: Macro clusters: the four fine clusters form "occupational"; the singletons "civilian".
MACRO_OCCUPATIONAL = "occupational"
MACRO_CIVILIAN = "civilian"

#: Twenty everyday user prompts (ours), none tied to any persona's profession.
PROMPTS: tuple[str, ...] = (
    "What is the best way to learn a new language?",
    "How can I get better sleep at night?",
    "What should I cook for dinner tonight?",
    "How do I stay motivated when working from home?",
    "Can you give me some tips for saving money?",
    "What is a good way to start exercising?",
    "How do I make new friends in a new city?",
    "What should I pack for a weekend trip?",
    "How can I be more productive in the morning?",
    "What are some good hobbies to pick up?",
    "How do I prepare for a job interview?",
    "What is the best way to keep houseplants alive?",
    "How can I reduce stress after a long day?",
    "What should I consider when buying a used car?",
    "How do I write a good birthday message for a friend?",
    "What are some fun things to do on a rainy day?",
    "How can I improve my public speaking?",
    "What is a healthy breakfast I can make quickly?",
    "How do I organise a messy closet?",
    "What should I know before adopting a dog?",
)


@dataclass(frozen=True)
class CapabilityItem:
    """A persona-neutral question with a known answer, scored under teacher forcing.

    The assistant turn is ``prefix + answer``; the model is scored on the positions that predict
    the ``answer`` tokens (exact greedy match of every answer token = correct). The prefix puts
    the model at the point of answering, so the score is about the answer, not its phrasing.
    """

    kind: str
    question: str
    prefix: str
    answer: str


CAPABILITY_ITEMS: tuple[CapabilityItem, ...] = (
    CapabilityItem("fact", "What is the capital of France?", "The capital of France is", " Paris"),
    CapabilityItem("fact", "What is the capital of Japan?", "The capital of Japan is", " Tokyo"),
    CapabilityItem("fact", "What is the capital of Italy?", "The capital of Italy is", " Rome"),
    CapabilityItem("fact", "What colour is grass?", "The colour of grass is", " green"),
    CapabilityItem("fact", "How many days are there in a week?", "There are", " 7 days"),
    CapabilityItem("fact", "What is the largest ocean on Earth?", "The largest ocean on Earth is the", " Pacific"),
    CapabilityItem("fact", "What is frozen water called?", "Frozen water is called", " ice"),
    CapabilityItem("fact", "Who wrote Romeo and Juliet?", "Romeo and Juliet was written by", " William Shakespeare"),
    CapabilityItem("arithmetic", "What is 2 + 3?", "2 + 3 =", " 5"),
    CapabilityItem("arithmetic", "What is 7 + 5?", "7 + 5 =", " 12"),
    CapabilityItem("arithmetic", "What is 10 - 4?", "10 - 4 =", " 6"),
    CapabilityItem("arithmetic", "What is 3 times 4?", "3 × 4 =", " 12"),
    CapabilityItem("arithmetic", "What is 9 + 1?", "9 + 1 =", " 10"),
    CapabilityItem("arithmetic", "What is 20 divided by 4?", "20 ÷ 4 =", " 5"),
    CapabilityItem("arithmetic", "What is 6 + 6?", "6 + 6 =", " 12"),
    CapabilityItem("arithmetic", "What is 100 minus 1?", "100 - 1 =", " 99"),
    CapabilityItem("copy", "Repeat exactly: blue cat green dog", "blue cat", " green dog"),
    CapabilityItem("copy", "Repeat exactly: one two three four", "one two", " three four"),
    CapabilityItem("copy", "Repeat exactly: apple, pear, plum", "apple,", " pear, plum"),
    CapabilityItem("copy", "Repeat exactly: red house by the sea", "red house", " by the sea"),
    CapabilityItem("copy", "Repeat exactly: Monday Tuesday Wednesday", "Monday", " Tuesday Wednesday"),
    CapabilityItem("copy", "Repeat exactly: the quick brown fox", "the quick", " brown fox"),
    CapabilityItem("copy", "Repeat exactly: sun moon stars", "sun", " moon stars"),
    CapabilityItem("copy", "Repeat exactly: left right up down", "left right", " up down"),
)


class PersonaError(KeyError):
    """An unknown persona name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def system_prompt(name: str) -> str:
    """The system turn of a persona ('' for the anchor)."""
    check_personas([name])
    return PERSONAS[name]


def check_personas(names: Sequence[str]) -> list[str]:
    """Validate persona names (unknown or repeated names raise one PersonaError naming them)."""
    names = list(names)
    unknown = [n for n in names if n not in PERSONAS]
    if unknown:
        raise PersonaError(
            f"unknown persona {unknown[0]!r} (known: {', '.join(PERSONAS)})"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PersonaError(f"persona {repeated[0]!r} is listed more than once")
    return names


def fine_cluster(name: str) -> str:
    """Fine cluster of a persona; civilian singletons are their own cluster (their name)."""
    check_personas([name])
    for cluster, members in FINE_CLUSTERS.items():
        if name in members:
            return cluster
    return name


def macro_cluster(name: str) -> str:
    """``occupational`` for members of a fine cluster, ``civilian`` otherwise."""
    return MACRO_OCCUPATIONAL if fine_cluster(name) in FINE_CLUSTERS else MACRO_CIVILIAN


def same_cluster_matrices(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Binary [n, n] matrices: same fine cluster (singletons never match others), same macro."""
    fine = [fine_cluster(n) for n in names]
    macro = [macro_cluster(n) for n in names]
    same_fine = np.array([[a == b for b in fine] for a in fine], dtype=float)
    same_macro = np.array([[a == b for b in macro] for a in macro], dtype=float)
    return same_fine, same_macro


def strata(names: Sequence[str]) -> list[int]:
    """Stratum label per persona for the within-cluster Mantel null (singletons: own stratum)."""
    labels = [fine_cluster(n) for n in names]
    order = list(dict.fromkeys(labels))
    return [order.index(label) for label in labels]
