"""The token layout of one Z-Image forward: which tokens there are, where they sit, how they are positioned.

The transformer refines three streams in their own blocks: images (the latent being generated and, for
Omni, reference latents) in the noise refiner, captions in the context refiner, and SigLIP image features
(Omni) in the SigLIP refiner; then it joins them into one sequence for the main blocks. This module is
the one owner of that layout: segment offsets, padding to a multiple of 32 tokens, RoPE position ids, the
key-padding masks of uneven batches and the per-token clean/noisy flags of Omni. Hooks, ControlNet and
runners read a `SequenceLayout`; nothing else assumes where the image sits.

Our joint order is [images; SigLIP; captions]. The references order the tokens otherwise (diffusers:
[image; caption] for text-to-image and [captions; images; SigLIP] for Omni; ComfyUI: [captions; SigLIP;
images]), but attention here has no causal mask, so the order changes nothing but the summation order:
positions come from the ids, not from the offsets. This order puts the tokens that every sample of a batch
has in equal number first, so batch padding sits at the end and the image sits at the same offset in every
sample.

Omni positions follow one of two references (`style`): "comfyui" (ComfyUI's NextDiT, what users' graphs
run) or "diffusers" (`ZImageTransformer2DModel`, `patchify_and_embed_omni`). Their differences:
- caption positions: ComfyUI numbers each padded caption on from the previous segment; diffusers counts
  the unpadded lengths, and its pad rows (position 0) are appended after each padded caption's grid, so the
  positions of a caption after a padded one are shifted by that padding (reproduced here);
- SigLIP positions: ComfyUI `floor(linspace(0, 8h - 1, h))` on the rows (columns alike); diffusers
  `int(i / max(h - 1, 1) * (H - 1))` with H the reference's latent height;
- a regular (non-Omni) checkpoint used with references: ComfyUI offsets by the padded caption length;
- which tokens are noisy: ComfyUI marks the generated image and its caption (and the captions after it);
  diffusers also marks the SigLIP pad tokens of the generated image;
- without SigLIP features: ComfyUI still has a SigLIP segment of 32 pad tokens for every image when the
  model has SigLIP layers; diffusers leaves the SigLIP stream out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..constants import SEQ_MULTIPLE, VAE_FACTOR

STYLES = ("comfyui", "diffusers")
CAPTION, IMAGE, SIGLIP = "caption", "image", "siglip"

# (scale_y, shift_y, scale_x, shift_x) of the image rows/columns in RoPE space; identity by default.
IMAGE_POS_IDENTITY = (1.0, 0.0, 1.0, 0.0)


def padded(n: int, multiple: int = SEQ_MULTIPLE) -> int:
    """n rounded up to a multiple of `multiple`."""
    return n + (-n) % multiple


@dataclass(frozen=True)
class ImageInput:
    """One image of the sequence: a reference (clean) or the latent being generated (noisy).

    `siglip`: the (rows, cols) grid of its SigLIP features, or None when it has none (then pad tokens)."""

    h_tokens: int
    w_tokens: int
    noisy: bool
    siglip: tuple[int, int] | None = None
    patch_size: int = 2


@dataclass(frozen=True)
class Segment:
    """A run of tokens of one kind; `start` counts within its stream; `valid` tokens, then padding."""

    kind: str
    index: int
    start: int
    length: int
    valid: int
    noisy: bool

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass
class Stream:
    """One stream's tokens for the batch: RoPE (B|1, L, 1, D/2, 2, 2), key-padding mask (B, 1, 1, L) or None
    when every sample has L tokens, and per-token noisy flags (B|1, L, 1) or None when every token is noisy."""

    length: int
    rope: torch.Tensor
    mask: torch.Tensor | None
    noisy: torch.Tensor | None


@dataclass
class SequenceLayout:
    """The layout of one forward. `images` / `siglips` are the same in every sample; `captions[b]` are
    sample b's caption segments (their lengths may differ, then the batch is masked)."""

    images: tuple[Segment, ...]
    siglips: tuple[Segment, ...]
    captions: tuple[tuple[Segment, ...], ...]
    image: Stream
    siglip: Stream | None
    caption: Stream
    joint: Stream
    style: str
    omni: bool

    @property
    def target(self) -> Segment:
        """The generated image's tokens: in the image stream and, images being first, in the joint sequence."""
        return self.images[-1]

    @property
    def image_len(self) -> int:
        return self.image.length

    @property
    def caption_start(self) -> int:
        """Where the captions begin in the joint sequence."""
        return self.image.length + (self.siglip.length if self.siglip is not None else 0)


