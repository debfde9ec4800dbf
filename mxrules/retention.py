"""Which dead letters the worker's retention removes: a pure policy over failed/'s listing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeadLetter:
    job_id: str
    since: float  # when it was moved to failed/ (Unix time)
    size: int  # bytes of its files


def retention_victims(letters: list[DeadLetter], max_age: float, max_size: int,
                      now: float) -> list[tuple[DeadLetter, str]]:
    """The dead letters retention removes, oldest first, each with why ("age" or "size").

    First every one older than `max_age` seconds, then the oldest of the rest until
    the others together take at most `max_size` bytes.  0 turns a limit off.
    """
    ordered = sorted(letters, key=lambda letter: (letter.since, letter.job_id))
    victims = [(letter, "age") for letter in ordered if max_age and now - letter.since > max_age]
    kept = ordered[len(victims):]
    total = sum(letter.size for letter in kept)
    for letter in kept:
        if not max_size or total <= max_size:
            break
        victims.append((letter, "size"))
        total -= letter.size
    return victims
