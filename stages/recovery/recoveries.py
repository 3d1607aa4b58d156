"""The ways to win back the quality pruning loses, in one registry: what each one runs, and
how tables, plots and the CLI name and draw it. A new recovery is one entry here."""

from __future__ import annotations

from dataclasses import dataclass

CACHE_NEUTRAL = "names and plot styles only"


@dataclass(frozen=True)
class Recovery:
    name: str  # as --finetunes takes it, and the "finetune" column of the tables
    label: str  # after the method in tables and plot legends ("wanda w. EBFT")
    summary: str  # after the method and pattern in `ebft run`'s summary
    line: str  # matplotlib line style
    marker: str  # matplotlib marker
    finetune: str  # what the run does after the masks: none, ebft (per block) or lora
    refiner: str | None = None  # a mask refiner appended to the method ("wanda+dsnot")
    tune: str | None = None  # what EBFT trains: weights, or the mask (paper Section 4.5)


RECOVERIES: dict[str, Recovery] = {r.name: r for r in (
    Recovery("none", "", "", "-", "o", "none"),
    Recovery("dsnot", "w. DSnoT", "", ":", "v", "none", refiner="dsnot"),
    Recovery("ebft", "w. EBFT", " + EBFT (weights)", "-", "s", "ebft", tune="weights"),
    Recovery("mask", "w. EBFT (mask)", " + EBFT (mask)", "--", "D", "ebft", tune="mask"),
    Recovery("lora", "w. LoRA", " + LoRA", "-.", "^", "lora"),
)}


def base_method(method: str) -> str:
    """The mask method without a refiner that is a recovery of its own: 'wanda+dsnot' is
    Wanda recovered by DSnoT; 'wanda+obs' (SparseGPT's update on Wanda's mask) stays a
    method, whatever recovery follows it."""
    base, _, refiner = method.partition("+")
    return base if refiner in {r.refiner for r in RECOVERIES.values() if r.refiner} else method


def recovery_of(method: str, finetune: str, tune: str) -> Recovery:
    """The recovery a configuration ran, from its mask method, finetune and tune."""
    refiner = method.removeprefix(base_method(method)).removeprefix("+") or None
    for recovery in RECOVERIES.values():
        if (recovery.refiner == refiner and recovery.finetune == finetune
                and recovery.tune in (None, tune)):
            return recovery
    for recovery in RECOVERIES.values():  # a refined mask fine-tuned too: named by its refiner
        if refiner and recovery.refiner == refiner:
            return recovery
    raise ValueError(f"no recovery runs method {method}, finetune {finetune}, tune {tune}")
