"""GPU benchmark for Z-Image-Turbo: our zimage_core against diffusers 0.42.1 and ComfyUI native.

Builds the full-size S3-DiT, the Qwen3-4B text encoder and the FLUX VAE with random weights
directly on the GPU (bf16, never materialized on the CPU), shares ONE copy of each weight set
between the implementations (views, ``load_state_dict(assign=True)``), and times them side by
side in one process. See bench/README.md for usage; results go to ``$OUT`` (device runs) or
``bench/out``.

Stages (``--only``): env, dit, te, vae, e2e, parity, fp8, mem.  Implementations (``--impls``):
ours, diffusers, comfy.  Compiled variants are named ``<impl>+compile``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if os.environ.get("ZBENCH_CORE"):  # an overlay folder holding a zimage_core package (pre-merge runs)
    sys.path.insert(0, str(REPO / os.environ["ZBENCH_CORE"]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures as F  # noqa: E402  (shapes, keys and the random-weight rule, from zimage_core)

GiB = 1024**3
DT = torch.bfloat16
DEV = os.environ.get("ZBENCH_DEVICE", "cuda")
TINY = os.environ.get("ZBENCH_TINY") == "1"  # local CPU smoke test of the script itself

# The official Z-Image-Turbo transformer, Qwen3-4B and FLUX VAE shapes (tiny ones for the CPU smoke test),
# derived from zimage_core by bench/fixtures.py. DIT is a dict view of zimage_core's TransformerConfig.
DIT_CONFIG = F.dit_config(tiny=TINY)
DIT = dataclasses.asdict(DIT_CONFIG)
QWEN3_4B = F.qwen3_4b_config(tiny=TINY)
FLUX_VAE = F.flux_vae_diffusers_config(tiny=TINY)
LATENT_SCALE, LATENT_SHIFT = F.LATENT_SCALE, F.LATENT_SHIFT
PROMPT = "a photo of a ginger cat sitting on a sunlit windowsill, soft light, highly detailed"
TURBO_SIGMAS_8 = [1.0, 0.9545454545, 0.9, 0.8333333333, 0.75, 0.6428571429, 0.5, 0.3, 0.0]

RESULTS: list[dict[str, Any]] = []
TE_REF: dict[str, Any] = {}
MEM_REF: dict[int, torch.Tensor] = {}  # resident-mode latents per size (memory modes must match them)  # first impl's output per config, for cross-checks
ENV: dict[str, Any] = {}
NOTES: list[str] = []


def log(*a: Any) -> None:
    print(*a, flush=True)


def note(msg: str) -> None:
    NOTES.append(msg)
    log("NOTE:", msg)


# ----------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------

def sync() -> None:
    if DEV != "cpu":
        torch.cuda.synchronize()


def first_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return (time.perf_counter() - t0) * 1000.0, out


def time_ms(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    out = []
    if DEV == "cpu":
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000.0)
        return out
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return out


@contextlib.contextmanager
def peak_mem():
    """Yields a dict filled on exit with peak allocated/reserved (GiB, absolute) and the baseline."""
    gc.collect()
    d: dict[str, float] = {}
    if DEV == "cpu":
        yield d
        return
    torch.cuda.empty_cache()
    sync()
    torch.cuda.reset_peak_memory_stats()
    d["base_alloc_gib"] = torch.cuda.memory_allocated() / GiB
    yield d
    sync()
    d["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GiB
    d["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB


def record(impl: str, what: str, size: int | None, batch: int | None, times: list[float] | None = None,
           **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"impl": impl, "what": what, "size": size, "batch": batch}
    if times:
        r["median_ms"] = statistics.median(times)
        r["min_ms"] = min(times)
        r["max_ms"] = max(times)
        r["reps"] = len(times)
    r.update(extra)
    RESULTS.append(r)
    msg = f"[{impl:>18}] {what:<14} size={size} b={batch}"
    if times:
        msg += f"  median {r['median_ms']:.2f} ms (min {r['min_ms']:.2f}, max {r['max_ms']:.2f}, n={len(times)})"
    for k, v in extra.items():
        msg += f"  {k}={v:.3f}" if isinstance(v, float) else f"  {k}={v}"
    log(msg)
    return r


def step_flops(size: int, batch: int, cap_len: int) -> float:
    """Forward FLOPs of one DiT call (matmuls + attention), counted as 2 per MAC."""
    return F.step_flops(DIT_CONFIG, size, batch, cap_len)


# ----------------------------------------------------------------------------------------------
# random weights on the GPU
# ----------------------------------------------------------------------------------------------

def _rand_like_param(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype=DT) -> torch.Tensor:
    """zimage_core's random-weight rule (demo_weights.random_value), drawn on the generator's device."""
    return F.random_tensor(name, shape, gen, dtype=dtype)


def dit_comfy_shapes() -> dict[str, tuple[int, ...]]:
    """ComfyUI single-file key names and shapes of the Z-Image transformer (from zimage_core's model)."""
    return F.dit_shapes(DIT_CONFIG)


def make_dit_weights(seed: int = 0, dtype=DT) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return {k: _rand_like_param(k, v, gen, dtype) for k, v in dit_comfy_shapes().items()}


def comfy_to_diffusers_dit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI names -> diffusers names; q/k/v become row views of the fused qkv tensor (no copy)."""
    out: dict[str, torch.Tensor] = {}
    d = DIT["dim"]
    for k, v in sd.items():
        if k.endswith("attention.qkv.weight"):
            p = k[: -len("qkv.weight")]
            out[p + "to_q.weight"], out[p + "to_k.weight"], out[p + "to_v.weight"] = v[:d], v[d:2 * d], v[2 * d:]
            continue
        n = k.replace("attention.out.", "attention.to_out.0.").replace("attention.q_norm.", "attention.norm_q.")
        n = n.replace("attention.k_norm.", "attention.norm_k.")
        if n.startswith("x_embedder."):
            n = "all_x_embedder.2-1." + n[len("x_embedder."):]
        elif n.startswith("final_layer."):
            n = "all_final_layer.2-1." + n[len("final_layer."):]
        out[n] = v
    return out


def qwen_hf_shapes() -> dict[str, tuple[int, ...]]:
    return F.qwen3_shapes(QWEN3_4B)


def make_te_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    sd = {}
    for k, shp in qwen_hf_shapes().items():
        sd[k] = _rand_like_param(k, shp, gen)
    return sd


def load_assign(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    res = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in res.missing_keys]
    if missing or res.unexpected_keys:
        log(f"  {what}: missing={missing[:6]}{'...' if len(missing) > 6 else ''} unexpected={res.unexpected_keys[:6]}")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: still on meta after loading: {left[:8]}")


# ----------------------------------------------------------------------------------------------
# implementations
# ----------------------------------------------------------------------------------------------

def import_comfy() -> Any:
    """Import ComfyUI's `comfy` package from the carried copy (.device/comfy_src) or .comfyui."""
    for cand in (REPO / ".device" / "comfy_src", REPO / ".comfyui" / "ComfyUI"):
        if (cand / "comfy").is_dir():
            if str(cand) not in sys.path:
                sys.path.insert(0, str(cand))
            break
    import comfy.options  # noqa: F401
    if DEV == "cpu":
        from comfy.cli_args import args as comfy_args
        comfy_args.cpu = True
    import comfy  # noqa: F401
    import comfy.ldm.lumina.model  # noqa: F401
    import comfy.model_management  # noqa: F401
    import comfy.ops  # noqa: F401
    return sys.modules["comfy"]


class Impls:
    """Holds the shared weights and the models built on them (lazily)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._dit_sd: dict[str, torch.Tensor] | None = None
        self._te_sd: dict[str, torch.Tensor] | None = None
        self.dit: dict[str, Any] = {}
        self.te: dict[str, Any] = {}
        self.vae: dict[str, Any] = {}
        self._vae_dir: Path | None = None
        self._tok = None

    # ---- shared weights
    @property
    def dit_sd(self) -> dict[str, torch.Tensor]:
        if self._dit_sd is None:
            t0 = time.perf_counter()
            self._dit_sd = make_dit_weights()
            sync()
            n = sum(t.numel() for t in self._dit_sd.values())
            log(f"DiT random weights: {n / 1e9:.3f} B params, {n * 2 / GiB:.2f} GiB, {time.perf_counter() - t0:.1f} s")
        return self._dit_sd

    @property
    def te_sd(self) -> dict[str, torch.Tensor]:
        if self._te_sd is None:
            t0 = time.perf_counter()
            self._te_sd = make_te_weights()
            sync()
            n = sum(t.numel() for t in self._te_sd.values())
            log(f"TE random weights: {n / 1e9:.3f} B params, {time.perf_counter() - t0:.1f} s")
        return self._te_sd

    # ---- DiT builders: each returns a callable velocity(x bf16 (B,16,h,w), sigma f32 (B,), caps list) -> v
    def get_dit(self, impl: str) -> Callable[..., torch.Tensor]:
        if impl in self.dit:
            return self.dit[impl]
        base, _, variant = impl.partition("+")
        fn = getattr(self, f"_build_dit_{base}")(variant)
        self.dit[impl] = fn
        return fn

    def _build_dit_diffusers(self, variant: str):
        from diffusers import ZImageTransformer2DModel
        cfg = dict(all_patch_size=(DIT["patch_size"],), all_f_patch_size=(1,), in_channels=DIT["in_channels"],
                   dim=DIT["dim"],
                   n_layers=DIT["n_layers"], n_refiner_layers=DIT["n_refiner_layers"], n_heads=DIT["n_heads"],
                   n_kv_heads=DIT["n_kv_heads"], norm_eps=DIT["norm_eps"], qk_norm=True,
                   cap_feat_dim=DIT["cap_feat_dim"], rope_theta=DIT["rope_theta"], t_scale=DIT["t_scale"],
                   axes_dims=list(DIT["axes_dims"]), axes_lens=list(DIT["axes_lens"]))
        if "diffusers" not in self.__dict__.setdefault("_mods", {}):
            with torch.device("meta"):
                m = ZImageTransformer2DModel(**cfg)
            load_assign(m, comfy_to_diffusers_dit(self.dit_sd), "diffusers DiT")
            m.eval().requires_grad_(False)
            self._mods["diffusers"] = m
        m = self._mods["diffusers"]
        mod = torch.compile(m) if variant == "compile" else m

        def run(x, sigma, caps):
            out = mod(list(x.unsqueeze(2).unbind(0)), 1.0 - sigma, caps, return_dict=False)[0]
            return -torch.stack([o.float() for o in out], 0).squeeze(2)
        return run

    def _build_dit_comfy(self, variant: str):
        """variant: "" (bf16, comfy.ops.disable_weight_init), "fp8fast" (ComfyUI's `fp8_e4m3fn_fast`: every
        weight stored as float8_e4m3fn, fp8 matmuls through comfy.ops.fp8_ops with unit scales, as UNETLoader
        builds it), "compile" (torch.compile of the whole model); combinable with "+"."""
        import_comfy()
        import comfy.ops
        from comfy.ldm.lumina.model import NextDiT
        opts = set(variant.split("+")) - {""}
        fp8 = "fp8fast" in opts
        key = "comfy_fp8fast" if fp8 else "comfy"
        if key not in self.__dict__.setdefault("_mods", {}):
            dtype = torch.float8_e4m3fn if fp8 else DT
            if fp8:  # what comfy.model_base picks for UNETLoader's fp8_e4m3fn_fast on this device
                ops = comfy.ops.pick_operations(dtype, DT, load_device=torch.device(DEV), fp8_optimizations=True)
                log(f"  comfy fp8_e4m3fn_fast: operations {getattr(ops, '__name__', ops)}")
                ENV["comfy_fp8fast_ops"] = getattr(ops, "__name__", str(ops))
            else:
                ops = comfy.ops.disable_weight_init
            with torch.device("meta"):
                m = NextDiT(patch_size=DIT["patch_size"], in_channels=DIT["in_channels"], dim=DIT["dim"],
                            n_layers=DIT["n_layers"],
                            n_refiner_layers=DIT["n_refiner_layers"], n_heads=DIT["n_heads"],
                            n_kv_heads=DIT["n_kv_heads"], multiple_of=256, ffn_dim_multiplier=8.0 / 3.0,
                            norm_eps=DIT["norm_eps"], qk_norm=True, cap_feat_dim=DIT["cap_feat_dim"],
                            axes_dims=list(DIT["axes_dims"]), axes_lens=list(DIT["axes_lens"]),
                            rope_theta=DIT["rope_theta"], z_image_modulation=True, time_scale=1000.0,
                            pad_tokens_multiple=F.SEQ_MULTIPLE, image_model="lumina2", device="meta", dtype=dtype,
                            operations=ops)
            sd = dict(self.dit_sd)
            sd["norm_final.weight"] = torch.ones(DIT["dim"], dtype=DT, device=DEV)  # stray, unused
            if fp8:  # UNETLoader copies the file's bf16 values into the fp8 parameters (round to nearest)
                meta = dict(m.named_parameters())
                sd = {k: v.to(meta[k].dtype) if k in meta else v for k, v in sd.items()}
            load_assign(m, sd, f"comfy NextDiT{' fp8_e4m3fn_fast' if fp8 else ''}")
            m.eval().requires_grad_(False)
            self._mods[key] = m
        m = self._mods[key]
        mod = torch.compile(m) if "compile" in opts else m

        def run(x, sigma, caps):
            ctx = torch.nn.utils.rnn.pad_sequence(caps, batch_first=True) if len(caps) > 1 else caps[0].unsqueeze(0)
            if ctx.shape[0] != x.shape[0]:
                ctx = ctx.expand(x.shape[0], -1, -1)
            return mod(x, sigma, ctx, ctx.shape[1]).float()
        return run

    def ours_config(self):
        return DIT_CONFIG

    def new_ours(self, sd: dict[str, torch.Tensor] | None = None):
        """A fresh ZImageTransformer instance on the shared weights (no copy)."""
        from zimage_core.transformer import ZImageTransformer
        with torch.device("meta"):
            m = ZImageTransformer(self.ours_config(), dtype=DT, device="meta")
        load_assign(m, sd if sd is not None else self.dit_sd, "ours DiT")
        return m.eval().requires_grad_(False)

    def _build_dit_ours(self, variant: str):
        """variant: "" (eager, fused Triton kernels where available), "compile" (regional), "fp8",
        "fp8attn" (fp8 attention), "nofuse" (eager without the fused kernels), "graph" (whole-step CUDA
        graphs, accel.graphs), "fp8q" (fp8 with the activation quantisation fused into the producing
        kernels), "attn=<backend>" (an attention backend of zimage_core.accel.attention_backends);
        combinable with "+"."""
        opts = set(variant.split("+")) - {""}
        m = self.new_ours()
        m.fused_kernels = "nofuse" not in opts
        if "fp8" in opts:
            t0 = time.perf_counter()
            shared = self.__dict__.get("_fp8_sd")
            if shared is None:
                n = m.quantize_fp8()
                self._fp8_sd = {k: v for k, v in m.state_dict(keep_vars=True).items() if v.dtype == torch.float8_e4m3fn
                                or k.endswith("weight_scale")}
            else:  # every fp8 variant shares one set of fp8 weights (6 GB each otherwise)
                from zimage_core.accel.fp8 import Fp8Linear, fp8_matmul_supported
                n = 0
                for name, mod in list(m.named_modules()):
                    for cname, child in list(mod.named_children()):
                        full = f"{name}.{cname}" if name else cname
                        if f"{full}.weight" in shared:
                            lin = Fp8Linear.__new__(Fp8Linear)
                            torch.nn.Module.__init__(lin)
                            lin.weight = shared[f"{full}.weight"]
                            lin.register_buffer("weight_scale", shared[f"{full}.weight_scale"])
                            lin.in_features, lin.out_features = child.in_features, child.out_features
                            lin.use_scaled_mm = fp8_matmul_supported(lin.weight.device)
                            setattr(mod, cname, lin)
                            n += 1
            sync()
            log(f"  fp8: {n} linears quantized in {time.perf_counter() - t0:.2f} s")
        if "fp8attn" in opts:
            m.set_fp8_attention(True)
        if "fp8q" in opts:
            n = m.fuse_fp8_activations()
            log(f"  fp8q: activation quantisation fused into the producing kernels in {n} blocks")
        if "compile" in opts:
            m.compile_blocks(cache_dir=self.args.compile_cache or None)
        if "graph" in opts:
            m.use_cuda_graphs()
        backend = next((o.split("=", 1)[1] for o in opts if o.startswith("attn=")), None)
        self.__dict__.setdefault("_mods", {})["ours+" + variant if variant else "ours"] = m

        def run(x, sigma, caps):
            if backend is not None:  # as the process default (ZIMAGE_ATTENTION would make it): graphs may hold it
                from zimage_core.accel import attention_backends as ab
                from zimage_core.transformer import attention as seam
                previous, seam._default = seam._default, ab.get(backend)
                try:
                    return m(x, sigma, caps)
                finally:
                    seam._default = previous
            return m(x, sigma, caps)
        run.model = m  # type: ignore[attr-defined]
        return run

    # ---- text encoders: callable(ids list[LongTensor]) -> list[(L, 2560)]
    def tokenizer(self):
        """Qwen3's tokenizer (zimage_core's loader, from ComfyUI's bundled qwen25_tokenizer files):
        the same ids for every implementation."""
        if self._tok is None:
            from zimage_core.text_encoder.tokenizer import load_tokenizer
            self._tok = load_tokenizer(self._tok_arg())
        return self._tok

    def _comfy_dir(self) -> Path:
        for cand in (REPO / ".device" / "comfy_src", REPO / ".comfyui" / "ComfyUI"):
            if (cand / "comfy").is_dir():
                return cand
        raise FileNotFoundError("no ComfyUI copy (.device/comfy_src or .comfyui/ComfyUI)")

    def prompt_ids(self, prompts: list[str]) -> list[torch.Tensor]:
        tok = self.tokenizer()
        tmpl = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
        return [torch.tensor(tok.encode(tmpl.format(p)), dtype=torch.long) for p in prompts]

    def get_te(self, impl: str):
        if impl not in self.te:
            self.te[impl] = getattr(self, f"_build_te_{impl}")()
        return self.te[impl]

    def _build_te_diffusers(self):
        from transformers import Qwen3Config, Qwen3Model
        cfg = Qwen3Config(**QWEN3_4B)
        with torch.device("meta"):
            m = Qwen3Model(cfg)
        with torch.device(DEV):
            m.rotary_emb = type(m.rotary_emb)(config=cfg)  # buffers, not weights
        load_assign(m, self.te_sd, "HF Qwen3Model")
        m.eval().requires_grad_(False)
        m.to(DT)

        def run(ids_list):
            # diffusers ZImagePipeline: pad to max_length=512, mask, hidden_states[-2], drop padding.
            B = len(ids_list)
            ids = torch.full((B, 512), 151643, dtype=torch.long)
            mask = torch.zeros((B, 512), dtype=torch.long)
            for i, t in enumerate(ids_list):
                ids[i, : len(t)] = t
                mask[i, : len(t)] = 1
            ids, mask = ids.to(DEV), mask.to(DEV)
            hs = m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
            mb = mask.bool()
            return [hs[i][mb[i]] for i in range(B)]
        return run

    def _build_te_comfy(self):
        import_comfy()
        import comfy.ops
        from comfy.text_encoders.llama import Qwen3_4B
        with torch.device("meta"):
            cfg = {k: v for k, v in QWEN3_4B.items() if k not in ("head_dim", "tie_word_embeddings")}
            m = Qwen3_4B(cfg, dtype=DT, device="meta", operations=comfy.ops.manual_cast)
        load_assign(m, {"model." + k: v for k, v in self.te_sd.items()}, "comfy Qwen3_4B")
        m.eval().requires_grad_(False)

        def run(ids_list):
            outs = []
            # ComfyUI does not pad a single prompt; prompts are encoded one by one by CLIPTextEncode.
            for t in ids_list:
                ids = t.to(DEV).unsqueeze(0)
                am = torch.ones_like(ids)
                _, inter = m(ids, attention_mask=am, intermediate_output=-2, final_layer_norm_intermediate=False,
                             dtype=DT)
                outs.append(inter[0])
            return outs
        return run

    def _build_te_ours(self):
        from transformers import Qwen3Config, Qwen3Model

        from zimage_core.text_encoder import ZImageTextEncoder
        # Same construction as zimage_core.text_encoder._build (35 of 36 layers, no final norm),
        # sharing the reference's weights instead of reading a file.
        cfg = Qwen3Config(**{**QWEN3_4B, "num_hidden_layers": QWEN3_4B["num_hidden_layers"] - 1})
        cfg._attn_implementation = "sdpa"
        with torch.device("meta"):
            m = Qwen3Model(cfg)
        m.norm = torch.nn.Identity()
        with torch.device(DEV):
            m.rotary_emb = type(m.rotary_emb)(config=cfg)
        n_last = QWEN3_4B["num_hidden_layers"] - 1
        sd = {k: v for k, v in self.te_sd.items() if not k.startswith(f"layers.{n_last}.") and k != "norm.weight"}
        load_assign(m, sd, "ours Qwen3 (35 layers)")
        m.eval().requires_grad_(False)
        enc = ZImageTextEncoder(m, self.tokenizer())
        enc.use_cuda_graphs = not self.args.no_te_graphs

        def run_ids(ids_list):
            return None
        run_ids.encoder = enc  # type: ignore[attr-defined]
        return run_ids

    def _tok_arg(self):
        return str(self._comfy_dir() / "comfy" / "text_encoders" / "qwen25_tokenizer")

    def _write_te_file(self) -> Path:
        from safetensors.torch import save_file
        p = Path("/tmp/zbench/qwen_3_4b.safetensors")
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            save_file({"model." + k: v.contiguous().cpu() for k, v in self.te_sd.items()}, str(p))
            log(f"  wrote {p} in {time.perf_counter() - t0:.1f} s")
        return p

    # ---- VAEs: callable(latents normalized bf16 (B,16,h,w)) -> images (B,H,W,3) in [0,1] on GPU
    def vae_dir(self) -> Path:
        if self._vae_dir is None:
            from diffusers import AutoencoderKL
            gen = torch.Generator(device=DEV).manual_seed(2)
            with torch.device(DEV):
                m = AutoencoderKL(**FLUX_VAE)
            with torch.no_grad():
                for name, p in m.named_parameters():
                    p.copy_(_rand_like_param(name, tuple(p.shape), gen, p.dtype))
            d = Path("/tmp/zbench/vae")
            m.save_pretrained(str(d))
            self._vae_dir = d
            del m
        return self._vae_dir

    def get_vae(self, impl: str):
        if impl not in self.vae:
            base, _, variant = impl.partition("+")
            self.vae[impl] = getattr(self, f"_build_vae_{base}")(variant)
        return self.vae[impl]

    def _build_vae_diffusers(self, variant: str):
        from diffusers import AutoencoderKL
        m = AutoencoderKL.from_pretrained(str(self.vae_dir()), torch_dtype=DT).to(DEV).eval().requires_grad_(False)
        dec = torch.compile(m.decode) if variant == "compile" else m.decode

        def run(lat):
            img = dec(lat / LATENT_SCALE + LATENT_SHIFT, return_dict=False)[0]
            return (img.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        return run

    def _build_vae_comfy(self, variant: str):
        import_comfy()
        import comfy.sd
        from safetensors.torch import load_file
        sd = load_file(str(self.vae_dir() / "diffusion_pytorch_model.safetensors"))
        v = comfy.sd.VAE(sd=sd, device=torch.device(DEV), dtype=DT)
        fsm = v.first_stage_model.to(DEV).eval()

        def run(lat):
            raw = (lat / LATENT_SCALE + LATENT_SHIFT).to(DT)
            img = fsm.decode(raw).float()
            return torch.clamp((img + 1.0) / 2.0, 0.0, 1.0).movedim(1, -1)
        run.vae = v  # type: ignore[attr-defined]
        return run

    def _build_vae_ours(self, variant: str):
        """variant: "" (NCHW eager), "cl" (channels_last), "fuse" (compiled GroupNorm+SiLU),
        "compile" (whole decoder compiled); combinable with "+"."""
        from zimage_core.vae import load_vae
        opts = set(variant.split("+")) - {""}
        m = load_vae(str(self.vae_dir()), dtype=DT, device=DEV)
        m.eval().requires_grad_(False)
        if "cl" in opts or self.args.vae_channels_last:
            m.to_channels_last() if hasattr(m, "to_channels_last") else m.to(memory_format=torch.channels_last)
        if "fuse" in opts:
            m.fuse_norm_act()
        if "compile" in opts:
            m.decoder.compile()

        def run(lat):
            return m.decode(lat, tiled=False)
        run.vae = m  # type: ignore[attr-defined]
        return run


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------

def stage_env(args, zi: Impls) -> None:
    import subprocess
    if DEV == "cpu":
        stage_env_light()
        return
    p = torch.cuda.get_device_properties(0)
    ENV.update(gpu=p.name, sm_count=p.multi_processor_count, total_mem_gib=p.total_memory / GiB,
               capability=f"{p.major}.{p.minor}", torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), python=sys.version.split()[0])
    try:
        ENV["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except Exception as e:  # noqa: BLE001
        ENV["driver"] = repr(e)
    for name in ("diffusers", "transformers", "triton", "safetensors"):
        try:
            ENV[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001
            ENV[name] = f"import failed: {e!r}"[:200]
    try:
        import_comfy()
        import comfyui_version  # type: ignore[import-not-found]
        ENV["comfyui"] = comfyui_version.__version__
    except Exception as e:  # noqa: BLE001
        ENV["comfyui"] = f"import failed: {e!r}"[:300]
    log("ENV", json.dumps(ENV, indent=1))
    # matmul ceiling
    a = torch.randn(8192, 8192, device=DEV, dtype=DT)
    b = torch.randn(8192, 8192, device=DEV, dtype=DT)
    t = statistics.median(time_ms(lambda: a @ b, 10, 3))
    ENV["bf16_matmul_tflops"] = 2 * 8192**3 / (t / 1e3) / 1e12
    log(f"bf16 8192^3 matmul: {t:.3f} ms = {ENV['bf16_matmul_tflops']:.0f} TFLOP/s")
    try:
        fa = a.to(torch.float8_e4m3fn)
        fbt = b.to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=DEV)
        t = statistics.median(time_ms(lambda: torch._scaled_mm(fa, fbt, one, one, out_dtype=DT), 10, 3))
        ENV["fp8_matmul_tflops"] = 2 * 8192**3 / (t / 1e3) / 1e12
        log(f"fp8 8192^3 _scaled_mm: {t:.3f} ms = {ENV['fp8_matmul_tflops']:.0f} TFLOP/s")
    except Exception as e:  # noqa: BLE001
        ENV["fp8_matmul_tflops"] = f"failed: {e!r}"[:200]
    a = b = fa = fbt = None
    # SDPA backends at the 1024^2 shape (4096 image + 32 caption tokens), no mask
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(1, 30, 4128, 128, device=DEV, dtype=DT) for _ in range(3))
    fl = 4 * 4128 * 4128 * 128 * 30
    sd: dict[str, Any] = {}
    for be in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        try:
            with sdpa_kernel(getattr(SDPBackend, be)):
                t = statistics.median(time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), 10, 2))
            sd[be] = {"ms": t, "tflops": fl / (t / 1e3) / 1e12}
        except Exception as e:  # noqa: BLE001
            sd[be] = f"failed: {e!r}"[:120]
    t = statistics.median(time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), 10, 2))
    sd["default"] = {"ms": t, "tflops": fl / (t / 1e3) / 1e12}
    try:
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        with prof:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            sync()
        sd["default_kernels"] = sorted({e.name[:80] for e in prof.events() if e.device_type.name == "CUDA"})[:4]
    except Exception as e:  # noqa: BLE001
        sd["default_kernels"] = repr(e)[:100]
    ENV["sdpa_1024"] = sd
    log("SDPA (1,30,4128,128) bf16:", json.dumps(sd, indent=1))


def make_inputs(zi: Impls, size: int, batch: int, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(F.latent_shape(size, batch), generator=g).to(DEV, DT)
    cap_len = int(zi.prompt_ids([PROMPT])[0].numel())
    caps = [torch.randn(cap_len, DIT["cap_feat_dim"], generator=g).to(DEV, DT) * 3 for _ in range(batch)]
    return x, caps, cap_len


def euler_denoise(fn, x0: torch.Tensor, caps, sigmas) -> torch.Tensor:
    """The reference 8-step loop (diffusers/ComfyUI style): latents in fp32, model input in bf16."""
    x = x0.float()
    B = x.shape[0]
    for i in range(len(sigmas) - 1):
        s = torch.full((B,), float(sigmas[i]), device=DEV, dtype=torch.float32)
        v = fn(x.to(DT), s, caps)
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v.float()
    return x


def cfg_denoise(fn, x0: torch.Tensor, caps, neg_caps, sigmas, guidance: float) -> torch.Tensor:
    """The reference loop with Z-Image's CFG, as ZImagePipeline runs it: positive and negative in one batch of 2B,
    pred = pos + g·(pos − neg) in fp32."""
    x = x0.float()
    B = x.shape[0]
    for i in range(len(sigmas) - 1):
        s = torch.full((2 * B,), float(sigmas[i]), device=DEV, dtype=torch.float32)
        xin = x.to(DT)
        out = fn(torch.cat([xin, xin]), s, list(caps) + list(neg_caps)).float()
        pos, neg = out[:B], out[B:]
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * (pos + guidance * (pos - neg))
    return x


def dit_impls(args, stage: str = "") -> list[str]:
    """The DiT variants to run: `--impl-list` exactly when given (in its order), else built from --impls,
    --compile, --fp8, ... and --extra. `stage` "e2e" / "profile": only those in --e2e-impls / --profile-impls
    when given."""
    keep = {"e2e": args.e2e_impls, "profile": args.profile_impls, "e2e_base": args.e2e_base_impls}.get(stage) or []
    if args.impl_list:
        return [i for i in args.impl_list if not keep or i in keep]
    if keep:
        return keep
    out = []
    for impl in args.impls:
        if not (args.compiled_only and impl in args.compile):
            out.append(impl)
        if impl in args.compile:
            out.append(impl + "+compile")
        if impl == "ours" and args.nofuse and not (args.compiled_only and impl in args.compile):
            out.insert(out.index("ours") + 1, "ours+nofuse")
        if impl == "ours" and (args.fp8 or args.fp8_attn):
            tail = "+compile" if "ours" in args.compile else ""
            if args.fp8:
                out.append("ours+fp8" + tail)
            if args.fp8_attn:
                out.append("ours+fp8+fp8attn" + tail)
        if impl == "comfy" and args.native_fp8:
            if not (args.compiled_only and impl in args.compile):
                out.append("comfy+fp8fast")
            if impl in args.compile:
                out.append("comfy+fp8fast+compile")
    for impl in args.extra:
        if impl not in out:
            out.append(impl)
    return out


def stage_dit(args, zi: Impls) -> None:
    for impl in dit_impls(args):
        for size in args.sizes:
            for batch in args.batch:
                if size >= 2048 and batch >= 4 and not args.big:
                    note(f"{impl}: 2048^2 batch 4 skipped (pass --big to run it)")
                    continue
                try:
                    _bench_dit_one(args, zi, impl, size, batch)
                except Exception as e:  # noqa: BLE001
                    note(f"{impl} dit {size} b{batch} failed: {e!r}"[:400])
                    traceback.print_exc()
                    gc.collect()
                    torch.cuda.empty_cache()


@torch.inference_mode()
def _bench_dit_one(args, zi: Impls, impl: str, size: int, batch: int) -> None:
    x, caps, cap_len = make_inputs(zi, size, batch)
    sig = torch.full((batch,), 0.75, device=DEV)
    with peak_mem() as pm:
        t_build0 = time.perf_counter()
        fn = zi.get_dit(impl)
        build_s = time.perf_counter() - t_build0
        warm_ms, _ = first_call(lambda: fn(x, sig, caps))
        reps = args.reps if size <= 1024 else max(3, args.reps // 3)
        times = time_ms(lambda: fn(x, sig, caps), reps, warmup=1)
    fl = step_flops(size, batch, cap_len)
    med = statistics.median(times)
    peak = ENV.get("bf16_matmul_tflops") or 777.0
    record(impl, "step", size, batch, times, first_call_ms=warm_ms, build_s=build_s,
           tflop=fl / 1e12, tflops=fl / (med / 1e3) / 1e12, mfu=fl / (med / 1e3) / 1e12 / peak,
           **pm)
    if args.steps and (size <= 1024 or args.full_denoise):
        sigmas = TURBO_SIGMAS_8 if args.steps == 8 else None
        if sigmas is None:
            from_s = torch.linspace(1, 1 / args.steps, args.steps)
            sigmas = (3 * from_s / (1 + 2 * from_s)).tolist() + [0.0]
        with peak_mem() as pm:
            if impl.startswith("ours") and not args.ref_loop:
                from zimage_core.sampling import sample_text_to_image
                run = lambda: sample_text_to_image(fn_ours_model(zi, impl), caps[:1] if batch == 1 else caps, x.float(), steps=args.steps)  # noqa: E731
            else:
                run = lambda: euler_denoise(fn, x, caps, sigmas)  # noqa: E731
            times = time_ms(run, max(2, args.reps // 3), warmup=1)
        record(impl, f"denoise{args.steps}", size, batch, times, **pm)


def fn_ours_model(zi: Impls, impl: str):
    return zi.get_dit(impl).model


@torch.inference_mode()
def stage_te(args, zi: Impls) -> None:
    ids = zi.prompt_ids([PROMPT])
    log(f"prompt tokens (with template): {ids[0].numel()}")
    for impl in args.impls:
        try:
            fn = zi.get_te(impl)
            if impl == "ours":
                enc = fn.encoder
                call = lambda enc=enc: enc.encode([PROMPT])  # noqa: E731
            else:
                call = lambda fn=fn: fn(ids)  # noqa: E731
            with peak_mem() as pm:
                warm, out = first_call(call)
                times = time_ms(call, args.reps, warmup=2)
            o = out[0].float()
            ref = TE_REF.setdefault("te", (impl, o))
            rel = ((o - ref[1]).norm() / ref[1].norm()).item() if o.shape == ref[1].shape else float("nan")
            record(impl, "text_encode", None, 1, times, first_call_ms=warm, tokens=int(out[0].shape[0]),
                   rel_vs=f"{ref[0]}:{rel:.2e}", **pm)
        except Exception as e:  # noqa: BLE001
            note(f"{impl} text encode failed: {e!r}"[:400])
            traceback.print_exc()


@torch.inference_mode()
def stage_vae(args, zi: Impls) -> None:
    impls = []
    for impl in args.impls:
        impls.append(impl)
        if impl in args.compile and impl == "diffusers":
            impls.append(impl + "+compile")
        if impl == "ours":
            impls += ["ours+" + v for v in args.vae_variants]
    for impl in impls:
        for size in args.sizes:
            for batch in args.batch:
                if size >= 2048 and batch >= 4 and not args.big:
                    continue
                try:
                    fn = zi.get_vae(impl)
                    g = torch.Generator(device="cpu").manual_seed(3)
                    lat = torch.randn(F.latent_shape(size, batch), generator=g).to(DEV, DT)
                    with peak_mem() as pm:
                        warm, o = first_call(lambda fn=fn, lat=lat: fn(lat))
                        times = time_ms(lambda fn=fn, lat=lat: fn(lat), args.reps if size <= 1024 else 3, warmup=1)
                    o = o.float()
                    ref = TE_REF.setdefault(f"vae{size}b{batch}", (impl, o))
                    rel = ((o - ref[1]).norm() / ref[1].norm()).item() if o.shape == ref[1].shape else float("nan")
                    record(impl, "vae_decode", size, batch, times, first_call_ms=warm, rel_vs=f"{ref[0]}:{rel:.2e}",
                           **pm)
                    del o
                except Exception as e:  # noqa: BLE001
                    note(f"{impl} vae {size} b{batch} failed: {e!r}"[:400])
                    traceback.print_exc()
                    gc.collect()
                    torch.cuda.empty_cache()


@torch.inference_mode()
def stage_parity(args, zi: Impls) -> None:
    """bf16 outputs of every impl against an fp32 reference on the same (upcast) weights."""
    size = args.parity_size
    x, caps, _ = make_inputs(zi, size, 1, seed=5)
    sig = torch.full((1,), 0.6, device=DEV)
    outs = {}
    for impl in dit_impls(args):
        try:
            outs[impl] = zi.get_dit(impl)(x, sig, caps).float()
        except Exception as e:  # noqa: BLE001
            note(f"parity: {impl} failed: {e!r}"[:300])
    # fp32 reference: diffusers (an independent implementation) on fp32 copies of the weights
    from diffusers import ZImageTransformer2DModel
    sd32 = {k: v.float() for k, v in comfy_to_diffusers_dit(zi.dit_sd).items()}
    cfg = zi._mods["diffusers"].config if "diffusers" in zi.__dict__.get("_mods", {}) else None
    with torch.device("meta"):
        ref = ZImageTransformer2DModel(**dict(cfg)) if cfg is not None else None
    if ref is None:
        note("parity: build the diffusers model first (--impls must include diffusers)")
        return
    load_assign(ref, sd32, "diffusers fp32")
    ref.eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    with torch.autocast("cuda", enabled=False):
        r = ref(list(x.float().unsqueeze(2).unbind(0)), 1.0 - sig, [c.float() for c in caps], return_dict=False)[0]
    vref = -torch.stack(r, 0).squeeze(2).float()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    del ref, sd32
    gc.collect()
    torch.cuda.empty_cache()
    if "ours" in args.impls:
        try:
            o32 = _ours_fp32(zi, x, sig, caps)
            rel = ((o32 - vref).norm() / vref.norm()).item()
            record("ours-fp32", "parity_vs_fp32", size, 1, None, rel_err=rel)
        except Exception as e:  # noqa: BLE001
            note(f"parity: ours fp32 failed: {e!r}"[:300])
    for impl, o in outs.items():
        rel = ((o - vref).norm() / vref.norm()).item()
        mx = (o - vref).abs().max().item()
        record(impl, "parity_vs_fp32", size, 1, None, rel_err=rel, max_abs=mx, finite=bool(torch.isfinite(o).all()))
    # fp8 against bf16 over a whole 8-step generation: final latents and decoded pixels
    fp8 = [i for i in outs if i.startswith("ours+fp8")]
    bf16 = [i for i in outs if i.startswith("ours") and "fp8" not in i]
    if fp8 and bf16:
        from zimage_core.sampling import sample_text_to_image
        noise = torch.randn(F.latent_shape(size), generator=torch.Generator().manual_seed(11))
        lat = {i: sample_text_to_image(zi.get_dit(i).model, caps[:1], noise, steps=8) for i in (bf16[-1], *fp8)}
        vae = zi.get_vae("ours+" + args.e2e_vae if args.e2e_vae else "ours")
        img = {i: vae(v) for i, v in lat.items()}
        b = bf16[-1]
        for f in fp8:  # every fp8 variant (weights only; + fp8 attention) against the same bf16 run
            record(f, "fp8_vs_bf16_8step", size, 1, None, latent_rel_err=_rel(lat[f], lat[b]),
                   pixel_rel_err=_rel(img[f], img[b]), pixel_mean_abs=(img[f] - img[b]).abs().mean().item(),
                   psnr_db=(10 * torch.log10(1.0 / ((img[f] - img[b]) ** 2).mean())).item())


def _ours_fp32(zi: Impls, x, sig, caps) -> torch.Tensor:
    m = zi.new_ours({k: v.float() for k, v in zi.dit_sd.items()})
    out = m(x.float(), sig, [c.float() for c in caps]).float()
    del m
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.inference_mode()
def stage_e2e(args, zi: Impls) -> None:
    """Prompt -> 8 steps -> image, all weights resident; per impl (compiled variants if asked)."""
    for impl in dit_impls(args, "e2e"):
        base = impl.split("+")[0]
        for size in args.sizes:
            for batch in args.batch:
                if size >= 2048 and batch >= 4 and not args.big:
                    continue
                try:
                    _e2e_one(args, zi, impl, base, size, batch)
                except Exception as e:  # noqa: BLE001
                    note(f"e2e {impl} {size} b{batch} failed: {e!r}"[:400])
                    traceback.print_exc()
                    gc.collect()
                    torch.cuda.empty_cache()


# Z-Image (Base): 30 steps, guidance 4 with a negative prompt, shift 6 (its scheduler config).
BASE_STEPS, BASE_GUIDANCE, BASE_SHIFT = 30, 4.0, 6.0
NEGATIVE = "low resolution, low quality, deformed limbs, blurry"


def stage_e2e_base(args, zi: Impls) -> None:
    """Z-Image Base end to end: prompt + negative prompt -> 30 CFG steps (a batch of 2 per step) -> image."""
    for impl in dit_impls(args, "e2e_base"):
        base = impl.split("+")[0]
        for size in args.sizes:
            for batch in args.batch:
                try:
                    _e2e_one(args, zi, impl, base, size, batch, what="e2e_base", steps=BASE_STEPS,
                             shift=BASE_SHIFT, guidance=BASE_GUIDANCE)
                except Exception as e:  # noqa: BLE001
                    note(f"e2e_base {impl} {size} b{batch} failed: {e!r}"[:400])
                    traceback.print_exc()
                    gc.collect()
                    torch.cuda.empty_cache()


def _own_weights_gib(base: str) -> float:
    dit = sum(math.prod(s) for s in dit_comfy_shapes().values()) * 2
    te = sum(math.prod(s) for k, s in qwen_hf_shapes().items()
             if not (base == "ours" and (k.startswith(f"layers.{QWEN3_4B['num_hidden_layers'] - 1}.")
                                         or k == "norm.weight"))) * 2
    vae = 83.8e6 * 2
    return (dit + te + vae) / GiB


def _e2e_one(args, zi: Impls, impl: str, base: str, size: int, batch: int, *, what: str = "e2e", steps: int = 8,
             shift: float = 3.0, guidance: float = 0.0) -> None:
    dit = zi.get_dit(impl)
    if base == "ours":
        vae_impl = "ours+" + args.e2e_vae if args.e2e_vae else "ours"
    else:
        vae_impl = base + ("+compile" if base == "diffusers" and base in args.compile and args.vae_compile else "")
    vae = zi.get_vae(vae_impl)
    te = zi.get_te(base)
    ids = zi.prompt_ids([PROMPT] * batch + ([NEGATIVE] * batch if guidance > 0 else []))
    noise = torch.randn(F.latent_shape(size, batch), generator=torch.Generator().manual_seed(7))
    from zimage_core.sampling import flow_sigmas
    sigmas = TURBO_SIGMAS_8 if (steps, shift) == (8, 3.0) else flow_sigmas(steps, shift).tolist()

    if base == "ours":
        from zimage_core.sampling import sample_text_to_image
        enc = te.encoder
        model = dit.model

        def run():
            caps = enc.encode([PROMPT] * batch + ([NEGATIVE] * batch if guidance > 0 else []))
            lat = sample_text_to_image(model, caps[:batch], noise, steps=steps, shift=shift, guidance=guidance,
                                       negative=caps[batch:] if guidance > 0 else None)
            return vae(lat)
    else:
        def run():
            caps = te(ids)
            if guidance > 0:
                lat = cfg_denoise(dit, noise.to(DEV), caps[:batch], caps[batch:], sigmas, guidance)
            else:
                lat = euler_denoise(dit, noise.to(DEV), caps, sigmas)
            return vae(lat.to(DT))
    with peak_mem() as pm:
        warm, img = first_call(run)
        times = time_ms(run, max(2, args.reps // 3), warmup=0)
    act = pm.get("peak_alloc_gib", 0) - pm.get("base_alloc_gib", 0)
    record(impl, what, size, batch, times, first_call_ms=warm, activ_peak_gib=act,
           resident_est_gib=_own_weights_gib(base) + act, finite=bool(torch.isfinite(img).all()), **pm)


@torch.inference_mode()
def stage_mem(args, zi: Impls) -> None:
    """ours' memory modes at each size (batch 1): TE streamed ("offloaded"), DiT streamed, tiled VAE.

    Runs in its own allocation state: the shared reference weights are dropped first, and every
    mode's peak is measured from a clean baseline with nothing else resident.
    """
    from zimage_core.sampling import sample_text_to_image
    for k in list(zi.dit):
        zi.dit.pop(k)
    zi.__dict__.get("_mods", {}).clear()
    zi.te.clear()
    zi.vae.clear()
    gc.collect()
    torch.cuda.empty_cache()
    compile_ = "ours" in args.compile
    # Host copies of the weights (pinned), like a checkpoint loaded to RAM by ComfyUI.
    t0 = time.perf_counter()
    host_dit = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v) for k, v in zi.dit_sd.items()}
    host_te = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v) for k, v in zi.te_sd.items()}
    zi._dit_sd = zi._te_sd = None
    gc.collect()
    torch.cuda.empty_cache()
    log(f"  host copies in {time.perf_counter() - t0:.1f} s; GPU now {torch.cuda.memory_allocated() / GiB:.2f} GiB")

    def h2d_gbps() -> float:
        t = host_dit["layers.0.feed_forward.w1.weight"]
        d = torch.empty_like(t, device=DEV)
        ms = statistics.median(time_ms(lambda: d.copy_(t, non_blocking=True), 5, 1))
        return t.numel() * t.element_size() / (ms / 1e3) / 1e9
    ENV["h2d_pinned_GBps"] = h2d_gbps()
    log(f"  pinned H2D: {ENV['h2d_pinned_GBps']:.1f} GB/s")

    size_list = args.sizes
    for mode in args.mem_modes:
        for size in size_list:
            if mode == "comfy_lowvram" and size != size_list[0]:
                continue  # eager and slow: the first size only
            try:
                _mem_one(args, zi, mode, size, host_dit, host_te, compile_, sample_text_to_image)
            except Exception as e:  # noqa: BLE001
                note(f"mem {mode} {size} failed: {e!r}"[:400])
                traceback.print_exc()
            gc.collect()
            torch.cuda.empty_cache()


def _mem_one(args, zi, mode, size, host_dit, host_te, compile_, sample_text_to_image) -> None:
    """One memory mode: "resident" (all on the GPU), "te_offload" (TE layers streamed from pinned
    host memory per encode, DiT+VAE resident), "lowvram" (TE streamed, DiT partly streamed with as
    many blocks resident as fit --lowvram-budget, tiled VAE decode)."""
    from transformers import Qwen3Config, Qwen3Model

    from zimage_core.text_encoder import ZImageTextEncoder
    from zimage_core.transformer import ZImageTransformer
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() / GiB
    # TE: resident, or its 35 layers streamed with two GPU slots (embedding resident)
    cfg = Qwen3Config(**{**QWEN3_4B, "num_hidden_layers": QWEN3_4B["num_hidden_layers"] - 1})
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        m = Qwen3Model(cfg)
    m.norm = torch.nn.Identity()
    with torch.device(DEV):
        m.rotary_emb = type(m.rotary_emb)(config=cfg)
    n_last = QWEN3_4B["num_hidden_layers"] - 1
    sd = {k: v for k, v in host_te.items() if not k.startswith(f"layers.{n_last}.") and k != "norm.weight"}
    if mode == "resident":
        load_assign(m, {k: v.to(DEV, non_blocking=True) for k, v in sd.items()}, "ours TE")
    else:
        load_assign(m, sd, "ours TE (host)")
    m.eval()
    enc = ZImageTextEncoder(m, zi.tokenizer())
    if mode != "resident":
        enc.stream_weights(DEV)  # nothing of the TE stays on the GPU between prompts
    vae = zi._build_vae_ours(args.e2e_vae)
    tiled = mode in ("lowvram", "comfy_lowvram")
    # DiT
    with torch.device("meta"):
        dit = ZImageTransformer(zi.ours_config(), dtype=DT, device="meta")
    resident = None
    patcher = None
    if mode == "comfy_lowvram":
        # ComfyUI's own lowvram machinery on our model: comfy.ops layers in a ModelPatcher, partially
        # loaded; layers that do not fit are cast to the GPU per call by comfy.ops.
        import_comfy()
        import comfy.model_patcher
        import comfy.ops
        with torch.device("meta"):
            dit = ZImageTransformer(zi.ours_config(), operations=comfy.ops.manual_cast, dtype=DT, device="meta")
        load_assign(dit, host_dit, "ours DiT (comfy ops, host)")

        class Holder(torch.nn.Module):  # ModelPatcher sets .device on the module it manages
            def __init__(self, inner):
                super().__init__()
                self.diffusion_model = inner
                self.device = None
        holder = Holder(dit)
        patcher = comfy.model_patcher.ModelPatcher(holder, load_device=torch.device(DEV),
                                                   offload_device=torch.device("cpu"))
        now = torch.cuda.memory_allocated() / GiB
        budget = int(max(0.5, args.lowvram_budget - now - args.lowvram_act - 0.5) * GiB)
        patcher.load(torch.device(DEV), lowvram_model_memory=budget, force_patch_weights=False, full_load=False)
        resident = f"comfy budget {budget / GiB:.2f} GiB, " + str(
            sum(1 for mm in dit.modules() if getattr(mm, "comfy_cast_weights", False))) + " cast modules"
        compile_ = False
    elif mode == "lowvram":
        load_assign(dit, host_dit, "ours DiT (host)")
        block = sum(t.numel() * t.element_size() for t in dit.layers[0].parameters()) / GiB
        other = sum(t.numel() * t.element_size() for n, t in dit.named_parameters()
                    if not n.startswith("layers.")) / GiB
        now = torch.cuda.memory_allocated() / GiB
        resident = max(0, int((args.lowvram_budget - now - other - 2 * block - args.lowvram_act) / block))
        dit.stream_blocks(DEV, resident=resident)
        resident = dit.streamer.resident
    else:
        load_assign(dit, {k: v.to(DEV, non_blocking=True) for k, v in host_dit.items()}, "ours DiT")
    dit.eval()
    if compile_:
        dit.compile_blocks()
    noise = torch.randn(F.latent_shape(size), generator=torch.Generator().manual_seed(7))

    last: dict[str, torch.Tensor] = {}

    def run():
        caps = enc.encode([PROMPT])
        lat = sample_text_to_image(dit, caps, noise, steps=8)
        last["lat"] = lat
        return vae.vae.decode(lat, tiled=tiled)
    sync()
    weights_gib = torch.cuda.memory_allocated() / GiB - base_alloc
    warm, img = first_call(run)
    # Every mode must give the resident mode's latents (streaming only moves weights around).
    ref_lat = MEM_REF.setdefault(size, last["lat"].float().cpu())
    lat_rel = _rel(last["lat"].float().cpu(), ref_lat)
    torch.cuda.reset_peak_memory_stats()
    times = time_ms(run, 2, warmup=0)
    peak = torch.cuda.max_memory_allocated() / GiB - base_alloc
    resv = torch.cuda.max_memory_reserved() / GiB
    te_times = time_ms(lambda: enc.encode([PROMPT]), 3, warmup=1)
    x = noise.to(DEV, DT)
    caps = enc.encode([PROMPT])
    sig = torch.full((1,), 0.75, device=DEV)
    step_times = time_ms(lambda: dit(x, sig, caps), 3, warmup=1)
    record("ours" + ("+compile" if compile_ else ""), f"mem:{mode}", size, 1, times, first_call_ms=warm,
           gpu_weights_gib=weights_gib, peak_alloc_gib=peak, peak_reserved_gib=resv,
           te_ms=statistics.median(te_times), step_ms=statistics.median(step_times), tiled_vae=tiled,
           dit_resident_blocks=resident, latent_rel_vs_resident=lat_rel, finite=bool(torch.isfinite(img).all()))
    if dit.streamer is not None:
        dit.streamer.remove("cpu")
    if patcher is not None:
        patcher.detach()
    dit = m = enc = vae = img = patcher = None
    gc.collect()
    torch.cuda.empty_cache()


@torch.inference_mode()
def stage_vaetiled(args, zi: Impls) -> None:
    """ours' VAE decode whole vs tiled at each size: time and peak (activations only)."""
    fn = zi.get_vae("ours")
    for size in args.sizes:
        lat = torch.randn(F.latent_shape(size), generator=torch.Generator().manual_seed(3)).to(DEV)
        for tiled in (False, True):
            try:
                with peak_mem() as pm:
                    times = time_ms(lambda lat=lat, tiled=tiled: fn.vae.decode(lat, tiled=tiled), 3, warmup=1)
                record("ours", "vae_tiled" if tiled else "vae_whole", size, 1, times,
                       activ_peak_gib=pm["peak_alloc_gib"] - pm["base_alloc_gib"], **pm)
            except Exception as e:  # noqa: BLE001
                note(f"vae tiled={tiled} {size} failed: {e!r}"[:300])
                gc.collect()
                torch.cuda.empty_cache()


def _profile(label: str, fn: Callable[[], Any], nrows: int = 12) -> dict[str, Any]:
    fn()
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    agg: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        agg.setdefault(ev.name, []).append(getattr(ev, "device_time_total", None) or ev.cuda_time_total)
    rows = sorted(((sum(v) / 1e3, len(v), k) for k, v in agg.items()), reverse=True)
    total = sum(r[0] for r in rows)
    cats: dict[str, float] = {}
    for ms, _, name in rows:
        n = name.lower()
        cat = ("attention" if ("fmha" in n or "flash" in n or "sdpa" in n or "attn" in n) else
               "matmul" if ("gemm" in n or "xmma" in n or "cutlass" in n or "nvjet" in n or "matmul" in n) else
               "conv" if ("conv" in n or "implicit" in n or "winograd" in n or "cudnn" in n) else
               "elementwise/other")
        cats[cat] = cats.get(cat, 0.0) + ms
    log(f"--- profile {label}: GPU kernel time {total:.1f} ms; " +
        ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(cats.items(), key=lambda t: -t[1])))
    for ms, cnt, name in rows[:nrows]:
        log(f"   {ms:8.2f} ms  x{cnt:<4d} {name[:110]}")
    return {"kernel_total_ms": total, **{f"{k}_ms": v for k, v in cats.items()},
            "top": [(round(ms, 2), cnt, name[:100]) for ms, cnt, name in rows[:15]]}


