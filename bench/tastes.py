"""Taste profiles of simulated users: the true thumbs-up rate of each combination of style traits (bullet
points, a risk note, over-terse, plain language). Shared by `make demo` (bench/demo.py, users judging the
text they get) and the multi-round loop benchmark (bench/search_loop.py, users judging a version's traits)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

SEED_RATE = 0.60  # thumbs-up rate of the seed prompt, for every profile
TRAIT_NAMES = ("bullets", "risk", "concise", "plain")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    effects: dict[str, float]  # points added by each trait
    pairs: dict[frozenset[str], float] = field(default_factory=dict)  # points added when both traits are there

    def rate(self, traits: set[str]) -> float:
        r = SEED_RATE + sum(self.effects.get(t, 0.0) for t in traits)
        r += sum(v for pair, v in self.pairs.items() if pair <= traits)
        return min(0.95, max(0.05, r))

    def best(self) -> tuple[set[str], float]:
        combos = [set(c) for k in range(len(TRAIT_NAMES) + 1) for c in itertools.combinations(TRAIT_NAMES, k)]
        top = max(combos, key=self.rate)
        return top, self.rate(top)

    def reachable(self, points: float) -> bool:
        """Whether some combination is at least `points` above the seed."""
        return self.best()[1] >= SEED_RATE + points - 1e-9


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "demo",
            "bullet points +15 pts, risk note +12, over-terse -5, plain language 0 (the demo's default users)",
            {"bullets": 0.15, "risk": 0.12, "concise": -0.05},
        ),
        Profile(
            "last-trait",
            "plain language +12 pts (the trait the generator lists last); bullets -3, risk note -2, over-terse -5",
            {"plain": 0.12, "bullets": -0.03, "risk": -0.02, "concise": -0.05},
        ),
        Profile(
            "pair",
            "bullet points with a risk note +12 pts together, either alone 0; over-terse -3, plain language 0",
            {"concise": -0.03},
            {frozenset({"bullets", "risk"}): 0.12},
        ),
        Profile(
            "nothing",
            "nothing beats the seed: bullets -2 pts, risk note -1, over-terse -4, plain language -2",
            {"bullets": -0.02, "risk": -0.01, "concise": -0.04, "plain": -0.02},
        ),
    )
}
