"""The dynamic-expansion schedule: which per-layer attention multipliers come next, and when.

A schedule is a list of stages `(factor, layers)`: at each plateau (or forced `--expand-at` step) the next
stage multiplies the current multiplier of `layers` by `factor`. The default "4:all,2:0-2" ends at the
reference's (8, 8, 8, 4, ..., 4) on a 12-layer encoder — the paper's final multipliers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Stage = tuple[int, tuple[int, ...] | None]  # None: all layers


def _parse_layers(text: str) -> tuple[int, ...] | None:
    if text == "all":
        return None
    layers: list[int] = []
    for part in text.split("+"):
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if hi < lo:
                raise ValueError(f"empty layer range {part!r}")
            layers.extend(range(lo, hi + 1))
        else:
            layers.append(int(part))
    if min(layers) < 0:
        raise ValueError(f"negative layer index in {text!r}")
    return tuple(sorted(set(layers)))


def parse_expansions(text: str) -> list[Stage]:
    """'4:all,2:0-2' -> [(4, None), (2, (0, 1, 2))]; '' -> []."""
    stages: list[Stage] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            factor_s, layers_s = item.split(":", 1)
            factor = int(factor_s)
            layers = _parse_layers(layers_s.strip())
        except ValueError as e:
            raise ValueError(f"bad stage {item!r} (want FACTOR:LAYERS, e.g. 4:all or 2:0-2): {e}") from e
        if factor < 2:
            raise ValueError(f"bad stage {item!r}: the factor must be >= 2")
        stages.append((factor, layers))
    return stages


def format_stage(stage: Stage) -> str:
    factor, layers = stage
    return f"{factor}:{'all' if layers is None else '+'.join(map(str, layers))}"


@dataclass
class ExpansionSchedule:
    stages: list[Stage]
    done: int = 0  # stages already applied; the only state a checkpoint needs

    @classmethod
    def parse(cls, text: str) -> ExpansionSchedule:
        return cls(parse_expansions(text))

    def exhausted(self) -> bool:
        return self.done >= len(self.stages)

    def check_layers(self, num_layers: int) -> None:
        for stage in self.stages:
            if stage[1] is not None and max(stage[1]) >= num_layers:
                raise ValueError(f"stage {format_stage(stage)} names a layer >= {num_layers} (the model's layer count)")

    def next_multipliers(self, current: Sequence[int]) -> list[int]:
        """The per-layer multipliers after the next stage (does not advance the schedule)."""
        if self.exhausted():
            raise RuntimeError("the expansion schedule is exhausted")
        factor, layers = self.stages[self.done]
        chosen = range(len(current)) if layers is None else layers
        out = list(current)
        for i in chosen:
            out[i] *= factor
        return out

    def advance(self) -> None:
        self.done += 1

    def state_dict(self) -> dict:
        return {"done": self.done}

    def load_state_dict(self, state: dict) -> None:
        done = state["done"]
        if type(done) is not int or not 0 <= done <= len(self.stages):
            raise ValueError(f"expansion_schedule done {done!r}: the schedule has {len(self.stages)} stages")
        self.done = done
