"""What a LoRA did to the model, in words: matched and unmatched keys, modules covered, rank, scale."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from ..checks import real_number

_INDEX = re.compile(r"(?<=[._])\d+(?=[._]|$)")
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)$")
MAX_GROUPS = 12  # unmatched-key groups listed in the text; the rest are counted
# |strength| a LoRA is applied with; beyond it the weights are ruined (a garbage image, or inf).
STRENGTH_LIMIT = 100.0


def lora_strength(value: object, name: str = "strength") -> float:
    """A LoRA strength: a finite number in [-STRENGTH_LIMIT, STRENGTH_LIMIT] (0 = not applied)."""
    return real_number(value, name, -STRENGTH_LIMIT, STRENGTH_LIMIT)


@dataclass(frozen=True)
class ModuleHit:
    component: str  # "transformer" / "text encoder"
    module: str  # our module, e.g. "layers.3.attention.qkv"
    part: str  # "q"/"k"/"v" for a slice of the fused qkv, else ""
    form: str  # LoRA / LoHa / LoKr / diff (+DoRA)
    rank: int | None
    alpha: float | None
    scale: float  # alpha / rank as the adapter applies it
    keys: int  # file keys consumed
    dialect: str


def _pattern(key: str) -> str:
    """A key's module with block numbers as N: the unit unmatched keys are grouped by."""
    from .forms import split_key

    split = split_key(key)
    return _INDEX.sub("N", split[0] if split is not None else key)


def _ranges(indices: set[int]) -> str:
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [i]
    if run:
        out.append(f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


@dataclass
class LoraReport:
    """Filled by `plan_lora`; `text(strength_model, strength_clip)` is what the node shows and logs."""

    name: str = ""
    total_keys: int = 0
    hits: list[ModuleHit] = field(default_factory=list)
    unmatched: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # reason → keys
    notes: list[str] = field(default_factory=list)  # added by the host (e.g. fp8 re-quantization bound)

    def add_hit(self, hit: ModuleHit) -> None:
        self.hits.append(hit)

    def add_unmatched(self, keys, reason: str) -> None:
        self.unmatched[reason].extend(keys)

    @property
    def matched_keys(self) -> int:
        return sum(h.keys for h in self.hits)

    @property
    def unmatched_keys(self) -> int:
        return sum(len(v) for v in self.unmatched.values())

    def unmatched_reasons(self) -> list[str]:
        return list(self.unmatched)

    def first_shape_problem(self) -> str:
        return next((r for r in self.unmatched if r.startswith("shape ")), "")

    def only_unknown_forms(self) -> bool:
        return set(self.unmatched) <= {"not a LoRA weight (unknown key form)"}

    def components(self) -> Counter:
        return Counter(h.component for h in self.hits)

    def _coverage(self, component: str) -> list[str]:
        """'attention.qkv (q,k,v) in layers 0-29, noise_refiner 0-1 …' lines: what was patched where."""
        by_kind: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        parts: dict[str, set[str]] = defaultdict(set)
        other: set[str] = set()
        for h in self.hits:
            if h.component != component:
                continue
            m = _BLOCK.match(h.module)
            if m is None:
                other.add(h.module)
                continue
            by_kind[m.group(3)][m.group(1)].add(int(m.group(2)))
            if h.part:
                parts[m.group(3)].add(h.part)
        lines = []
        for kind in sorted(by_kind):
            where = "; ".join(f"{blocks} {_ranges(idx)}" for blocks, idx in sorted(by_kind[kind].items()))
            label = kind + (f" ({','.join(sorted(parts[kind], key='qkv'.index))} rows)" if parts[kind] else "")
            lines.append(f"{label}: {where}")
        if other:
            lines.append(", ".join(sorted(other)))
        return lines

    def text(self, strength_model: float = 1.0, strength_clip: float = 1.0) -> str:
        strength_model = lora_strength(strength_model, "strength_model")
        strength_clip = lora_strength(strength_clip, "strength_clip")
        lines = [f"LoRA {self.name}"]
        dialects = Counter(h.dialect for h in self.hits)
        forms = Counter(h.form for h in self.hits)
        if dialects:
            lines.append("dialect: " + ", ".join(d for d, _ in dialects.most_common())
                         + "; form: " + ", ".join(f for f, _ in forms.most_common()))
        lines.append(f"keys matched: {self.matched_keys} of {self.total_keys}; not matched: {self.unmatched_keys}")
        for component, strength in (("transformer", strength_model), ("text encoder", strength_clip)):
            hits = [h for h in self.hits if h.component == component]
            if not hits:
                continue
            weights = len({h.module for h in hits})
            lines.append(f"{component}: {weights} weights patched ({len(hits)} modules), strength {_fmt(strength)}"
                         + (" (strength 0: not applied)" if strength == 0 else ""))
            lines += [f"  {line}" for line in self._coverage(component)]
            ranks = sorted({h.rank for h in hits if h.rank is not None})
            if ranks:
                lines.append("  rank " + (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"))
            scales = Counter(h.scale for h in hits)
            alphas = sorted({h.alpha for h in hits if h.alpha is not None})
            scale_text = ", ".join(f"{_fmt(s)} x {_fmt(strength)} = {_fmt(s * strength)}" + (
                f" ({n} modules)" if len(scales) > 1 else "") for s, n in scales.most_common())
            alpha_text = ("alpha " + ", ".join(_fmt(a) for a in alphas) + "; ") if alphas else "no alpha; "
            lines.append(f"  {alpha_text}effective scale (alpha/rank x strength): {scale_text}")
        if self.unmatched:
            lines.append(f"not matched ({self.unmatched_keys} keys, by reason; N = any block number):")
            budget = MAX_GROUPS  # module groups listed in all; each reason shows at least one
            for reason, keys in self.unmatched.items():
                lines.append(f"  {reason}:")
                groups = Counter(_pattern(k) for k in keys).most_common()
                take = max(1, budget)
                lines += [f"    {pattern} ({n} key{'s' if n != 1 else ''})" for pattern, n in groups[:take]]
                if len(groups) > take:
                    lines.append(f"    … and {len(groups) - take} more")
                budget -= min(take, len(groups))
        else:
            lines.append("not matched: none")
        lines += self.notes
        return "\n".join(lines)
