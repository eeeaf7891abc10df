"""Mask hybrid encoder (the ``neck``) of Mask-RT-DETR S/M/L/X/H.

Input: the four HGNetV2 maps at strides 4/8/16/32. The stride-4 map is kept aside for the
mask branch; the other three go through:

* ``input_proj.{i}``: 1x1 conv (no bias) + BN to ``hidden_dim``;
* AIFI: ``encoder.0.layers.{n}`` post-norm transformer layers (packed multi-head self-attention,
  GELU FFN) on one level (stride 16 for S/M, stride 32 for L/X/H), with a 2-D sin-cos position
  embedding computed from the actual feature size;
* CCFM: a top-down path (``lateral_convs`` 1x1, nearest x2 upsample, concat, ``fpn_blocks``
  CSPRep layers) and a bottom-up path (``downsample_convs`` 3x3/2, concat, ``pan_blocks``);
* mask branch: ``mask_feat_head`` (an FPN that brings every level to stride 8 and sums them, then
  ``output_conv``), bilinear x2 to stride 4, plus ``enc_mask_lateral(x4)``, then
  ``enc_mask_output`` (3x3 conv-BN-SiLU and a 1x1 conv with bias) to the prototypes.

``forward(feats) -> ([s8, s16, s32], mask_feat)`` (the reference output nesting).
Parameter names and order equal the official ``neck.*`` state-dict entries.
"""
from __future__ import annotations

import math
from typing import Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from instseg_core.modeling.resize import resize_bilinear, upsample_nearest2x

__all__ = ["MaskHybridEncoder", "mask_hybrid_encoder", "MASK_HYBRID_ENCODER_CONFIGS",
           "sincos_pos_embed_2d"]

# Per-size settings, read off the reference configs / state dicts.
MASK_HYBRID_ENCODER_CONFIGS: dict[str, dict] = {
    "S": dict(in_channels=[64, 256, 512, 1024], hidden_dim=256, dim_feedforward=1024,
              num_encoder_layers=1, encoder_level=1, expansion=0.5, num_blocks=3,
              mask_feat_channels=(64, 32), num_prototypes=128),
    "M": dict(in_channels=[96, 384, 768, 1536], hidden_dim=256, dim_feedforward=1024,
              num_encoder_layers=1, encoder_level=1, expansion=0.5, num_blocks=3,
              mask_feat_channels=(64, 64), num_prototypes=128),
    "L": dict(in_channels=[128, 512, 1024, 2048], hidden_dim=256, dim_feedforward=1024,
              num_encoder_layers=1, encoder_level=2, expansion=1.0, num_blocks=3,
              mask_feat_channels=(64, 64), num_prototypes=32),
    "X": dict(in_channels=[128, 512, 1024, 2048], hidden_dim=384, dim_feedforward=2048,
              num_encoder_layers=1, encoder_level=2, expansion=1.0, num_blocks=3,
              mask_feat_channels=(128, 128), num_prototypes=128),
    "H": dict(in_channels=[192, 512, 1024, 2048], hidden_dim=512, dim_feedforward=2048,
              num_encoder_layers=2, encoder_level=2, expansion=1.0, num_blocks=3,
              mask_feat_channels=(256, 128), num_prototypes=128),
}


# ------------------------------------------------------------------ building blocks
class _ConvBN(nn.Layer):
    """``conv`` (no bias, 'same' padding for odd k) + ``bn``, optional SiLU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2D(cin, cout, k, stride=stride, padding=(k - 1) // 2, bias_attr=False)
        self.bn = nn.BatchNorm2D(cout)
        self.act = act

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.silu(y) if self.act else y


class _RepVggBlock(nn.Layer):
    """Training form: SiLU(BN(conv3x3(x)) + BN(conv1x1(x)))."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = _ConvBN(ch, ch, 3, act=False)
        self.conv2 = _ConvBN(ch, ch, 1, act=False)

    def forward(self, x):
        return F.silu(self.conv1(x) + self.conv2(x))


class _CSPRepLayer(nn.Layer):
    """conv3(bottlenecks(conv1(x)) + conv2(x)); conv3 is the identity when expansion == 1."""

    def __init__(self, cin: int, cout: int, num_blocks: int = 3, expansion: float = 1.0):
        super().__init__()
        mid = int(cout * expansion)
        self.conv1 = _ConvBN(cin, mid, 1)
        self.conv2 = _ConvBN(cin, mid, 1)
        self.bottlenecks = nn.Sequential(*[_RepVggBlock(mid) for _ in range(num_blocks)])
        self.conv3 = _ConvBN(mid, cout, 1) if mid != cout else None

    def forward(self, x):
        y = self.bottlenecks(self.conv1(x)) + self.conv2(x)
        return y if self.conv3 is None else self.conv3(y)