def rope_table(ids: torch.Tensor, axes_dims: Sequence[int], theta: float) -> torch.Tensor:
    """Rotation matrices (L, D/2, 2, 2) float32 for position ids (L, n_axes).

    Frequencies 1/theta^(2k/d) and angles are computed in float64 and rounded to float32 like the
    reference, whose cos/sin come from float32 angles.
    """
    angles = []
    for axis, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles.append(torch.outer(ids[:, axis].to(torch.float64), freqs).float())
    angle = torch.cat(angles, dim=-1).double()
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Columns of [[cos, -sin], [sin, cos]]: col0 = (cos, sin), col1 = (-sin, cos).
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return rot.float()


def caption_ids(length: int, start: float = 1.0) -> torch.Tensor:
    """Caption slot i (pads included) sits at (start + i, 0, 0)."""
    ids = torch.zeros(length, 3, dtype=torch.float64)
    ids[:, 0] = torch.arange(length, dtype=torch.float64) + start
    return ids


def image_ids(t: float, h_tokens: int, w_tokens: int, padded_len: int,
              image_pos: tuple[float, float, float, float] = IMAGE_POS_IDENTITY) -> torch.Tensor:
    """Image tokens at (t, row, col) in (h, w) order; pad slots at (0, 0, 0). `image_pos` scales and shifts
    the rows and columns (ComfyUI's rope_options)."""
    n = h_tokens * w_tokens
    sy, ty, sx, tx = image_pos
    ids = torch.zeros(padded_len, 3, dtype=torch.float64)
    ids[:n, 0] = t
    rows, cols = torch.arange(h_tokens, dtype=torch.float64), torch.arange(w_tokens, dtype=torch.float64)
    if image_pos != IMAGE_POS_IDENTITY:
        rows, cols = rows * sy + ty, cols * sx + tx
    ids[:n, 1] = rows.repeat_interleave(w_tokens)
    ids[:n, 2] = cols.repeat(h_tokens)
    return ids


def _grid_ids(t: float, rows: torch.Tensor, cols: torch.Tensor, padded_len: int) -> torch.Tensor:
    ids = torch.zeros(padded_len, 3, dtype=torch.float64)
    n = len(rows) * len(cols)
    ids[:n, 0] = t
    ids[:n, 1] = rows.repeat_interleave(len(cols))
    ids[:n, 2] = cols.repeat(len(rows))
    return ids


@dataclass
class _Sample:
    """One sample's segments and position ids, stream by stream."""

    images: list[Segment]
    siglips: list[Segment]
    captions: list[Segment]
    image_ids: list[torch.Tensor]
    siglip_ids: list[torch.Tensor]
    caption_ids: torch.Tensor


def _segments(kind: str, lengths: Sequence[int], valid: Sequence[int], noisy: Sequence[bool]) -> list[Segment]:
    out, start = [], 0
    for i, (n, v, z) in enumerate(zip(lengths, valid, noisy, strict=True)):
        out.append(Segment(kind, i, start, n, v, z))
        start += n
    return out


