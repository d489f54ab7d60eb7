"""The weight forms a LoRA file stores per module (LoRA, LoHa, LoKr, diffs) and what each one's tensors say.

Pure key and shape logic: which key suffixes belong to which form, the rank, the alpha/rank scale the
form applies (as ComfyUI's weight adapters apply it) and the shape of the weight change it describes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Suffix → (form, role). Longest suffixes first, so ".lora_A.default.weight" wins over ".weight" forms.
_SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_up.weight": ("LoRA", "up"), ".lora_down.weight": ("LoRA", "down"), ".lora_mid.weight": ("LoRA", "mid"),
    ".lora_B.weight": ("LoRA", "up"), ".lora_A.weight": ("LoRA", "down"),
    ".lora_B.default.weight": ("LoRA", "up"), ".lora_A.default.weight": ("LoRA", "down"),
    ".lora.up.weight": ("LoRA", "up"), ".lora.down.weight": ("LoRA", "down"),
    "_lora.up.weight": ("LoRA", "up"), "_lora.down.weight": ("LoRA", "down"),
    ".lora_linear_layer.up.weight": ("LoRA", "up"), ".lora_linear_layer.down.weight": ("LoRA", "down"),
    ".lora_B": ("LoRA", "up"), ".lora_A": ("LoRA", "down"),
    ".hada_w1_a": ("LoHa", "w1_a"), ".hada_w1_b": ("LoHa", "w1_b"), ".hada_w2_a": ("LoHa", "w2_a"),
    ".hada_w2_b": ("LoHa", "w2_b"), ".hada_t1": ("LoHa", "t1"), ".hada_t2": ("LoHa", "t2"),
    ".lokr_w1": ("LoKr", "w1"), ".lokr_w2": ("LoKr", "w2"), ".lokr_w1_a": ("LoKr", "w1_a"),
    ".lokr_w1_b": ("LoKr", "w1_b"), ".lokr_w2_a": ("LoKr", "w2_a"), ".lokr_w2_b": ("LoKr", "w2_b"),
    ".lokr_t2": ("LoKr", "t2"),
    ".diff": ("diff", "diff"), ".diff_b": ("diff", "diff_b"), ".set_weight": ("diff", "set"),
    ".w_norm": ("diff", "w_norm"), ".b_norm": ("diff", "b_norm"),
    ".alpha": ("", "alpha"), ".dora_scale": ("", "dora_scale"), ".reshape_weight": ("", "reshape"),
}
_BY_LENGTH = sorted(_SUFFIXES, key=len, reverse=True)


def split_key(key: str) -> tuple[str, str, str] | None:
    """`key` → (module name as written in the file, form, role), or None when no known suffix ends it."""
    for suffix in _BY_LENGTH:
        if key.endswith(suffix) and len(key) > len(suffix):
            form, role = _SUFFIXES[suffix]
            return key[: -len(suffix)], form, role
    return None


@dataclass(frozen=True)
class ModuleWeights:
    """One module's tensors in a LoRA file: its form and the shapes of its parts."""

    name: str  # module name as written in the file (key minus suffix)
    form: str  # "LoRA", "LoHa", "LoKr" or "diff"; "+DoRA" when a dora_scale comes with it
    keys: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]  # role → shape
    alpha: float | None

    @property
    def rank(self) -> int | None:
        s = self.shapes
        if "down" in s:
            return s["down"][0]
        if "w1_b" in s:
            return s["w1_b"][0]
        if "w1_a" in s and "LoKr" in self.form:
            return s["w1_a"][1]
        if "w2_b" in s:
            return s["w2_b"][0]
        return None

    def problem(self) -> str:
        """Why ComfyUI's weight adapter could not build this module's change (mismatched or empty factors, an
        alpha that is not one finite number), or "" when it can. ComfyUI would skip such a module with a log
        line at load time, so it must not count as applied."""
        s = self.shapes
        if "alpha" in s and math.prod(s["alpha"]) != 1:
            return f"damaged: its alpha holds {math.prod(s['alpha'])} values (shape {tuple(s['alpha'])}), not one number"
        if self.alpha is not None and not math.isfinite(self.alpha):
            return f"damaged: its alpha is {self.alpha}"
        pairs = {"LoRA": (("up", "down"),), "LoHa": (("w1_a", "w1_b"), ("w2_a", "w2_b")),
                 "LoKr": (("w1_a", "w1_b"), ("w2_a", "w2_b"))}.get(self.form.split("+")[0], ())
        for a, b in pairs:
            if a not in s or b not in s or len(s[a]) < 2 or len(s[b]) < 1:
                continue
            inner_a, inner_b = s[a][1], s[b][0]
            if min(inner_a, inner_b) < 1:
                return f"damaged: rank 0 ({a} {tuple(s[a])}, {b} {tuple(s[b])}): an empty LoRA module"
            if inner_a != inner_b:
                return f"damaged: {a} has rank {inner_a} but {b} has rank {inner_b} (shapes {tuple(s[a])} and {tuple(s[b])})"
        if any(d < 1 for role, shape in s.items() if role != "alpha" for d in shape):
            return "damaged: a tensor with a dimension of size 0"
        return ""

    @property
    def scale(self) -> float:
        """The alpha/rank factor ComfyUI's adapter multiplies the change by (1 where the form has none)."""
        if self.alpha is None or self.problem():
            return 1.0
        s = self.shapes
        if self.form.startswith("LoRA") and "down" in s:
            return self.alpha / s["down"][0]
        if self.form.startswith("LoHa") and "w1_b" in s:
            return self.alpha / s["w1_b"][0]
        if self.form.startswith("LoKr"):
            # ComfyUI's LoKr: alpha / rank only for a factorized w1 or w2 (w2's rank wins), else 1.
            if "w2_b" in s:
                return self.alpha / s["w2_b"][0]
            if "w1_b" in s:
                return self.alpha / s["w1_b"][0]
        return 1.0

    def delta_shape(self) -> tuple[int, ...] | None:
        """Shape of the weight change this module describes (None: incomplete)."""
        s = self.shapes
        base = self.form.split("+")[0]
        if base == "LoRA":
            if "up" not in s or "down" not in s:
                return None
            up, down = s["up"], s["down"]
            return (up[0], *down[1:]) if len(down) > 2 else (up[0], down[1])
        if base == "LoHa":
            if not all(r in s for r in ("w1_a", "w1_b", "w2_a", "w2_b")):
                return None
            return (s["w1_a"][0], s["w1_b"][1])
        if base == "LoKr":
            w1 = s.get("w1") or (_mm(s.get("w1_a"), s.get("w1_b")))
            w2 = s.get("w2") or (_mm(s.get("w2_a"), s.get("w2_b")))
            if w1 is None or w2 is None or len(w1) != 2 or len(w2) != 2:
                return None
            return (w1[0] * w2[0], w1[1] * w2[1])
        if base == "diff":
            for role in ("diff", "set", "w_norm"):
                if role in s:
                    return s[role]
        return None


