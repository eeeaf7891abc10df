"""Mask-RT-DETR transformer (``transformer.*``) and its post-process, eval mode.

Structure (decoder hidden 256 for every size):

* ``input_proj.{i}``: 1x1 conv (no bias) + BN on each of the 3 encoder levels (strides 8/16/32),
  flattened and concatenated to a memory of L = sum(h_i * w_i) tokens.
* Anchors (cx, cy, w, h) from the actual feature sizes: cell centres, size 0.05 * 2**level,
  "valid" when every coordinate lies in (0.01, 0.99); stored as logits, invalid ones set to +inf.
  The memory is multiplied by the valid mask.
* ``enc_output`` (Linear + LayerNorm) -> ``score_head`` logits; the top ``num_queries`` tokens by
  their max class logit become the queries (content = the encoder output, detached).
* Mask-enhanced reference boxes: the selected queries' masks (``mask_query_head(dec_norm(q))``
  times the mask feature) are thresholded at 0 and the box of the positive pixels (normalised
  cxcywh on the mask grid) is the initial reference (as logits).
* ``decoder.layers.{0..5}``: self-attention (q = k = tgt + pos, v = tgt), post-norm; multi-scale
  deformable cross-attention (3 levels, 8 heads, 4 points) with ``F.grid_sample``; ReLU FFN.
  ``query_pos_head`` embeds the (sigmoid) reference box; after each layer the box is refined:
  ``sigmoid(bbox_head(out) + inverse_sigmoid(ref))``. Class logits / masks of the last layer
  come from ``dec_norm`` -> ``score_head`` / ``mask_query_head``.

``MaskRTDETRTransformer.forward(feats, mask_feat)`` returns the reference nesting:
``(logits [1,1,Q,C], boxes [1,1,Q,4], masks [1,1,Q,h,w], (enc_logits, enc_boxes, enc_masks))``.
``mask_rtdetr_post_process`` turns the last-layer outputs into ``bbox`` / ``bbox_num`` / ``mask``.

Training (``train()``; ``forward(feats, mask_feat, targets)``) returns :class:`MaskRTDETRTrainOutputs`:
noised ground-truth queries (``losses.denoising``; label embedding ``denoising_class_embed``) are
prepended to the matching queries behind an attention mask, every decoder layer predicts classes,
boxes and masks, reference boxes are detached between layers, and the box a layer reports refines
the previous layer's *undetached* box ("look forward twice", DINO).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from instseg_core.modeling.losses.denoising import DenoisingGroup, build_denoising_group
from instseg_core.modeling.losses.detr_loss import SetPrediction
from instseg_core.modeling.necks.mask_hybrid_encoder import _MultiHeadSelfAttention
from instseg_core.modeling.resize import bilinear_matrix

__all__ = ["MaskRTDETRTransformer", "MaskRTDETRTrainOutputs", "mask_rtdetr_post_process",
           "mask_rtdetr_post_process_batch", "inverse_sigmoid",
           "generate_anchors", "mask_to_box_cxcywh", "ms_deformable_attention"]


def inverse_sigmoid(x: paddle.Tensor, eps: float = 1e-5) -> paddle.Tensor:
    x = x.clip(min=0.0, max=1.0)
    return paddle.log(x.clip(min=eps) / (1.0 - x).clip(min=eps))


def generate_anchors(shapes: Sequence[tuple[int, int]], grid_size: float = 0.05, eps: float = 1e-2):
    """Anchor logits [1, L, 4] (cx, cy, w, h; invalid -> +inf) and valid mask [1, L, 1] float32."""
    out = []
    for lvl, (h, w) in enumerate(shapes):
        ys = (paddle.arange(h, dtype="float32") + 0.5) / h
        xs = (paddle.arange(w, dtype="float32") + 0.5) / w
        gy, gx = paddle.meshgrid(ys, xs)
        wh = paddle.full([h, w], grid_size * (2.0 ** lvl), dtype="float32")
        out.append(paddle.stack([gx, gy, wh, wh], axis=-1).reshape([1, h * w, 4]))
    anchors = paddle.concat(out, axis=1)
    valid = paddle.logical_and(anchors > eps, anchors < 1 - eps).astype("float32").min(axis=-1, keepdim=True)
    logits = paddle.log(anchors / (1 - anchors))
    logits = paddle.where(valid > 0, logits, paddle.full_like(logits, float("inf")))
    return logits, valid


def mask_to_box_cxcywh(mask: paddle.Tensor) -> paddle.Tensor:
    """Boolean masks [B, Q, h, w] -> normalised cxcywh boxes [B, Q, 4] of the positive pixels.

    x1/y1 = smallest positive column/row, x2/y2 = largest + 1, divided by (w, h); empty -> zeros.
    """
    h, w = int(mask.shape[-2]), int(mask.shape[-1])
    m = mask.astype("float32")
    cols = m.max(axis=-2)  # [B, Q, w]
    rows = m.max(axis=-1)  # [B, Q, h]
    xs = paddle.arange(w, dtype="float32")
    ys = paddle.arange(h, dtype="float32")
    big = paddle.to_tensor(1e8, dtype="float32")
    x2 = (cols * xs).max(axis=-1) + 1
    y2 = (rows * ys).max(axis=-1) + 1
    x1 = paddle.where(cols > 0, xs.expand_as(cols), big).min(axis=-1)
    y1 = paddle.where(rows > 0, ys.expand_as(rows), big).min(axis=-1)
    box = paddle.stack([x1, y1, x2, y2], axis=-1)
    nonempty = cols.max(axis=-1, keepdim=True)
    box = box * nonempty / paddle.to_tensor([w, h, w, h], dtype="float32")
    x1, y1, x2, y2 = box.unbind(-1)
    return paddle.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def ms_deformable_attention(value, shapes, sampling_locations, attention_weights):
    """value [B, L, H, c]; sampling_locations [B, Q, H, nl, np, 2] in [0, 1];
    attention_weights [B, Q, H, nl, np] -> [B, Q, H*c] (bilinear, zeros padding, align_corners False)."""
    b, _, nh, c = value.shape
    q, nl, npt = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    values = paddle.split(value, [h * w for h, w in shapes], axis=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        # -1 for the batch dim: the graph is exported with a dynamic batch size
        v = values[lvl].transpose([0, 2, 3, 1]).reshape([-1, c, h, w])
        g = grids[:, :, :, lvl].transpose([0, 2, 1, 3, 4]).reshape([-1, q, npt, 2])
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    s = paddle.stack(sampled, axis=-2).reshape([-1, c, q, nl * npt])
    a = attention_weights.transpose([0, 2, 1, 3, 4]).reshape([-1, 1, q, nl * npt])
    out = (s * a).sum(axis=-1).reshape([-1, nh * c, q])
    return out.transpose([0, 2, 1])


class _MLP(nn.Layer):
    def __init__(self, din: int, dhid: int, dout: int, num_layers: int):
        super().__init__()
        dims = [din] + [dhid] * (num_layers - 1) + [dout]
        self.layers = nn.LayerList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class _MSDeformableAttention(nn.Layer):
    def __init__(self, dim: int = 256, num_heads: int = 8, num_levels: int = 3, num_points: int = 4):
        super().__init__()
        self.dim, self.num_heads, self.num_levels, self.num_points = dim, num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, query, reference_boxes, value, shapes, value_mask=None):
        """query [B,Q,D]; reference_boxes [B,Q,4] (sigmoid cxcywh); value [B,L,D]."""
        nh, nl, npt = self.num_heads, self.num_levels, self.num_points
        v = self.value_proj(value)
        if value_mask is not None:
            v = v * value_mask
        # 0 = copy that dim (batch / length may be dynamic in an exported graph)
        v = v.reshape([0, 0, nh, self.dim // nh])
        off = self.sampling_offsets(query).reshape([0, 0, nh, nl, npt, 2])
        aw = F.softmax(self.attention_weights(query).reshape([0, 0, nh, nl * npt]), axis=-1)
        aw = aw.reshape([0, 0, nh, nl, npt])
        ref = reference_boxes.reshape([0, 0, 1, 1, 1, 4])
        loc = ref[..., :2] + off / npt * ref[..., 2:] * 0.5
        return self.output_proj(ms_deformable_attention(v, shapes, loc, aw))


class _DecoderLayer(nn.Layer):
    def __init__(self, dim: int = 256, num_heads: int = 8, dim_feedforward: int = 1024,
                 num_levels: int = 3, num_points: int = 4):
        super().__init__()
        self.self_attn = _MultiHeadSelfAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = _MSDeformableAttention(dim, num_heads, num_levels, num_points)
        self.norm2 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, tgt, ref_boxes, memory, shapes, pos, attn_mask=None):
        qk = tgt + pos
        tgt = self.norm1(tgt + self.self_attn(qk, qk, tgt, attn_mask))
        tgt = self.norm2(tgt + self.cross_attn(tgt + pos, ref_boxes, memory, shapes))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class _Decoder(nn.Layer):
    def __init__(self, num_layers: int, **kw):
        super().__init__()
        self.layers = nn.LayerList([_DecoderLayer(**kw) for _ in range(num_layers)])


class _ConvNorm(nn.Layer):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2D(cin, cout, 1, bias_attr=False)
        self.norm = nn.BatchNorm2D(cout)

    def forward(self, x):
        return self.norm(self.conv(x))


class MaskRTDETRTrainOutputs(NamedTuple):
    """Training forward of the transformer (input of ``losses.detr_loss.MaskDINOLoss``)."""

    predictions: list[SetPrediction]  # matching queries: encoder top-k, decoder input, layers 1..L
    dn_predictions: list[SetPrediction] | None  # denoising queries: decoder input, layers 1..L
    dn_group: DenoisingGroup | None


class MaskRTDETRTransformer(nn.Layer):
    def __init__(self, in_channels: int = 256, hidden_dim: int = 256, num_classes: int = 80,
                 num_queries: int = 300, num_levels: int = 3, num_points: int = 4, num_heads: int = 8,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, num_prototypes: int = 128,
                 eval_idx: int = -1, num_denoising: int = 100, label_noise_ratio: float = 0.5,
                 box_noise_scale: float = 1.0, dn_contrastive: bool = False):
        super().__init__()
        self.hidden_dim, self.num_classes, self.num_queries = hidden_dim, num_classes, num_queries
        # denoising (training only); Mask-RT-DETR's configs use plain (non-contrastive) groups
        self.num_denoising, self.label_noise_ratio = num_denoising, label_noise_ratio
        self.box_noise_scale, self.dn_contrastive = box_noise_scale, dn_contrastive
        self.num_levels = num_levels
        self.num_decoder_layers = num_decoder_layers
        self.eval_idx = eval_idx if eval_idx >= 0 else num_decoder_layers + eval_idx
        self.input_proj = nn.LayerList([_ConvNorm(in_channels, hidden_dim) for _ in range(num_levels)])
        self.decoder = _Decoder(num_decoder_layers, dim=hidden_dim, num_heads=num_heads,
                                dim_feedforward=dim_feedforward, num_levels=num_levels,
                                num_points=num_points)
        # label embedding of the denoising queries (training only)
        self.denoising_class_embed = nn.Embedding(num_classes, hidden_dim)
        self.query_pos_head = _MLP(4, 2 * hidden_dim, hidden_dim, 2)
        self.mask_query_head = _MLP(hidden_dim, hidden_dim, num_prototypes, 3)
        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.dec_norm = nn.LayerNorm(hidden_dim)
        self.score_head = nn.Linear(hidden_dim, num_classes)
        self.bbox_head = _MLP(hidden_dim, hidden_dim, 4, 3)
        self._reset_parameters()

    def _reset_parameters(self):
        """The reference initialisation where it differs from Paddle's defaults (Xavier weights,
        zero biases): class prior 0.01 (few confident queries at the start, as for focal-loss
        detectors), a zero last box layer (start from the reference box) and N(0, 1) label
        embeddings. Loaded weights replace all of it."""
        prior = 0.01
        bias = self.score_head.bias
        bias.set_value(paddle.full(bias.shape, -math.log((1 - prior) / prior), bias.dtype))
        last = self.bbox_head.layers[-1]
        last.weight.set_value(paddle.zeros(last.weight.shape, last.weight.dtype))
        last.bias.set_value(paddle.zeros(last.bias.shape, last.bias.dtype))
        emb = self.denoising_class_embed.weight
        emb.set_value(paddle.normal(0.0, 1.0, emb.shape).astype(emb.dtype))

    def _class_and_mask(self, query, mask_feat):
        q = self.dec_norm(query)
        coef = self.mask_query_head(q)  # [B, Q, P]
        b, p, h, w = mask_feat.shape
        masks = paddle.bmm(coef, mask_feat.reshape([0, p, h * w])).reshape([0, -1, h, w])
        return self.score_head(q), masks

    def select_queries(self, feats: Sequence[paddle.Tensor], mask_feat: paddle.Tensor,
                       query_index: paddle.Tensor | None = None):
        """Encoder part: memory, level shapes, the selected query contents (detached) and the
        encoder's predictions for them (logits, sigmoid boxes, mask logits). The queries are the
        top-``num_queries`` memory tokens by their max class logit, or the tokens of
        ``query_index`` (int64 [B, Q], any Q) when given: e.g. every token, or another run's
        selection to reproduce (the oracle tests use both)."""
        shapes: list[tuple[int, int]] = []
        mem = []
        for proj, f in zip(self.input_proj, feats):
            y = proj(f)
            h, w = int(y.shape[2]), int(y.shape[3])
            shapes.append((h, w))
            mem.append(y.flatten(2).transpose([0, 2, 1]))
        memory = paddle.concat(mem, axis=1)
        b = memory.shape[0]

        anchors, valid = generate_anchors(shapes)
        out_mem = self.enc_output(memory * valid)
        enc_logits = self.score_head(out_mem)
        enc_boxes_unact = self.bbox_head(out_mem) + anchors
        if query_index is None:
            _, idx = paddle.topk(enc_logits.max(axis=-1), self.num_queries, axis=1)  # [B, Q]
            q = self.num_queries
        else:
            idx, q = query_index, int(query_index.shape[1])
        sel = lambda t: paddle.take_along_axis(t, idx.unsqueeze(-1).expand([-1, q, t.shape[-1]]), axis=1)
        selected = sel(out_mem)
        enc_sel_boxes = F.sigmoid(sel(enc_boxes_unact))
        # the encoder's own predictions keep their gradient (they train the query selection);
        # the decoder starts from a detached copy
        enc_sel_logits, enc_sel_masks = self._class_and_mask(selected, mask_feat)
        return memory, shapes, selected.detach(), SetPrediction(enc_sel_logits, enc_sel_boxes, enc_sel_masks)

    def forward(self, feats: Sequence[paddle.Tensor], mask_feat: paddle.Tensor,
                targets: Sequence[dict[str, paddle.Tensor]] | None = None,
                query_index: paddle.Tensor | None = None):
        """Eval: the reference nesting (module doc); ``query_index`` (eval only) replaces the
        top-k query selection (:meth:`select_queries`). Training: :class:`MaskRTDETRTrainOutputs`;
        ``targets`` (per image ``labels`` [n], ``boxes`` [n, 4] normalised cxcywh) feed the
        denoising queries, None trains without them."""
        if query_index is not None and self.training:
            raise ValueError("query_index is for eval mode only (training selects num_queries queries)")
        memory, shapes, target, enc = self.select_queries(feats, mask_feat, query_index)
        enc_sel_logits, enc_sel_boxes, enc_sel_masks = enc
        ref = mask_to_box_cxcywh(enc_sel_masks > 0)  # mask-enhanced reference boxes
        if self.training:
            return self._forward_train(memory, shapes, mask_feat, target, enc, ref, targets)

        out = target
        for i, layer in enumerate(self.decoder.layers):
            pos = self.query_pos_head(ref)
            out = layer(out, ref, memory, shapes, pos)
            new_ref = F.sigmoid(self.bbox_head(out) + inverse_sigmoid(ref))
            if i == self.eval_idx:
                logits, masks = self._class_and_mask(out, mask_feat)
                return (logits.unsqueeze(0), new_ref.unsqueeze(0), masks.unsqueeze(0),
                        (enc_sel_logits, enc_sel_boxes, enc_sel_masks))
            ref = new_ref
        raise RuntimeError("eval_idx out of range")

    def _forward_train(self, memory, shapes, mask_feat, target, enc: SetPrediction, mask_ref,
                       targets) -> MaskRTDETRTrainOutputs:
        dn = None
        if targets is not None:
            dn = build_denoising_group([t["labels"] for t in targets], [t["boxes"] for t in targets],
                                       self.denoising_class_embed.weight, self.num_queries,
                                       self.num_denoising, self.label_noise_ratio, self.box_noise_scale,
                                       self.dn_contrastive)
        out, ref_unact, attn_mask = target, inverse_sigmoid(mask_ref), None
        if dn is not None:
            out = paddle.concat([dn.queries, out], axis=1)
            ref_unact = paddle.concat([inverse_sigmoid(dn.ref_boxes), ref_unact], axis=1)
            attn_mask = dn.attn_mask
        ref = F.sigmoid(ref_unact).detach()

        logits, masks = self._class_and_mask(out, mask_feat)
        sets = [SetPrediction(logits, ref, masks)]  # decoder input, before any layer
        prev = ref
        for i, layer in enumerate(self.decoder.layers):
            out = layer(out, ref, memory, shapes, self.query_pos_head(ref), attn_mask)
            delta = self.bbox_head(out)
            new_ref = F.sigmoid(delta + inverse_sigmoid(ref))
            # look forward twice: the reported box refines the previous layer's undetached box,
            # so this layer's box loss also reaches the previous refinement
            boxes = new_ref if i == 0 else F.sigmoid(delta + inverse_sigmoid(prev))
            logits, masks = self._class_and_mask(out, mask_feat)
            sets.append(SetPrediction(logits, boxes, masks))
            prev, ref = new_ref, new_ref.detach()

        nd = dn.num_queries if dn is not None else 0
        matching = [enc] + [SetPrediction(*(x[:, nd:] for x in s)) for s in sets]
        denoising = [SetPrediction(*(x[:, :nd] for x in s)) for s in sets] if dn is not None else None
        return MaskRTDETRTrainOutputs(matching, denoising, dn)


def _top_detections(logits, boxes, im_shape, scale_factor, k: int):
    """Top-``k`` (query, class) pairs per image: bbox rows [B,K,6] = (class, score, x1, y1, x2, y2)
    in original pixels (not clipped), the chosen query indices [B,K], and the original sizes [B,2]
    ``floor(im_shape / scale_factor + 0.5)`` as (h, w)."""
    num_classes = int(logits.shape[-1])
    origin = paddle.floor(im_shape / scale_factor + 0.5)
    oh, ow = origin[:, 0], origin[:, 1]
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = paddle.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
    xyxy = xyxy * paddle.stack([ow, oh, ow, oh], axis=-1).unsqueeze(1)
    scores, index = paddle.topk(F.sigmoid(logits).flatten(1), k, axis=-1)
    labels = (index % num_classes).astype("float32")
    qidx = index // num_classes
    sel_boxes = paddle.take_along_axis(xyxy, qidx.unsqueeze(-1).expand([-1, k, 4]), axis=1)
    return paddle.concat([labels.unsqueeze(-1), scores.unsqueeze(-1), sel_boxes], axis=-1), qidx, origin


def mask_rtdetr_post_process(logits, boxes, masks, im_shape, scale_factor, num_top_queries: int = 100,
                             ) -> dict[str, paddle.Tensor]:
    """logits [B,Q,C], boxes [B,Q,4] (normalised cxcywh), masks [B,Q,h,w] logits (batch 1).

    -> bbox [K,6] (class, score, x1, y1, x2, y2 in original pixels, not clipped), bbox_num [B] int32,
    mask [K,H0,W0] uint8 0/1 (bilinear to the original size, logit > 0).
    """
    bbox, qidx, origin = _top_detections(logits, boxes, im_shape, scale_factor, num_top_queries)
    oh, ow = origin[:, 0], origin[:, 1]
    bsz = logits.shape[0]
    H0, W0 = int(oh[0].item()), int(ow[0].item())
    m = paddle.gather(masks[0], qidx[0], axis=0).unsqueeze(0)
    m = F.interpolate(m, size=[H0, W0], mode="bilinear", align_corners=False)
    mask = (m[0] > 0).astype("uint8")
    return {"bbox": bbox.reshape([-1, 6]),
            "bbox_num": paddle.full([bsz], num_top_queries, dtype="int32"),
            "mask": mask}


def _resize_weights(origin: paddle.Tensor, size: int, out_len: paddle.Tensor) -> paddle.Tensor:
    """Per-image 1-D bilinear weights [B, out_len, size] (``bilinear_matrix``): ``size`` mask
    samples resized to each image's ``origin`` [B] samples (``align_corners=False``, border, as
    ``F.interpolate``), rows at or past ``origin`` zero (the padding of a smaller image)."""
    pos = paddle.arange(out_len, dtype="float32") + 0.5  # [S] output pixel centres
    src = pos.unsqueeze(0) * (size / origin).unsqueeze(1) - 0.5  # [B, S]
    inside = (pos.unsqueeze(0) < origin.unsqueeze(1)).astype("float32")
    return bilinear_matrix(src, size, clamp=True) * inside.unsqueeze(-1)


def mask_rtdetr_post_process_batch(logits, boxes, masks, im_shape, scale_factor, num_top_queries: int = 100,
                                   score_floor: float | None = None,
                                   keep_above: paddle.Tensor | None = None) -> dict[str, paddle.Tensor]:
    """Batch form of :func:`mask_rtdetr_post_process` (also traceable with a dynamic batch size).

    logits [B,Q,C], boxes [B,Q,4], masks [B,Q,h,w] -> bbox [N,6], bbox_num [B] int32, mask
    [N,Hmax,Wmax] uint8 0/1: image i's masks are bilinear-resized to its own original size
    ``floor(im_shape_i / scale_factor_i + 0.5)`` (``F.interpolate(..., align_corners=False)``) and
    padded with 0 to the largest size of the batch. Each mask is ``Ry @ m @ Rx^T`` with 1-D weights
    ``Ry`` [Hmax, h] / ``Rx`` [Wmax, w] of its image: no [.., H, W, 2] sampling grid; the one
    full-size float tensor is the [N, Hmax, Wmax] product. Equal to the interpolation up to float32
    summation order (a logit within ~1e-6 of 0 can flip).

    ``score_floor`` None keeps all K = ``num_top_queries`` rows per image (N = B*K). Otherwise rows
    scoring at or below it are dropped before any mask is drawn (``bbox_num`` counts the kept
    rows); when none is kept in the whole batch the output is one row ``[-1, 0, 0, 0, 0, 0]`` for
    image 0 (``bbox_num`` ``[1, 0, ...]``) with an empty mask, never a 0-size tensor (which oneDNN
    cannot run; class -1 rows are dropped by the predictor). ``keep_above`` ([1], a graph input, the
    caller's threshold) drops the rows scoring at or below it the same way.
    """
    k = int(num_top_queries)
    bbox, qidx, origin = _top_detections(logits, boxes, im_shape.astype("float32"),
                                         scale_factor.astype("float32"), k)
    mh, mw = int(masks.shape[2]), int(masks.shape[3])
    nq = paddle.shape(masks)[1].astype("int64")  # (the query count is not static in a traced graph)
    rows = bbox.reshape([-1, 6])  # [B*K, 6], image b's rows at b*K ...
    img = paddle.arange(paddle.shape(rows)[0], dtype="int64") // k  # [B*K] each row's image
    src = img * nq + qidx.reshape([-1]).astype("int64")  # its mask in masks.reshape([-1, h, w])
    valid = None
    if score_floor is None and keep_above is None:
        bbox_num = (paddle.ones_like(bbox[:, 0, 1]) * k).astype("int32")  # [B]: k rows per image
    else:
        keep = rows[:, 1] > float(score_floor or 0.0)  # [B*K]
        if keep_above is not None:
            keep = keep & (rows[:, 1] > keep_above)
        # One extra row (index B*K: class -1, image 0, a zeroed mask) appended before gathering,
        # so that no tensor is ever empty (oneDNN kernels fail on 0-size tensors); it is kept only
        # when no row survives, as image 0's "no detection" row.
        n_rows = paddle.shape(rows)[0:1].astype("int64").reshape([1, 1])
        idx = paddle.concat([paddle.nonzero(keep).astype("int64"), n_rows]).reshape([-1])
        n_kept = keep.astype("int32").sum().astype("int32").reshape([1])
        none = (n_kept == 0).astype("int32")
        idx = idx[:n_kept + none]  # [N], N >= 1
        extra = paddle.concat([paddle.full([1, 1], -1.0, dtype=rows.dtype),
                               paddle.zeros([1, 5], dtype=rows.dtype)], axis=1)
        zero = paddle.zeros([1], dtype="int64")
        rows = paddle.gather(paddle.concat([rows, extra]), idx)
        img = paddle.gather(paddle.concat([img, zero]), idx)
        src = paddle.gather(paddle.concat([src, zero]), idx)
        valid = (idx < n_rows.reshape([1])).astype("float32")
        per_image = keep.reshape([-1, k]).astype("int32").sum(axis=1).astype("int32")  # [B]
        first = (paddle.arange(paddle.shape(per_image)[0], dtype="int64") == 0).astype("int32")
        bbox_num = per_image + first * none

    hmax = origin[:, 0].max().astype("int64")
    wmax = origin[:, 1].max().astype("int64")
    ry = paddle.gather(_resize_weights(origin[:, 0], mh, hmax), img)  # [N, Hmax, h]
    rx = paddle.gather(_resize_weights(origin[:, 1], mw, wmax), img)  # [N, Wmax, w]
    sel = paddle.gather(masks.reshape([-1, mh, mw]), src)  # [N, h, w] mask logits
    if valid is not None:
        sel = sel * valid.reshape([-1, 1, 1])  # the extra row's mask: all 0, so empty after "> 0"
    m = paddle.matmul(paddle.matmul(ry, sel), rx, transpose_y=True)  # [N, Hmax, Wmax]
    return {"bbox": rows, "bbox_num": bbox_num, "mask": (m > 0).astype("uint8")}