@torch.inference_mode()
def stage_profile(args, zi: Impls) -> None:
    """Top CUDA kernels of one DiT step (and one VAE decode) per impl at the first size."""
    size = args.sizes[0]
    x, caps, _ = make_inputs(zi, size, 1)
    sig = torch.full((1,), 0.75, device=DEV)
    for impl in dit_impls(args, "profile"):
        try:
            fn = zi.get_dit(impl)
            record(impl, "profile", size, 1, None, **_profile(f"{impl} step {size}^2",
                                                              lambda fn=fn: fn(x, sig, caps)))
        except Exception as e:  # noqa: BLE001
            note(f"profile {impl} failed: {e!r}"[:300])
    if args.profile_vae:
        lat = torch.randn(F.latent_shape(size), generator=torch.Generator().manual_seed(3)).to(DEV, DT)
        for impl in ["ours+" + v if v else "ours" for v in args.profile_vae.split(",")] + ["diffusers"]:
            fn = zi.get_vae(impl)
            record(impl, "profile_vae", size, 1, None, **_profile(f"{impl} VAE decode {size}^2",
                                                                  lambda fn=fn: fn(lat), 16))


@torch.inference_mode()
def stage_warmup(args, zi: Impls) -> None:
    """First-call cost of ours+compile in a fresh process: compiler import, wrapping (and loading the
    saved compile artifacts with --compile-cache), then the first step, or with --first-image the
    whole first image (text encode + 8 steps + decode with the e2e VAE, compilation included).
    Run it as the only stage, twice, in fresh processes with the same --compile-cache: once with the
    folder empty (cold), once after (warm). Give each run its own empty TORCHINDUCTOR_CACHE_DIR and
    TRITON_CACHE_DIR so that only the saved artifacts can help the warm run. Random weights are built
    before the clock starts (loading checkpoints is not part of this figure)."""
    size = args.sizes[0]
    x, caps, _ = make_inputs(zi, size, 1)
    sig = torch.full((1,), 0.75, device=DEV)
    _ = zi.dit_sd
    cache_dir = args.compile_cache or None
    cache_files = len(list(Path(cache_dir).glob("*.bin"))) if cache_dir and Path(cache_dir).is_dir() else 0
    enc = vae = None
    if args.first_image:
        enc = zi.get_te("ours").encoder
        vae = zi.get_vae("ours+" + args.e2e_vae if args.e2e_vae else "ours")
    t0 = time.perf_counter()
    if args.warmup_impl == "compile":  # the eager paths never import the compiler
        import importlib
        importlib.import_module("torch._dynamo")
        importlib.import_module("torch._inductor.config")
    t_import = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = zi.new_ours()
    ok = m.compile_blocks(cache_dir=cache_dir) if args.warmup_impl == "compile" else False
    if args.warmup_impl == "graph":
        m.use_cuda_graphs()
    t_wrap = time.perf_counter() - t0
    if args.first_image:
        from zimage_core.sampling import sample_text_to_image
        noise = torch.randn(F.latent_shape(size), generator=torch.Generator().manual_seed(7))

        def call():
            lat = sample_text_to_image(m, enc.encode([PROMPT]), noise, steps=8)
            return vae(lat)
        what = "first_image"
    else:
        def call():
            return m(x, sig, caps)
        what = "warmup"
    first, _ = first_call(call)
    t_save = 0.0
    if cache_dir:  # what the DiT's own save did not hold yet (the VAE's fused kernels compile after it)
        from zimage_core.accel import CompileCache
        t0 = time.perf_counter()
        CompileCache(cache_dir).save_if_new()
        t_save = time.perf_counter() - t0
    second, _ = first_call(call)
    times = time_ms(call, 3 if args.first_image else 5, warmup=0)
    impl = {"compile": "ours+compile", "eager": "ours", "graph": "ours+graph"}[args.warmup_impl]
    record(impl, what, size, 1, times, cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default"),
           triton_cache=os.environ.get("TRITON_CACHE_DIR", "default"),
           compile_cache=cache_dir or "", cache_files_before=cache_files, compiled=ok, import_s=t_import,
           wrap_s=t_wrap, first_call_s=first / 1e3, save_s=t_save, second_call_ms=second,
           total_first_s=t_import + t_wrap + first / 1e3)