def _mm(a: Sequence[int] | None, b: Sequence[int] | None) -> tuple[int, int] | None:
    if a is None or b is None or len(a) != 2 or len(b) < 2:
        return None
    return (a[0], b[1])


def group_modules(shapes: Mapping[str, Sequence[int]], alphas: Mapping[str, float]) -> tuple[
        dict[str, ModuleWeights], list[str]]:
    """Group a LoRA file's keys by module. Returns ({file module name: weights}, keys of no known form)."""
    roles_of: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    keys_of: dict[str, list[str]] = {}
    unknown: list[str] = []
    for key, shape in shapes.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, form, role = split
        roles_of.setdefault(module, {})[role] = (form, tuple(shape))
        keys_of.setdefault(module, []).append(key)
    out: dict[str, ModuleWeights] = {}
    for module, roles in roles_of.items():
        forms = sorted({f for f, _ in roles.values() if f})
        if not forms:  # an alpha / dora_scale without weights: nothing to apply
            unknown.extend(keys_of[module])
            continue
        form = "+".join(forms)
        if "dora_scale" in roles:
            form += "+DoRA"
        out[module] = ModuleWeights(module, form, tuple(keys_of[module]), {r: s for r, (_, s) in roles.items()},
                                    alphas.get(module + ".alpha"))
    return out, unknown