class _MultiHeadSelfAttention(nn.Layer):
    """Multi-head attention with a packed ``in_proj_weight`` [E, 3E] (Paddle Linear layout)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        assert embed_dim % num_heads == 0
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = self.create_parameter(
            [embed_dim, 3 * embed_dim], default_initializer=nn.initializer.XavierUniform())
        self.in_proj_bias = self.create_parameter(
            [3 * embed_dim], is_bias=True, default_initializer=nn.initializer.Constant(0.0))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def _heads(self, x, i):
        e = self.embed_dim
        y = F.linear(x, self.in_proj_weight[:, i * e:(i + 1) * e], self.in_proj_bias[i * e:(i + 1) * e])
        b, n = y.shape[0], y.shape[1]
        return y.reshape([b, n, self.num_heads, self.head_dim]).transpose([0, 2, 1, 3])

    def forward(self, query, key, value, attn_mask=None):
        """``attn_mask``: optional bool [Lq, Lk], True where a query may attend to a key."""
        q, k, v = self._heads(query, 0), self._heads(key, 1), self._heads(value, 2)
        attn = paddle.matmul(q, k, transpose_y=True) * (self.head_dim ** -0.5)
        if attn_mask is not None:
            # blocked pairs get a large negative logit, so softmax gives them ~0 weight
            attn = attn + (attn_mask.astype(attn.dtype) - 1.0) * 1e9
        attn = F.softmax(attn, axis=-1)
        out = paddle.matmul(attn, v).transpose([0, 2, 1, 3])
        b, n = out.shape[0], out.shape[1]
        return self.out_proj(out.reshape([b, n, self.embed_dim]))


class _TransformerLayer(nn.Layer):
    """Post-norm encoder layer: LN(x + MHA(x+pos, x+pos, x)), then LN(x + FFN(x)), GELU."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = _MultiHeadSelfAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos):
        q = src + pos
        src = self.norm1(src + self.self_attn(q, q, src))
        return self.norm2(src + self.linear2(F.gelu(self.linear1(src))))


class _TransformerEncoder(nn.Layer):
    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.layers = nn.LayerList(
            [_TransformerLayer(d_model, nhead, dim_feedforward) for _ in range(num_layers)])

    def forward(self, src, pos):
        for layer in self.layers:
            src = layer(src, pos)
        return src


def sincos_pos_embed_2d(w: int, h: int, dim: int, temperature: float = 10000.0) -> paddle.Tensor:
    """[1, w*h, dim] sin-cos embedding, laid out like the reference.

    The grids come from an 'ij' meshgrid over (range(w), range(h)), flattened in C order, and the
    channels are [sin(gw*o), cos(gw*o), sin(gh*o), cos(gh*o)] with o = 1/T^(k/(dim/4)).
    (For a non-square map this pairs token index ``t`` with ``(t // h, t % h)``, as the reference
    does.)
    """
    assert dim % 4 == 0
    gw, gh = paddle.meshgrid(paddle.arange(w, dtype="float32"), paddle.arange(h, dtype="float32"))
    pos_dim = dim // 4
    omega = paddle.arange(pos_dim, dtype="float32") / pos_dim
    omega = 1.0 / (temperature ** omega)
    ow = gw.flatten()[:, None] @ omega[None]
    oh = gh.flatten()[:, None] @ omega[None]
    return paddle.concat([paddle.sin(ow), paddle.cos(ow), paddle.sin(oh), paddle.cos(oh)], axis=1)[None]


class _Upsample2x(nn.Layer):
    """``nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)``, same values, built
    without a ``bilinear_interp`` op (PIR cannot run that op under oneDNN; see ``..resize``)."""

    def forward(self, x):
        return resize_bilinear(x, scale_factor=2.0)