def _comfyui_sample(caps: Sequence[int], images: Sequence[ImageInput], siglip: bool, omni: bool,
                    image_pos: tuple[float, float, float, float]) -> _Sample:
    """ComfyUI's NextDiT (`embed_all`, `embed_cap`, `patchify_and_embed`)."""
    n = len(images)
    cap_len = [padded(c) if c else SEQ_MULTIPLE for c in caps]  # a missing caption is one block of pads
    ids_cap, ids_img, ids_sig, sig_len = [], [], [], []
    offset = 0.0
    for j, img in enumerate(images):
        ids_cap.append(caption_ids(cap_len[j], 1.0 + offset))
        if omni and siglip:
            embedded = caps[j] + offset  # the unpadded caption length
            if img.siglip is not None:
                h, w = img.siglip
                rows = torch.linspace(0, h * VAE_FACTOR - 1, steps=h, dtype=torch.float32).floor().double()
                cols = torch.linspace(0, w * VAE_FACTOR - 1, steps=w, dtype=torch.float32).floor().double()
                sig_len.append(padded(h * w))
                ids_sig.append(_grid_ids(embedded + 2, rows, cols, sig_len[-1]))
            else:
                sig_len.append(SEQ_MULTIPLE)
                ids_sig.append(torch.zeros(SEQ_MULTIPLE, 3, dtype=torch.float64))
        else:
            embedded = cap_len[j] + offset
        ids_img.append(image_ids(embedded + 1, img.h_tokens, img.w_tokens, padded(img.h_tokens * img.w_tokens),
                                 image_pos))
        offset = embedded + 2
    for c, length in zip(caps[n:], cap_len[n:], strict=True):  # the captions after the generated image's
        ids_cap.append(caption_ids(length, 1.0 + offset))
        offset += c
    # ComfyUI: the references and their captions are clean; the generated image and every caption from its
    # own on are noisy; SigLIP tokens are clean.
    noisy_cap = [j >= n - 1 for j in range(len(caps))]
    return _Sample(
        _segments(IMAGE, [len(i) for i in ids_img], [i.h_tokens * i.w_tokens for i in images],
                  [i.noisy for i in images]),
        _segments(SIGLIP, sig_len, _siglip_valid(images, sig_len), [False] * len(sig_len)),
        _segments(CAPTION, cap_len, list(caps), noisy_cap),
        ids_img, ids_sig, torch.cat(ids_cap))


def _diffusers_sample(caps: Sequence[int], images: Sequence[ImageInput], siglip: bool,
                      image_pos: tuple[float, float, float, float]) -> _Sample:
    """diffusers' `patchify_and_embed_omni` (and, with one image and one caption, `patchify_and_embed`)."""
    n = len(images)
    if any(c <= 0 for c in caps):
        raise ValueError("diffusers' Omni layout needs a caption segment of at least one token for every image.")
    cap_len = [padded(c) for c in caps]
    rows_cap, cap_end = [], []
    cu = 1.0
    for c, length in zip(caps, cap_len, strict=True):
        # diffusers' _pad_with_ids: a grid over the padded length, then one (0, 0, 0) row per pad token again.
        rows_cap += [caption_ids(length, cu), torch.zeros(length - c, 3, dtype=torch.float64)]
        cu += c
        cap_end.append(cu)
        cu += 2
    ids_cap = torch.cat(rows_cap)[:sum(cap_len)]
    ids_img, ids_sig, sig_len = [], [], []
    for j, img in enumerate(images):
        ids_img.append(image_ids(cap_end[j], img.h_tokens, img.w_tokens, padded(img.h_tokens * img.w_tokens),
                                 image_pos))
        if not siglip:
            continue
        if img.siglip is not None:
            h, w = img.siglip
            lat_h, lat_w = img.h_tokens * img.patch_size, img.w_tokens * img.patch_size
            rows = (torch.arange(h, dtype=torch.float32) / max(h - 1, 1) * (lat_h - 1)).to(torch.int32).double()
            cols = (torch.arange(w, dtype=torch.float32) / max(w - 1, 1) * (lat_w - 1)).to(torch.int32).double()
            sig_len.append(padded(h * w))
            ids_sig.append(_grid_ids(cap_end[j] + 1, rows, cols, sig_len[-1]))
        else:
            sig_len.append(SEQ_MULTIPLE)
            ids_sig.append(torch.zeros(SEQ_MULTIPLE, 3, dtype=torch.float64))
    noisy_img = [i.noisy for i in images]
    return _Sample(
        _segments(IMAGE, [len(i) for i in ids_img], [i.h_tokens * i.w_tokens for i in images], noisy_img),
        _segments(SIGLIP, sig_len, _siglip_valid(images, sig_len), noisy_img[:len(sig_len)]),
        _segments(CAPTION, cap_len, list(caps), [noisy_img[j] if j < n else True for j in range(len(caps))]),
        ids_img, ids_sig, ids_cap)


def _siglip_valid(images: Sequence[ImageInput], lengths: Sequence[int]) -> list[int]:
    return [(i.siglip[0] * i.siglip[1]) if i.siglip else 0 for i in images][:len(lengths)]


def _flags(segments: Sequence[Segment], length: int) -> torch.Tensor:
    flags = torch.ones(length, dtype=torch.bool)
    for s in segments:
        flags[s.start:s.stop] = s.noisy
    return flags


