"""The block's fused kernels (zimage_core.accel.kernels / triton_kernels), fp8 attention and the
compile cache.

- The torch reference path of every fused step equals the math written out here in float64 within
  bf16 rounding (this path runs on the CPU, without Triton and under torch.compile).
- The Triton kernels themselves run through Triton's CPU interpreter in a child process
  (tests/kernels_interpret.py) when Triton is importable (or found under $ZIMAGE_TRITON_PATH); they
  must match the same float64 math within one unit of bf16 rounding, and the whole tiny transformer
  must give the reference path's output. (GPU speed and the GPU check: bench/bench.py --only kernels.)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.hostile_cache import crafted_cache
from zimage_core.accel import fp8_attention as fa
from zimage_core.accel import kernels
from zimage_core.accel.compile_cache import CompileCache, environment_key
from zimage_core.transformer import TransformerConfig, ZImageTransformer
from zimage_core.transformer.model import RMSNorm

REPO = Path(__file__).resolve().parents[1]
EPS = 1e-5
BF16_REL = 2.0 ** -8  # half a bf16 spacing, relative


def rms64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def close_bf16(got: torch.Tensor, want: torch.Tensor, roundings: int = 3) -> bool:
    """Within `roundings` bf16 roundings of the largest value (the torch path rounds after each op)."""
    return (got.double() - want).abs().max().item() <= roundings * BF16_REL * want.abs().max().item()


def _norm(d: int, seed: int) -> RMSNorm:
    n = RMSNorm(d, EPS, dtype=torch.bfloat16)
    with torch.no_grad():
        n.weight.copy_(1 + 0.2 * torch.randn(d, generator=torch.Generator().manual_seed(seed)))
    return n


def test_fused_path_is_off_on_the_cpu_without_the_interpreter():
    assert not kernels.fused_ok(torch.zeros(2, 3, 8, dtype=torch.bfloat16))


def test_reference_norm_modulate_and_gated_residual_match_the_math():
    torch.manual_seed(0)
    b, n, d = 2, 9, 64
    x = torch.randn(b, n, d).to(torch.bfloat16)
    y = (4 * torch.randn(b, n, d)).to(torch.bfloat16)
    scale, gate, scale2, _ = (0.5 * torch.randn(b, 1, 4 * d)).to(torch.bfloat16).chunk(4, dim=2)
    n1, n2, n3 = _norm(d, 1), _norm(d, 2), _norm(d, 3)
    with torch.no_grad():
        got = kernels.norm_modulate(x, n1, scale, False)
        assert close_bf16(got, rms64(x, n1.weight) * (1 + scale.double()))
        assert close_bf16(kernels.norm_modulate(x, n1, None, False), rms64(x, n1.weight))
        out, nxt = kernels.gated_residual(x, y, n2, gate, False, n3, scale2)
        want = x.double() + torch.tanh(gate.double()) * rms64(y, n2.weight)
        assert close_bf16(out, want)
        assert close_bf16(nxt, rms64(out, n3.weight) * (1 + scale2.double()))
        out, none = kernels.gated_residual(x, y, n2, None, False)
        assert none is None and close_bf16(out, x.double() + rms64(y, n2.weight))


def test_reference_qk_norm_rope_matches_the_rotation():
    torch.manual_seed(1)
    b, n, h, hd = 2, 7, 3, 16
    qkv = torch.randn(b, n, 3, h, hd).to(torch.bfloat16)
    qn, kn = _norm(hd, 4), _norm(hd, 5)
    ang = 3 * torch.randn(1, n, hd // 2).double()
    c, s = ang.cos(), ang.sin()
    rope = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)[:, :, None].to(torch.bfloat16)
    with torch.no_grad():
        q, k, v = kernels.qk_norm_rope(qkv, qn, kn, rope, False)
    for got, src, w in ((q, qkv[:, :, 0], qn.weight), (k, qkv[:, :, 1], kn.weight)):
        t = rms64(src, w)
        cc, ss = c[:, :, None], s[:, :, None]  # rotate each interleaved pair (x0, x1) by the angle
        want = torch.stack([cc * t[..., 0::2] - ss * t[..., 1::2], ss * t[..., 0::2] + cc * t[..., 1::2]], -1)
        assert close_bf16(got, want.flatten(-2), roundings=6)  # the bf16 table adds its own rounding
    assert torch.equal(v, qkv[:, :, 2])


def test_reference_silu_mul_and_fp16_clamp():
    a, g = torch.randn(3, 40).to(torch.bfloat16), torch.randn(3, 40).to(torch.bfloat16)
    assert close_bf16(kernels.silu_mul(a, g, False), F.silu(a.double()) * g.double())
    big = torch.full((2, 4), 60000.0, dtype=torch.float16)
    out = kernels.silu_mul(big, big, False)
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and (out == 65504).all()


def test_fp8_attention_reference_quantizes_rows_and_channels():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 33, 3, 32) for _ in range(3))
    q[:, :, 1] *= 1000  # one loud head: per-row scales keep the others precise
    qd, kd, vd = fa.quantize_reference(q, k, v)
    # e4m3 keeps 3 mantissa bits: every value within 1/16 relative (plus a step of the row/channel scale).
    # k and v are centred on their token means first (k's mean is dropped: softmax ignores it; v's is added back).
    km, vm = k.mean(1, keepdim=True), v.mean(1, keepdim=True)
    for got, src in ((qd, q), (kd, k - km), (vd - vm, v - vm)):
        assert ((got - src).abs() <= src.abs() / 16 + 1e-3 * src.abs().amax()).all()
    assert not torch.equal(qd, q)  # really rounded
    q[:, :, 1] /= 1000
    exact = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    got = fa.fp8_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())  # the CPU runs the reference path
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    rel = ((got.float() - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 0.1
    # A common offset in k and v (real checkpoints have them) costs no fp8 range: k and v are centred on
    # their token means before quantizing, which leaves the attention unchanged.
    k2, v2 = k + 30 * torch.randn(1, 1, 3, 32), v + 30 * torch.randn(1, 1, 3, 32)
    exact = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k2, v2))).transpose(1, 2)
    got = fa.attention_reference(q, k2, v2)
    assert ((got.float() - exact).norm() / exact.norm()).item() < 0.05


def test_fp8_attention_switch_on_the_model_is_off_by_default_and_changes_little():
    torch.manual_seed(3)
    cfg = TransformerConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                            axes_dims=(8, 12, 12))
    model = ZImageTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    assert not any(b.attention.fp8_attention for b in model.layers)
    args = (torch.randn(1, 16, 8, 8), torch.tensor([0.6]), [torch.randn(5, 32)])
    with torch.no_grad():
        ref = model(*args)
        model.set_fp8_attention(True)
        got = model(*args)
        model.set_fp8_attention(False)
        assert torch.equal(model(*args), ref)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1


def test_fused_kernels_switch_reaches_every_block():
    cfg = TransformerConfig(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                            axes_dims=(8, 12, 12))
    model = ZImageTransformer(cfg)
    assert model.fused_kernels
    model.fused_kernels = False
    assert not model.fused_kernels and not any(b.fused_kernels for b in model.layers)


# ---------------------------------------------------------------------------------------------
# the Triton kernels, through Triton's CPU interpreter (child process)
# ---------------------------------------------------------------------------------------------

def _triton_env() -> dict[str, str] | None:
    extra = os.environ.get("ZIMAGE_TRITON_PATH", "")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    probe = subprocess.run([sys.executable, "-c", "import triton"], env=env, capture_output=True)
    return env if probe.returncode == 0 else None


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    env = _triton_env()
    if env is None:
        why = "Triton is not importable (scripts/test.sh installs it; or point ZIMAGE_TRITON_PATH at a folder holding it)"
        if os.environ.get("CI"):
            pytest.fail(why)  # CI must check the kernels, not skip them
        pytest.skip(why)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "kernels_interpret.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KERNEL_RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].split(" ", 1)[1])


# The interpreter rounds fp32 -> bf16/fp16 by truncation (a GPU rounds to nearest), so a correct kernel
# is within one spacing of the float64 result (a little more where a sum cancels); a wrong one is far off.
@pytest.mark.parametrize("name", ["rms_norm_modulate_ulps", "rms_norm_plain_ulps", "gated_residual_ulps",
                                  "gated_next_ulps", "residual_nogate_ulps", "residual_next_noscale_ulps",
                                  "fp16_clamp_ulps", "qk_rope_q_ulps", "qk_rope_k_ulps",
                                  "qk_rope_shared_table_ulps", "silu_mul_ulps"])
def test_triton_kernel_matches_float64_math(interpreted, name):
    assert interpreted[name] <= 1.5


def test_triton_kernels_keep_v_and_clamp_fp16(interpreted):
    assert interpreted["qk_rope_v_untouched"] == 1.0
    assert interpreted["fp16_clamp_finite"] == 1.0
    assert interpreted["residual_nogate_next_is_none"] == 1.0


@pytest.mark.parametrize("name", ["norm_quant", "gated_quant", "silu_quant"])
def test_triton_kernels_quantise_for_the_fp8_matmul(interpreted, name):
    """norm·modulate, the FFN input and SiLU·mul written as e4m3 codes with one scale per row: the scale is
    max|row| / 448 of the exact values, the codes are the exact values rounded to e4m3 (GPU bench: max error)."""
    assert interpreted[name + "_scale_rel"] < 1e-6
    assert interpreted[name + "_is_fp8"] == 1.0
    assert interpreted[name + "_fp8_within_1ulp"] > 0.97
    assert interpreted["gated_quant_out_ulps"] <= 1.5  # the residual itself is unchanged


def test_fused_fp8_activations_in_the_whole_transformer(interpreted):
    # every block of the tiny model has fp8 matmuls; its output stays as close to fp32 as fp8 weights with
    # activations quantised by Fp8Linear (the interpreter's cruder e4m3 rounding costs a little)
    assert interpreted["fp8q_blocks"] == 4.0
    assert interpreted["fp8q_vs_fp8_rel"] < 0.05
    assert interpreted["fp8q_vs_fp32_rel"] < 2 * interpreted["fp8_vs_fp32_rel"]


def test_triton_fp8_attention(interpreted):
    # The flash algorithm on given fp8 inputs equals SDPA on their dequantized values (bf16 output).
    assert interpreted["attn_kernel_bf16p_rel"] < 1e-2
    # End to end through fp8 (the interpreter's fp8 rounding is cruder than a GPU's; the GPU bench
    # reports the real error).
    assert interpreted["attn_dispatch_uses_kernel"] == 1.0
    assert interpreted["attn_reference_rel"] < 0.1
    assert interpreted["attn_fp8_rel"] < 0.2
    assert interpreted["attn_fp8_offset_rel"] < 0.2


def test_triton_kernels_in_the_whole_transformer(interpreted):
    # fp32: fused and reference paths compute the same math in fp32 (rounding order aside).
    assert interpreted["model_fp32_fused_vs_ref_rel"] < 1e-5
    # compiled blocks (plain ops inside, the fp8 attention kernel as a custom op) agree with eager; fp8
    # attention itself moves the output a little, not a lot
    assert interpreted["model_compiled_fp8attn_vs_eager_rel"] < 2e-2
    assert 0 < interpreted["model_fp8attn_vs_ref_rel"] < 0.2


# ---------------------------------------------------------------------------------------------
# compile cache
# ---------------------------------------------------------------------------------------------

def test_compile_cache_saves_loads_and_survives_bad_files(tmp_path, caplog):
    key = tmp_path / "private" / "cc.key"
    cache = CompileCache(tmp_path / "cc", keep=2, key_file=key)
    assert cache.files() == [] and cache.load() == 0
    # Three foreign/damaged files: loading warns and goes on; keep=2 prunes the oldest on the next save.
    cache.folder.mkdir()
    for i in range(3):
        (cache.folder / f"{environment_key()}-bad{i}.bin").write_bytes(b"not a torch cache")
        os.utime(cache.folder / f"{environment_key()}-bad{i}.bin", (1000 + i, 1000 + i))
    (cache.folder / "other-env-x.bin").write_bytes(b"ignored: another torch/GPU")
    with caplog.at_level(logging.WARNING):
        assert cache.load() == 0
    assert len(cache.files()) == 3
    assert cache.load() == 0  # each file is tried once per process

    fn = torch.compile(lambda t: torch.sin(t) * 2 + 1, backend="inductor")
    fn(torch.randn(8))
    cache.note(("shape", 8))
    saved = cache.save_if_new()
    if saved is None:
        pytest.skip("this torch build produced no cache artifacts")
    assert saved.exists() and saved.name.startswith(environment_key())
    assert len(cache.files()) == 2 and saved in cache.files()
    assert cache.save_if_new() is None  # no new shape since
    assert CompileCache(tmp_path / "cc", key_file=key).load() == 0  # this process wrote (so already holds) it
    assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o777 == 0o700
    # A new process loads it (the damaged file left is skipped with a warning).
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from zimage_core.accel.compile_cache import CompileCache;"
            "print('LOADED', CompileCache(sys.argv[1], key_file=sys.argv[3]).load())")
    proc = subprocess.run([sys.executable, "-c", code, str(cache.folder), str(REPO), str(key)], capture_output=True,
                          text=True, timeout=300)
    assert "LOADED 1" in proc.stdout, proc.stderr[-2000:]
    # With another key (another installation or user sharing the folder) the same file is refused unread.
    proc = subprocess.run([sys.executable, "-c", code, str(cache.folder), str(REPO), str(tmp_path / "other.key")],
                          capture_output=True, text=True, timeout=300)
    assert "LOADED 0" in proc.stdout and "not signed by this installation" in proc.stderr, proc.stderr[-2000:]


def _load_in_child(folder: Path, key: Path) -> subprocess.CompletedProcess:
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from zimage_core.accel.compile_cache import CompileCache;"
            "print('LOADED', CompileCache(sys.argv[1], key_file=sys.argv[3]).load())")
    return subprocess.run([sys.executable, "-c", code, str(folder), str(REPO), str(key)], capture_output=True,
                          text=True, timeout=300)


def test_compile_cache_never_loads_a_planted_file(tmp_path):
    """A crafted cache file (its pickle writes a marker, its autotune key is an absolute path) under the name
    the cache looks for: the loader refuses it without handing it to torch, so neither marker appears."""
    folder, key = tmp_path / "cc", tmp_path / "private" / "cc.key"
    pickled, written = tmp_path / "pickle-ran", tmp_path / "abs-key-written"
    data = crafted_cache(pickled, written)
    folder.mkdir()
    (folder / f"{environment_key()}-{'0' * 64}.bin").write_bytes(data)  # a guessed signature
    (folder / f"{environment_key()}-planted.bin").write_bytes(data)
    proc = _load_in_child(folder, key)
    assert "LOADED 0" in proc.stdout and proc.stderr.count("not signed by this installation") == 2, proc.stderr
    assert not pickled.exists() and not written.exists()

    # Signed with the right key (e.g. the key leaked, or torch itself wrote a bad key): the entry whose key is an
    # absolute path is still refused before torch sees the file.
    import hashlib
    import hmac

    signed = hmac.new(key.read_bytes(), environment_key().encode() + b"\0" + data, hashlib.sha256).hexdigest()
    (folder / f"{environment_key()}-{signed}.bin").write_bytes(data)
    proc = _load_in_child(folder, key)
    assert "LOADED 0" in proc.stdout and "key leaves the cache folder" in proc.stderr, proc.stderr
    assert not pickled.exists() and not written.exists()


def test_compile_cache_is_off_when_its_key_is_not_private(tmp_path, caplog):
    key = tmp_path / "cc.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)  # readable by others: anyone could sign files
    cache = CompileCache(tmp_path / "cc", key_file=key)
    with caplog.at_level(logging.WARNING):
        assert cache.load() == 0 and cache.save() is None
    assert not cache.enabled and "not a private file" in caplog.text and str(key) in caplog.text
    inside = CompileCache(tmp_path / "cc2", key_file=tmp_path / "cc2" / "k")
    with caplog.at_level(logging.WARNING):
        assert inside.load() == 0
    assert not inside.enabled and "inside the cache folder" in caplog.text