class _MaskFeatFPN(nn.Layer):
    """Every level (strides 8/16/32) -> ``feat_ch`` at stride 8 (3x3 conv-BN-SiLU, then bilinear x2
    per octave), summed, then ``output_conv`` (3x3) to ``out_ch``."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], feat_ch: int, out_ch: int):
        super().__init__()
        self.strides = list(strides)
        self.scale_heads = nn.LayerList()
        base = int(math.log2(self.strides[0]))
        for cin, s in zip(in_channels, self.strides):
            n = max(1, int(math.log2(s)) - base)
            mods = []
            for k in range(n):
                mods.append(nn.Sequential(_ConvBN(cin if k == 0 else feat_ch, feat_ch, 3)))
                if s != self.strides[0]:
                    mods.append(_Upsample2x())
            self.scale_heads.append(nn.Sequential(*mods))
        self.output_conv = _ConvBN(feat_ch, out_ch, 3)

    def forward(self, feats):
        out = self.scale_heads[0](feats[0])
        for head, f in zip(self.scale_heads[1:], feats[1:]):
            y = head(f)
            if tuple(y.shape[2:]) != tuple(out.shape[2:]):
                y = resize_bilinear(y, size=out.shape[2:])
            out = out + y
        return self.output_conv(out)


# ------------------------------------------------------------------ the encoder
class MaskHybridEncoder(nn.Layer):
    def __init__(self, in_channels: Sequence[int], hidden_dim: int = 256, dim_feedforward: int = 1024,
                 num_encoder_layers: int = 1, encoder_level: int = 2, expansion: float = 1.0,
                 num_blocks: int = 3, mask_feat_channels: Sequence[int] = (64, 64),
                 num_prototypes: int = 32, nhead: int = 8, pe_temperature: float = 10000.0,
                 feat_strides: Sequence[int] = (8, 16, 32)):
        super().__init__()
        x4_ch, *chans = list(in_channels)
        assert len(chans) == 3
        self.hidden_dim = hidden_dim
        self.encoder_level = encoder_level
        self.pe_temperature = pe_temperature
        self.num_prototypes = num_prototypes
        self.out_channels = [hidden_dim] * 3
        self.out_strides = list(feat_strides)

        self.input_proj = nn.LayerList([
            nn.Sequential(nn.Conv2D(c, hidden_dim, 1, bias_attr=False), nn.BatchNorm2D(hidden_dim))
            for c in chans])
        self.encoder = nn.LayerList([
            _TransformerEncoder(num_encoder_layers, hidden_dim, nhead, dim_feedforward)])
        n = len(chans)
        self.lateral_convs = nn.LayerList([_ConvBN(hidden_dim, hidden_dim, 1) for _ in range(n - 1)])
        self.fpn_blocks = nn.LayerList([
            _CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion) for _ in range(n - 1)])
        self.downsample_convs = nn.LayerList([
            _ConvBN(hidden_dim, hidden_dim, 3, stride=2) for _ in range(n - 1)])
        self.pan_blocks = nn.LayerList([
            _CSPRepLayer(2 * hidden_dim, hidden_dim, num_blocks, expansion) for _ in range(n - 1)])

        fc, oc = mask_feat_channels
        self.mask_feat_head = _MaskFeatFPN([hidden_dim] * n, feat_strides, fc, oc)
        self.enc_mask_lateral = _ConvBN(x4_ch, oc, 3)
        self.enc_mask_output = nn.Sequential(_ConvBN(oc, oc, 3), nn.Conv2D(oc, num_prototypes, 1))

    def forward(self, feats: list[paddle.Tensor]):
        assert len(feats) == 4
        x4, feats = feats[0], list(feats[1:])
        proj = [p(f) for p, f in zip(self.input_proj, feats)]

        # AIFI on one level
        i = self.encoder_level
        b, c, h, w = proj[i].shape
        tokens = proj[i].flatten(2).transpose([0, 2, 1])
        pos = sincos_pos_embed_2d(w, h, self.hidden_dim, self.pe_temperature)
        mem = self.encoder[0](tokens, pos)
        proj[i] = mem.transpose([0, 2, 1]).reshape([-1, self.hidden_dim, h, w])

        # CCFM top-down
        n = len(proj)
        inner = [proj[-1]]
        for idx in range(n - 1, 0, -1):
            j = n - 1 - idx
            high = self.lateral_convs[j](inner[0])
            inner[0] = high
            up = upsample_nearest2x(high)
            inner.insert(0, self.fpn_blocks[j](paddle.concat([up, proj[idx - 1]], axis=1)))
        # bottom-up
        outs = [inner[0]]
        for idx in range(n - 1):
            down = self.downsample_convs[idx](outs[-1])
            outs.append(self.pan_blocks[idx](paddle.concat([down, inner[idx + 1]], axis=1)))

        # mask feature at stride 4
        mask_feat = self.mask_feat_head(outs)
        mask_feat = resize_bilinear(mask_feat, scale_factor=2.0)
        mask_feat = mask_feat + self.enc_mask_lateral(x4)
        mask_feat = self.enc_mask_output(mask_feat)
        return outs, mask_feat


def mask_hybrid_encoder(size: str, **kwargs) -> MaskHybridEncoder:
    """The neck of Mask-RT-DETR-``size`` (S/M/L/X/H)."""
    key = str(size).upper()
    if key not in MASK_HYBRID_ENCODER_CONFIGS:
        raise ValueError(f"unknown Mask-RT-DETR size {size!r}; expected one of "
                         f"{sorted(MASK_HYBRID_ENCODER_CONFIGS)}")
    cfg = dict(MASK_HYBRID_ENCODER_CONFIGS[key])
    cfg.update(kwargs)
    return MaskHybridEncoder(**cfg)