@torch.inference_mode()
def stage_kernels(args, zi: Impls) -> None:
    """GPU check of the fused kernels (zimage_core.accel) at the first size's joint sequence length, run
    first: fused against the torch reference path and against float64 math (max abs / max rel error), and
    their times. fp8 attention against cuDNN bf16 SDPA, both against an fp32 SDPA."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from zimage_core.accel import fp8_attention as fa
    from zimage_core.accel import kernels
    from zimage_core.transformer.model import RMSNorm
    try:
        ENV["flash_attention_impls"] = list(torch.nn.attention.list_flash_attention_impls())
    except Exception as e:  # noqa: BLE001
        ENV["flash_attention_impls"] = f"n/a: {e!r}"[:100]
    probe = torch.zeros(1, device=DEV, dtype=DT)
    if not kernels.fused_ok(probe):
        note(f"kernels: fused path unavailable here (triton importable: {kernels.triton_kernels() is not None})")
        return
    size = args.sizes[0]
    cap = int(zi.prompt_ids([PROMPT])[0].numel())
    n = F.padded(F.image_tokens(size)) + F.padded(cap)  # the main blocks' joint sequence
    d, h = DIT["dim"], DIT["n_heads"]
    hd, ffn, eps = DIT_CONFIG.head_dim, DIT_CONFIG.ffn_hidden, DIT["norm_eps"]
    g = torch.Generator(device=DEV).manual_seed(0)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, device=DEV, generator=g) * std).to(DT)

    def norm(dim):
        m = RMSNorm(dim, eps, dtype=DT, device=DEV)
        m.weight.copy_(1 + rnd(dim, std=0.1))
        return m

    def rms64(t, m):
        t = t.double()
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * m.weight.double()

    def errs(got, want):
        got, want = got.double(), want.double()
        mx = (got - want).abs().max().item()
        return mx, mx / want.abs().max().item()

    def check(name, fused, ref, exact):
        f, r = fused(), ref()
        f, r = (f if isinstance(f, tuple) else (f,)), (r if isinstance(r, tuple) else (r,))
        e = exact()
        e = e if isinstance(e, tuple) else (e,)
        fused_ms = statistics.median(time_ms(fused, reps, warm))
        ref_ms = statistics.median(time_ms(ref, reps, warm))
        for i, (fi, ri, ei) in enumerate(zip(f, r, e, strict=True)):
            fv, rv = errs(fi, ri), errs(fi, ei)
            record("kernel", name + (f"[{i}]" if len(f) > 1 else ""), size, 1, None,
                   fused_vs_ref_max_abs=fv[0], fused_vs_ref_max_rel=fv[1], fused_vs_fp64_max_rel=rv[1],
                   ref_vs_fp64_max_rel=errs(ri, ei)[1], fused_ms=fused_ms, ref_ms=ref_ms,
                   speedup=ref_ms / fused_ms, finite=bool(torch.isfinite(fi).all()))

    reps, warm = (2, 1) if TINY else (20, 3)
    x, y = rnd(1, n, d), rnd(1, n, d, std=4.0)
    scale, gate, scale2, _ = rnd(1, 1, 4 * d, std=0.5).chunk(4, dim=2)
    n1, n2, n3 = norm(d), norm(d), norm(d)
    check("norm_modulate", lambda: kernels.norm_modulate(x, n1, scale, True),
          lambda: kernels.norm_modulate(x, n1, scale, False), lambda: rms64(x, n1) * (1 + scale.double()))

    def gr_exact():
        out = x.double() + torch.tanh(gate.double()) * rms64(y, n2)
        return out, rms64(out.to(DT), n3) * (1 + scale2.double())
    check("gated_residual+next", lambda: kernels.gated_residual(x, y, n2, gate, True, n3, scale2),
          lambda: kernels.gated_residual(x, y, n2, gate, False, n3, scale2), gr_exact)

    qkv = rnd(1, n, 3, h, hd)
    qn, kn = norm(hd), norm(hd)
    ang = torch.rand(1, n, 1, hd // 2, device=DEV, generator=g, dtype=torch.float64) * 100
    c, si = ang.cos(), ang.sin()
    rope = torch.stack([torch.stack([c, -si], -1), torch.stack([si, c], -1)], -2).to(DT)
    work = qkv.clone()

    def qk_fused():
        work.copy_(qkv)
        return tuple(t.clone() for t in kernels.qk_norm_rope(work, qn, kn, rope, True)[:2])

    def qk_ref():
        return kernels.qk_norm_rope(qkv, qn, kn, rope, False)[:2]

    def qk_exact():
        out = []
        for t, m in ((qkv[:, :, 0], qn), (qkv[:, :, 1], kn)):
            t = rms64(t, m)
            r = rope.double()
            x0, x1 = t[..., 0::2], t[..., 1::2]
            out.append(torch.stack([r[..., 0, 0] * x0 + r[..., 0, 1] * x1, r[..., 1, 0] * x0 + r[..., 1, 1] * x1],
                                   -1).flatten(-2))
        return tuple(out)
    check("qk_norm_rope (+copy)", qk_fused, qk_ref, qk_exact)

    a, b = rnd(1, n, ffn, std=2.0), rnd(1, n, ffn, std=2.0)
    check("silu_mul", lambda: kernels.silu_mul(a, b, True), lambda: kernels.silu_mul(a, b, False),
          lambda: torch.nn.functional.silu(a.double()) * b.double())

    # fp8 activation quantisation fused into the producers (fuse_fp8_activations): e4m3 codes x row scales
    # against float64 math; timed against the fused bf16 kernel followed by Fp8Linear's own quantisation.
    from zimage_core.accel.fp8 import FP8_MAX

    def torch_quant(t):
        t2 = t.reshape(-1, t.shape[-1])
        s = (t2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_(min=1e-12)
        return (t2.float() / s).to(torch.float8_e4m3fn), s

    def quant_check(name, fused_q, unfused, exact):
        try:
            _quant_check(name, fused_q, unfused, exact)
        except Exception as e:  # noqa: BLE001 - the rest of the kernel check still runs
            note(f"kernels: {name} failed: {e!r}"[:300])
            traceback.print_exc()

    def _quant_check(name, fused_q, unfused, exact):
        act = fused_q()
        e = exact().reshape(-1, act.shape[-1])
        deq = act.data.double().reshape(e.shape) * act.scale.double()
        ref_codes, ref_s = torch_quant(unfused())
        ref_deq = ref_codes.double() * ref_s.double()
        fq_ms = statistics.median(time_ms(fused_q, reps, warm))
        un_ms = statistics.median(time_ms(lambda: torch_quant(unfused()), reps, warm))
        record("kernel", name, size, 1, None, fused_vs_fp64_max_rel=(deq - e).abs().max().item() / e.abs().max().item(),
               ref_vs_fp64_max_rel=(ref_deq - e).abs().max().item() / e.abs().max().item(),
               fused_vs_ref_max_rel=(deq - ref_deq).abs().max().item() / ref_deq.abs().max().item(),
               codes_equal_frac=(act.data.reshape(e.shape).float() == ref_codes.float()).float().mean().item(),
               fused_ms=fq_ms, ref_ms=un_ms, speedup=un_ms / fq_ms, finite=bool(torch.isfinite(deq).all()))
    x, y = rnd(1, n, d), rnd(1, n, d, std=4.0)
    quant_check("norm_modulate→fp8", lambda: kernels.norm_modulate(x, n1, scale, True, True),
                lambda: kernels.norm_modulate(x, n1, scale, True), lambda: rms64(x, n1) * (1 + scale.double()))
    quant_check("gated_residual→next fp8", lambda: kernels.gated_residual(x, y, n2, gate, True, n3, scale2, True)[1],
                lambda: kernels.gated_residual(x, y, n2, gate, True, n3, scale2)[1],
                lambda: rms64(kernels.gated_residual(x, y, n2, gate, True, n3, scale2)[0], n3) * (1 + scale2.double()))
    quant_check("silu_mul→fp8", lambda: kernels.silu_mul(a, b, True, True), lambda: kernels.silu_mul(a, b, True),
                lambda: torch.nn.functional.silu(a.double()) * b.double())
    x = y = a = b = work = None

    # fp8 attention on realistic q/k (normed, rotated) and v
    q, k, v = kernels.qk_norm_rope(qkv, qn, kn, rope, False)
    t = lambda z: z.transpose(1, 2)  # noqa: E731
    exact = t(sdpa(t(q).float(), t(k).float(), t(v).float()))
    bf = t(sdpa(t(q), t(k), t(v)))
    fl = 4 * n * n * hd * h
    cudnn_ms = statistics.median(time_ms(lambda: sdpa(t(q), t(k), t(v)), reps, warm))
    rec = {"bf16_sdpa_rel": _rel(bf, exact), "bf16_sdpa_ms": cudnn_ms, "bf16_sdpa_tflops": fl / cudnn_ms / 1e9,
           "reference_emulation_rel": _rel(fa.attention_reference(q, k, v), exact),
           "kernel_supported": fa.kernel_supported(q)}
    if fa.kernel_supported(q):
        from zimage_core.accel import triton_attention as ta
        got = fa.fp8_attention(q, k, v)
        ms = statistics.median(time_ms(lambda: fa.fp8_attention(q, k, v), reps, warm))
        quant = ta.quantize_qkv(q, k, v)
        kms = statistics.median(time_ms(lambda: ta.fp8_attention(q, k, v, quantized=quant), reps, warm))
        p16 = ta.fp8_attention(q, k, v, p_fp8=False)
        p16_ms = statistics.median(time_ms(lambda: ta.fp8_attention(q, k, v, p_fp8=False, quantized=quant), reps, warm))
        rec.update(fp8_rel=_rel(got, exact), fp8_vs_bf16_rel=_rel(got, bf), fp8_ms=ms, fp8_kernel_only_ms=kms,
                   fp8_kernel_tflops=fl / kms / 1e9, fp8_p16_rel=_rel(p16, exact), fp8_p16_kernel_ms=p16_ms,
                   speedup_vs_cudnn=cudnn_ms / ms, finite=bool(torch.isfinite(got).all()))
    record("kernel", "fp8_attention", size, 1, None, **rec)


@torch.inference_mode()
def stage_fp8err(args, zi: Impls) -> None:
    """8-step error of every fp8 variant against bf16, side by side: ours' fp8 (per-row weight scales, per-token
    activation scales) and ComfyUI's fp8_e4m3fn_fast (unit scales). The same noise, caption features and Euler
    loop (euler_denoise: fp32 latents, bf16 model input) for every impl; each fp8 impl is compared with its own
    bf16 impl and with ours bf16, in latents and in pixels (ours' VAE)."""
    size = args.parity_size if args.parity_size in args.sizes else args.sizes[0]
    _, caps, _ = make_inputs(zi, size, 1, seed=5)
    noise = torch.randn(F.latent_shape(size), generator=torch.Generator().manual_seed(11)).to(DEV)
    # eager variants only: a graph replays the eager kernels, and compiled fp8 rounds as eager fp8 does
    impls = [i for i in dit_impls(args) if "fp8" in i and "compile" not in i and "graph" not in i]
    refs = {"ours": "ours", "comfy": "comfy"}
    lat: dict[str, torch.Tensor] = {}
    for impl in [*refs.values(), *impls]:
        if impl in lat or (impl == "comfy" and "comfy" not in args.impls):
            continue
        try:
            lat[impl] = euler_denoise(zi.get_dit(impl), noise, caps[:1], TURBO_SIGMAS_8)
        except Exception as e:  # noqa: BLE001
            note(f"fp8err: {impl} failed: {e!r}"[:300])
            traceback.print_exc()
    if "ours" not in lat:
        return
    vae = zi.get_vae("ours+" + args.e2e_vae if args.e2e_vae else "ours")
    img = {i: vae(v.to(DT)).float() for i, v in lat.items()}

    def errs(a: str, b: str) -> dict[str, float]:
        mse = ((img[a] - img[b]) ** 2).mean()
        return {"latent_rel_err": _rel(lat[a], lat[b]), "pixel_rel_err": _rel(img[a], img[b]),
                "pixel_mean_abs": (img[a] - img[b]).abs().mean().item(),
                "psnr_db": (10 * torch.log10(1.0 / mse)).item() if mse > 0 else float("inf")}
    if "comfy" in lat:
        record("comfy", "bf16_vs_ours_bf16_8step", size, 1, None, **errs("comfy", "ours"))
    for impl in impls:
        if impl not in lat:
            continue
        own = refs[impl.split("+")[0]]
        extra = {f"vs_ours_{k}": v for k, v in errs(impl, "ours").items()}
        record(impl, "fp8_vs_bf16_8step", size, 1, None, reference=own, finite=bool(torch.isfinite(lat[impl]).all()),
               **(errs(impl, own) if own in lat else {}), **extra)


@torch.inference_mode()
def stage_graphs(args, zi: Impls) -> None:
    """GPU check of the whole-step CUDA graphs: for ours (bf16) and ours+fp8, a graph replay against the eager
    step on the same inputs (the replay must give the eager bits), capture time, replay vs eager step time, and
    a replaced weight (what a LoRA patch does) being noticed."""
    size = args.sizes[0]
    x, caps, _ = make_inputs(zi, size, 1)
    sig = torch.full((1,), 0.75, device=DEV)
    x2, caps2, _ = make_inputs(zi, size, 1, seed=9)
    for base in ("ours", "ours+fp8"):
        try:
            eager = zi.get_dit(base).model
            g_impl = base + "+graph"
            m = zi.get_dit(g_impl).model
            want, want2 = eager(x, sig, caps).float(), eager(x2, sig * 0.5, caps2).float()
            m.cuda_graphs.clear()
            step = lambda m=m: m(x, sig, caps)  # noqa: E731
            first_ms, _ = first_call(step)  # eager
            capture_ms, out_c = first_call(step)  # warm-up on the side stream + capture
            out1 = m(x, sig, caps).float()  # replay
            out2 = m(x2, sig * 0.5, caps2).float()  # replay, other inputs
            eager_ms = statistics.median(time_ms(lambda e=eager: e(x, sig, caps), args.reps, 2))
            graph_ms = statistics.median(time_ms(step, args.reps, 2))
            g = m.cuda_graphs
            rec = {"captures": g.captures, "replays": g.replays, "first_call_ms": first_ms,
                   "capture_call_ms": capture_ms, "eager_step_ms": eager_ms, "graph_step_ms": graph_ms,
                   "speedup": eager_ms / graph_ms,
                   "replay_vs_eager_max_abs": (out1 - want).abs().max().item(),
                   "replay_other_inputs_vs_eager_max_abs": (out2 - want2).abs().max().item(),
                   "capture_call_vs_eager_max_abs": (out_c.float() - want).abs().max().item()}
            # a replaced Parameter (ComfyUI's LoRA patching, a reload) must be noticed: capture again
            blk = m.layers[0].feed_forward
            old = blk.w2.weight
            blk.w2.weight = torch.nn.Parameter(old.detach().clone(), requires_grad=False)
            before = g.captures
            for _ in range(3):
                out3 = m(x, sig, caps).float()
            rec.update(recaptured_after_weight_swap=g.captures == before + 1,
                       after_swap_vs_eager_max_abs=(out3 - want).abs().max().item())
            blk.w2.weight = old
            record(g_impl, "graph_check", size, 1, None, **rec)
        except Exception as e:  # noqa: BLE001
            note(f"graphs: {base} failed: {e!r}"[:300])
            traceback.print_exc()


@torch.inference_mode()
def stage_attn(args, zi: Impls) -> None:
    """Attention backends (zimage_core.accel.attention_backends) on the main blocks' shape at the first size:
    time per call and error against fp32 SDPA on realistic q/k (RMS-normed and rotated) and v, next to cuDNN
    bf16 (the default). A backend whose package is missing is a row saying so."""
    from zimage_core.accel import attention_backends as ab
    from zimage_core.accel import kernels
    from zimage_core.transformer.model import RMSNorm
    size = args.sizes[0]
    cap = int(zi.prompt_ids([PROMPT])[0].numel())
    n = F.padded(F.image_tokens(size)) + F.padded(cap)
    h, hd = DIT["n_heads"], DIT_CONFIG.head_dim
    g = torch.Generator(device=DEV).manual_seed(1)
    qkv = (torch.randn(1, n, 3, h, hd, device=DEV, generator=g) * 2).to(DT)
    norms = []
    for _ in range(2):
        m = RMSNorm(hd, 1e-5, dtype=DT, device=DEV)
        m.weight.copy_((1 + 0.1 * torch.randn(hd, device=DEV, generator=g)).to(DT))
        norms.append(m)
    ang = torch.rand(1, n, 1, hd // 2, device=DEV, generator=g, dtype=torch.float64) * 100
    c, si = ang.cos(), ang.sin()
    rope = torch.stack([torch.stack([c, -si], -1), torch.stack([si, c], -1)], -2).to(DT)
    q, k, v = kernels.qk_norm_rope(qkv, norms[0], norms[1], rope, False)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    exact = ab.sdpa(q.float(), k.float(), v.float(), None)
    fl = 4 * n * n * hd * h
    reps, warm = (2, 1) if TINY else (20, 3)
    base_ms = None
    ENV["attention_backends"] = ab.available()
    ENV["attention_default"] = ab.default_name()
    for name in ab.NAMES:
        try:
            fn = ab.get(name)
        except ImportError as e:
            record("attn", name, size, 1, None, available=False, why=str(e)[:200])
            continue
        try:
            out = fn(q, k, v, None)
            ms = statistics.median(time_ms(lambda fn=fn: fn(q, k, v, None), reps, warm))
            base_ms = ms if name == "sdpa" else base_ms
            rec = {"available": True, "ms": ms, "tflops": fl / ms / 1e9, "rel_vs_fp32": _rel(out, exact),
                   "finite": bool(torch.isfinite(out).all()), "shape": [1, n, h, hd]}
            if base_ms:
                rec["speedup_vs_sdpa"] = base_ms / ms
            if name == "cudnn_fp8":
                rec["rel_vs_emulation"] = _rel(out, ab.cudnn_fp8_reference(q, k, v))
            record("attn", name, size, 1, None, **rec)
        except Exception as e:  # noqa: BLE001
            record("attn", name, size, 1, None, available=True, failed=repr(e)[:300])
            traceback.print_exc()


STAGES = {"fp8err": stage_fp8err, "graphs": stage_graphs, "attn": stage_attn, "e2e_base": stage_e2e_base, "kernels": stage_kernels, "warmup": stage_warmup, "env": stage_env, "dit": stage_dit, "te": stage_te, "vae": stage_vae, "parity": stage_parity,
          "e2e": stage_e2e, "profile": stage_profile, "vaetiled": stage_vaetiled, "mem": stage_mem}


def write_out(args) -> None:
    out = Path(os.environ.get("OUT") or args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = out / f"bench_{args.tag}.json"
    p.write_text(json.dumps({"env": ENV, "args": {k: v for k, v in vars(args).items()}, "results": RESULTS,
                             "notes": NOTES}, indent=1, default=str))
    log(f"wrote {p}")


def print_table() -> None:
    log("\n=== summary ===")
    log(f"{'impl':<20}{'what':<14}{'size':>6}{'b':>3}{'median ms':>11}{'first ms':>11}{'MFU':>7}{'peak GiB':>10}{'resv GiB':>10}")
    for r in RESULTS:
        if "median_ms" not in r:
            continue
        mfu = f"{r['mfu'] * 100:.0f}%" if "mfu" in r else ""
        fc = f"{r['first_call_ms']:.0f}" if "first_call_ms" in r else ""
        log(f"{r['impl']:<20}{r['what']:<14}{str(r['size'] or ''):>6}{r['batch'] or '':>3}{r['median_ms']:>11.2f}{fc:>11}"
            f"{mfu:>7}{r.get('peak_alloc_gib', 0):>10.2f}{r.get('peak_reserved_gib', 0):>10.2f}")
    for n in NOTES:
        log("note:", n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="env,dit,te,vae", help="comma list of stages: " + ",".join(STAGES))
    ap.add_argument("--impls", default="ours,diffusers,comfy")
    ap.add_argument("--compile", default="", help="impls to also run compiled (torch.compile / regional)")
    ap.add_argument("--sizes", default="1024")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8, help="denoise steps (0 = skip the denoise timing)")
    ap.add_argument("--big", action="store_true", help="also run 2048^2 batch 4")
    ap.add_argument("--full-denoise", action="store_true", help="time the 8-step denoise above 1024^2 too")
    ap.add_argument("--ref-loop", action="store_true", help="time ours with the reference Euler loop")
    ap.add_argument("--no-te-graphs", action="store_true", help="ours' text encoder without CUDA graphs")
    ap.add_argument("--fp8", action="store_true", help="also time ours with fp8 weights")
    ap.add_argument("--fp8-attn", action="store_true", help="also time ours with fp8 weights + fp8 attention")
    ap.add_argument("--nofuse", action="store_true", help="also time ours eager without the fused Triton kernels")
    ap.add_argument("--native-fp8", action="store_true",
                    help="also time ComfyUI's own fp8_e4m3fn_fast (comfy+fp8fast, compiled too if comfy is compiled)")
    ap.add_argument("--impl-list", default="", help="exactly these DiT variants, in this order (overrides "
                    "--impls/--compile/--fp8/--extra for the DiT stages)")
    ap.add_argument("--e2e-impls", default="", help="only these variants in the e2e stage")
    ap.add_argument("--profile-impls", default="", help="only these variants in the profile stage")
    ap.add_argument("--e2e-base-impls", default="", help="only these variants in the e2e_base stage")
    ap.add_argument("--warmup-impl", default="compile", choices=["compile", "eager", "graph"],
                    help="warmup stage: ours compiled (default), eager, or eager with whole-step CUDA graphs")
    ap.add_argument("--extra", default="", help="more DiT variants by name, e.g. ours+graph,ours+fp8+graph,"
                    "ours+fp8+fp8q,ours+attn=cudnn_fp8 (see Impls._build_dit_ours / _build_dit_comfy)")
    ap.add_argument("--compile-cache", default="", help="folder for ours' compile artifacts (CompileCache)")
    ap.add_argument("--first-image", action="store_true",
                    help="warmup stage: time the whole first image (encode + 8 steps + decode), not one step")
    ap.add_argument("--compiled-only", action="store_true", help="skip the eager variants of --compile impls")
    ap.add_argument("--mem-modes", default="resident,te_offload,lowvram")
    ap.add_argument("--lowvram-budget", type=float, default=7.6, help="GiB the lowvram mode plans for")
    ap.add_argument("--lowvram-act", type=float, default=1.2, help="GiB kept free for activations in lowvram")
    ap.add_argument("--vae-variants", default="cl", help="extra VAE variants of ours: cl, cl+compile")
    ap.add_argument("--e2e-vae", default="cl+fuse", help="ours' VAE variant in e2e/mem stages")
    ap.add_argument("--profile-vae", default="", help="ours' VAE variants to profile, e.g. ',cl' ('' = none)")
    ap.add_argument("--vae-compile", action="store_true", help="use the compiled VAE in e2e for compiled impls")
    ap.add_argument("--parity-size", type=int, default=1024)
    ap.add_argument("--vae-channels-last", action="store_true")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--out", default="/tmp/zbench_out", help="JSON folder when $OUT is unset")
    args = ap.parse_args(argv)
    args.impls = [s for s in args.impls.split(",") if s]
    args.compile = [s for s in args.compile.split(",") if s]
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.batch = [int(s) for s in args.batch.split(",") if s]
    args.mem_modes = [s for s in args.mem_modes.split(",") if s]
    args.vae_variants = [s for s in args.vae_variants.split(",") if s]
    args.extra = [s for s in args.extra.split(",") if s]
    args.impl_list = [s for s in args.impl_list.split(",") if s]
    args.e2e_impls = [s for s in args.e2e_impls.split(",") if s]
    args.profile_impls = [s for s in args.profile_impls.split(",") if s]
    args.e2e_base_impls = [s for s in args.e2e_base_impls.split(",") if s]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    zi = Impls(args)
    stages = [s for s in args.only.split(",") if s]
    if "env" not in stages:
        stage_env_light()
    for s in stages:
        t0 = time.perf_counter()
        log(f"\n##### stage {s}")
        try:
            STAGES[s](args, zi)
        except Exception as e:  # noqa: BLE001
            note(f"stage {s} failed: {e!r}"[:400])
            traceback.print_exc()
        log(f"##### stage {s} done in {time.perf_counter() - t0:.1f} s")
        write_out(args)
    print_table()
    write_out(args)


def stage_env_light() -> None:
    if DEV == "cpu":
        ENV.update(gpu="cpu", torch=torch.__version__)
        return
    p = torch.cuda.get_device_properties(0)
    ENV.update(gpu=p.name, torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())


if __name__ == "__main__":
    main()