def _shared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stacked over the batch, or one row when every sample's is the same."""
    first = tensors[0]
    if all(t.shape == first.shape and torch.equal(t, first) for t in tensors[1:]):
        return first.unsqueeze(0)
    return torch.stack(tensors)


def _key_mask(lengths: Sequence[int], total: int, device: torch.device) -> torch.Tensor | None:
    if len(set(lengths)) == 1 and lengths[0] == total:
        return None
    lens = torch.tensor(list(lengths))
    return (torch.arange(total)[None] < lens[:, None])[:, None, None, :].to(device)


def build_layout(captions: Sequence[Sequence[int]], images: Sequence[ImageInput], *, axes_dims: Sequence[int],
                 theta: float, device: torch.device, dtype: torch.dtype, style: str = "comfyui",
                 siglip: bool = False, image_pos: tuple[float, float, float, float] = IMAGE_POS_IDENTITY
                 ) -> SequenceLayout:
    """The layout of a batch.

    captions[b]: sample b's unpadded caption lengths in segment order: one per image (references first, the
    generated image last; 0 = none), then any captions that follow the generated image's. images: the
    references then the generated image, the same for every sample. siglip: whether there is a SigLIP stream
    (an Omni model with references). Text-to-image is one image and one caption per sample.
    """
    if style not in STYLES:
        raise ValueError(f"sequence style must be one of {STYLES}, got {style!r}.")
    if not images or not images[-1].noisy or any(i.noisy for i in images[:-1]):
        raise ValueError("the sequence needs the generated (noisy) image last, after the clean references.")
    if not captions or any(len(c) < len(images) for c in captions):
        raise ValueError(f"every sample needs a caption segment for each of its {len(images)} image(s).")
    omni = len(images) > 1
    siglip = siglip and omni
    if style == "diffusers" and omni:
        samples = [_diffusers_sample(c, images, siglip, image_pos) for c in captions]
    else:
        samples = [_comfyui_sample(c, images, siglip, omni, image_pos) for c in captions]

    first = samples[0]
    img_len = sum(s.length for s in first.images)
    sig_len = sum(s.length for s in first.siglips)
    cap_lens = [sum(s.length for s in smp.captions) for smp in samples]
    cap_max = max(cap_lens)

    joint_ids = []
    for smp, n in zip(samples, cap_lens, strict=True):
        cap = smp.caption_ids
        if n < cap_max:  # batch padding: continue the last caption's numbering (masked out anyway)
            last = smp.caption_ids[-1, 0].item()
            cap = torch.cat([cap, caption_ids(cap_max - n, last + 1)])
        joint_ids.append(torch.cat([*smp.image_ids, *smp.siglip_ids, cap]))
    ropes = [rope_table(ids, axes_dims, theta) for ids in joint_ids]
    dd = {"device": device, "dtype": dtype}

    def part(lo: int, hi: int) -> torch.Tensor:
        return _shared([r[lo:hi] for r in ropes]).unsqueeze(2).to(**dd)

    joint_len = img_len + sig_len + cap_max
    img_flags = _flags(first.images, img_len)
    sig_flags = _flags(first.siglips, sig_len)
    cap_flags = [_flags(smp.captions, cap_max) for smp in samples]
    noisy = None
    if omni:
        noisy = _shared([torch.cat([img_flags, sig_flags, f]) for f in cap_flags]).unsqueeze(-1).to(device)

    def stream_flags(lo: int, hi: int) -> torch.Tensor | None:
        return None if noisy is None else noisy[:, lo:hi]

    image = Stream(img_len, part(0, img_len), None, stream_flags(0, img_len))
    sig = (Stream(sig_len, part(img_len, img_len + sig_len), None, stream_flags(img_len, img_len + sig_len))
           if sig_len else None)
    caption = Stream(cap_max, part(img_len + sig_len, joint_len), _key_mask(cap_lens, cap_max, device),
                     stream_flags(img_len + sig_len, joint_len))
    joint = Stream(joint_len, part(0, joint_len), _key_mask([img_len + sig_len + n for n in cap_lens], joint_len,
                                                            device), noisy)
    return SequenceLayout(tuple(first.images), tuple(first.siglips), tuple(tuple(s.captions) for s in samples),
                          image, sig, caption, joint, style, omni)
