"""A literal plain-PyTorch reference of Dino U-Net, written from the published code (yifangao112/DinoUNet at 8cb6c9f:
dinounet_training.py, dinounet/dinov3/models/vision_transformer.py and layers/, .../backbone/dinov3_adapter.py,
.../utils/ms_deform_attn.py; dynamic_network_architectures' StackedConvBlocks) for the tests only.

It keeps the published module tree, so `state_dict()` has exactly the keys nnUNetTrainer.save_checkpoint writes
(`encoder.dinov3_adapter.backbone.*` in Meta's layout with its derived buffers, the `decoder.encoder.*` alias that
UNetDecoder's stored encoder creates, the `all_modules` aliases of every conv block), and it follows the published
forward step by step, including the oddities (the token split by N // 21 in the depth-wise conv, the bilinear
fix-up of the learnable upsampling, the 1 -> 3 channel repeat). Only what does not run at inference is left out
(drop path, dropout, gradient checkpointing, the CUDA kernel that only the backward pass needs). SyncBatchNorm is
BatchNorm2d: in eval mode both normalise with the running statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# -- Meta's DINOv3 ViT (official names) ----------------------------------------------------------------------------


class RefRope(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, base: float = 100.0):
        super().__init__()
        self.d_head = embed_dim // num_heads
        k = torch.arange(self.d_head // 4, dtype=torch.float32)
        self.register_buffer("periods", base ** (2 * k / (self.d_head // 2)), persistent=True)

    def forward(self, H: int, W: int):
        hs = torch.arange(0.5, H, dtype=torch.float32) / H
        ws = torch.arange(0.5, W, dtype=torch.float32) / W
        coords = 2.0 * torch.stack(torch.meshgrid(hs, ws, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
        angles = (2 * math.pi * coords[:, :, None] / self.periods[None, None, :]).flatten(1, 2).tile(2)
        return torch.sin(angles), torch.cos(angles)


class RefLinearKMaskedBias(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.bias is not None:
            self.register_buffer("bias_mask", torch.full_like(self.bias, math.nan))

    def forward(self, x):
        bias = self.bias * self.bias_mask if self.bias is not None else None
        return F.linear(x, self.weight, bias)


def ref_rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class RefSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = RefLinearKMaskedBias(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        sin, cos = rope
        prefix = N - sin.shape[-2]
        q = torch.cat([q[:, :, :prefix], q[:, :, prefix:] * cos + ref_rotate_half(q[:, :, prefix:]) * sin], dim=2)
        k = torch.cat([k[:, :, :prefix], k[:, :, prefix:] * cos + ref_rotate_half(k[:, :, prefix:]) * sin], dim=2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class RefLayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        return x * self.gamma


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefSwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads, ffn, hidden, qkv_bias):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = RefSelfAttention(dim, num_heads, qkv_bias)
        self.ls1 = RefLayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = RefMlp(dim, hidden) if ffn == "mlp" else RefSwiGLU(dim, hidden)
        self.ls2 = RefLayerScale(dim)

    def forward(self, x, rope):
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RefPatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), x.shape[2], x.shape[3]


class RefDinoVisionTransformer(nn.Module):
    """DinoVisionTransformer at inference: 4 storage tokens, mask_k_bias, LayerNorm eps 1e-5 ("layernormbf16")."""

    def __init__(self, embed_dim=64, depth=12, num_heads=4, ffn="mlp", hidden=256, qkv_bias=True, patch_size=16,
                 local_cls_norm=False):
        super().__init__()
        self.embed_dim, self.patch_size, self.n_storage_tokens = embed_dim, patch_size, 4
        self.patch_embed = RefPatchEmbed(embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, 4, embed_dim))
        self.rope_embed = RefRope(embed_dim, num_heads)
        self.blocks = nn.ModuleList(RefBlock(embed_dim, num_heads, ffn, hidden, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.local_cls_norm = nn.LayerNorm(embed_dim, eps=1e-5) if local_cls_norm else None
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        for block in self.blocks:  # what init_weights_vit writes into every bias mask
            if block.attn.qkv.bias is not None:
                block.attn.qkv.bias_mask.fill_(1)
                block.attn.qkv.bias_mask[embed_dim:2 * embed_dim] = 0

    def get_intermediate_layers(self, x, n, return_class_token=True):
        tokens, H, W = self.patch_embed(x)
        cls = self.cls_token + 0 * self.mask_token
        x = torch.cat([cls.expand(x.shape[0], -1, -1), self.storage_tokens.expand(x.shape[0], -1, -1), tokens], 1)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.rope_embed(H=H, W=W))
            if i in n:
                outputs.append(x)
        outputs = [self.norm(o) for o in outputs]
        return tuple(zip([o[:, 5:] for o in outputs], [o[:, 0] for o in outputs]))


# -- DINOv3_Adapter (ViT-Adapter style: spatial prior module + extractors) -----------------------------------------


def ref_reference_points(spatial_shapes):
    refs = []
    for H_, W_ in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, H_ - 0.5, H_), torch.linspace(0.5, W_ - 0.5, W_),
                                      indexing="ij")
        refs.append(torch.stack((ref_x.reshape(-1)[None] / W_, ref_y.reshape(-1)[None] / H_), -1))
    return torch.cat(refs, 1)[:, :, None]


def ref_deform_inputs(x, patch_size):
    _, _, h, w = x.shape
    spatial_shapes = torch.as_tensor([(h // patch_size, w // patch_size)], dtype=torch.long)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
    reference_points = ref_reference_points([(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)])
    return [reference_points, spatial_shapes, level_start_index]


def ref_ms_deform_attn_core(value, shapes, sampling_locations, attention_weights):
    N_, S_, M_, D_ = value.shape
    _, Lq_, M_, L_, P_, _ = sampling_locations.shape
    value_list = value.split([int(H_) * int(W_) for H_, W_ in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lid, (H_, W_) in enumerate(shapes):
        value_l = value_list[lid].flatten(2).transpose(1, 2).reshape(N_ * M_, D_, int(H_), int(W_))
        grid_l = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    attention_weights = attention_weights.transpose(1, 2).reshape(N_ * M_, 1, Lq_, L_ * P_)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attention_weights).sum(-1).view(N_, M_ * D_, Lq_)
    return out.transpose(1, 2).contiguous()


class RefMSDeformAttn(nn.Module):
    def __init__(self, d_model, n_levels=1, n_heads=16, n_points=4, ratio=0.5):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads = d_model, n_levels, n_heads
        self.n_points, self.ratio = n_points, ratio
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, int(d_model * ratio))
        self.output_proj = nn.Linear(int(d_model * ratio), d_model)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes):
        N, Len_q, _ = query.shape
        _, Len_in, _ = input_flatten.shape
        value = self.value_proj(input_flatten).view(N, Len_in, self.n_heads, int(self.ratio * self.d_model)
                                                    // self.n_heads)
        offsets = self.sampling_offsets(query).view(N, Len_q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(N, Len_q, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(N, Len_q, self.n_heads, self.n_levels, self.n_points)
        normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = ref_ms_deform_attn_core(value, input_spatial_shapes.tolist(), locations, weights)
        return self.output_proj(out)


class RefDWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        n = N // 21
        x1 = x[:, 0:16 * n].transpose(1, 2).view(B, C, H * 2, W * 2)
        x2 = x[:, 16 * n:20 * n].transpose(1, 2).view(B, C, H, W)
        x3 = x[:, 20 * n:].transpose(1, 2).view(B, C, H // 2, W // 2)
        return torch.cat([self.dwconv(t).flatten(2).transpose(1, 2) for t in (x1, x2, x3)], dim=1)


class RefConvFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.dwconv, self.fc2 = nn.Linear(dim, hidden), RefDWConv(hidden), nn.Linear(hidden, dim)

    def forward(self, x, H, W):
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), H, W)))


class RefExtractor(nn.Module):
    def __init__(self, dim, num_heads=16, n_points=4, deform_ratio=0.5, cffn_ratio=0.25):
        super().__init__()
        self.query_norm, self.feat_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefMSDeformAttn(dim, 1, num_heads, n_points, deform_ratio)
        self.ffn = RefConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, query, reference_points, feat, spatial_shapes, H, W):
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), spatial_shapes)
        return query + self.ffn(self.ffn_norm(query), H, W)


class RefInteractionBlockWithCls(nn.Module):
    def __init__(self, dim, extra_extractor, **kw):
        super().__init__()
        self.extractor = RefExtractor(dim, **kw)
        self.extra_extractors = nn.Sequential(*[RefExtractor(dim, **kw) for _ in range(2)]) if extra_extractor \
            else None

    def forward(self, x, c, deform_inputs2, H_c, W_c):
        c = self.extractor(c, deform_inputs2[0], x, deform_inputs2[1], H_c, W_c)
        if self.extra_extractors is not None:
            for extractor in self.extra_extractors:
                c = extractor(c, deform_inputs2[0], x, deform_inputs2[1], H_c, W_c)
        return c


class RefSpatialPriorModule(nn.Module):
    def __init__(self, inplanes=64, embed_dim=384):
        super().__init__()
        p = inplanes
        self.stem = nn.Sequential(
            nn.Conv2d(3, p, 3, 2, 1, bias=False), nn.BatchNorm2d(p), nn.ReLU(inplace=True),
            nn.Conv2d(p, p, 3, 1, 1, bias=False), nn.BatchNorm2d(p), nn.ReLU(inplace=True),
            nn.Conv2d(p, p, 3, 1, 1, bias=False), nn.BatchNorm2d(p), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.conv2 = nn.Sequential(nn.Conv2d(p, 2 * p, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * p), nn.ReLU(True))
        self.conv3 = nn.Sequential(nn.Conv2d(2 * p, 4 * p, 3, 2, 1, bias=False), nn.BatchNorm2d(4 * p), nn.ReLU(True))
        self.conv4 = nn.Sequential(nn.Conv2d(4 * p, 4 * p, 3, 2, 1, bias=False), nn.BatchNorm2d(4 * p), nn.ReLU(True))
        self.fc1 = nn.Conv2d(p, embed_dim, 1)
        self.fc2 = nn.Conv2d(2 * p, embed_dim, 1)
        self.fc3 = nn.Conv2d(4 * p, embed_dim, 1)
        self.fc4 = nn.Conv2d(4 * p, embed_dim, 1)

    def forward(self, x):
        c1 = self.stem(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        c4 = self.conv4(c3)
        c1, c2, c3, c4 = self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)
        bs, dim = c1.shape[:2]
        return c1, *(c.view(bs, dim, -1).transpose(1, 2) for c in (c2, c3, c4))


class RefDINOv3Adapter(nn.Module):
    def __init__(self, backbone, interaction_indexes, conv_inplane=64, n_points=4, deform_num_heads=16,
                 cffn_ratio=0.25, deform_ratio=0.5):
        super().__init__()
        self.backbone = backbone
        self.interaction_indexes = interaction_indexes
        self.patch_size = backbone.patch_size
        d = backbone.embed_dim
        self.level_embed = nn.Parameter(torch.zeros(3, d))
        self.spm = RefSpatialPriorModule(conv_inplane, d)
        kw = dict(num_heads=deform_num_heads, n_points=n_points, deform_ratio=deform_ratio, cffn_ratio=cffn_ratio)
        self.interactions = nn.Sequential(*[
            RefInteractionBlockWithCls(d, extra_extractor=i == len(interaction_indexes) - 1, **kw)
            for i in range(len(interaction_indexes))])
        self.up = nn.ConvTranspose2d(d, d, 2, 2)
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.BatchNorm2d(d) for _ in range(4))

    def forward(self, x):
        deform_inputs2 = ref_deform_inputs(x, self.patch_size)
        c1, c2, c3, c4 = self.spm(x)
        c2, c3, c4 = c2 + self.level_embed[0], c3 + self.level_embed[1], c4 + self.level_embed[2]
        c = torch.cat([c2, c3, c4], dim=1)
        H_c, W_c = x.shape[2] // 16, x.shape[3] // 16
        H_toks, W_toks = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        bs = x.shape[0]
        with torch.no_grad():
            all_layers = self.backbone.get_intermediate_layers(x, n=self.interaction_indexes, return_class_token=True)
        dim = all_layers[0][0].shape[-1]
        outs = []
        for i, layer in enumerate(self.interactions):
            xi, _ = all_layers[i]
            c = layer(xi, c, deform_inputs2, H_c, W_c)
            outs.append(xi.transpose(1, 2).view(bs, dim, H_toks, W_toks).contiguous())
        c2 = c[:, 0:c2.size(1)]
        c3 = c[:, c2.size(1):c2.size(1) + c3.size(1)]
        c4 = c[:, c2.size(1) + c3.size(1):]
        c2 = c2.transpose(1, 2).view(bs, dim, H_c * 2, W_c * 2)
        c3 = c3.transpose(1, 2).view(bs, dim, H_c, W_c)
        c4 = c4.transpose(1, 2).view(bs, dim, H_c // 2, W_c // 2)
        c1 = self.up(c2) + c1
        x1, x2, x3, x4 = outs
        x1 = F.interpolate(x1, size=(4 * H_c, 4 * W_c), mode="bilinear", align_corners=False)
        x2 = F.interpolate(x2, size=(2 * H_c, 2 * W_c), mode="bilinear", align_corners=False)
        x3 = F.interpolate(x3, size=(H_c, W_c), mode="bilinear", align_corners=False)
        x4 = F.interpolate(x4, size=(H_c // 2, W_c // 2), mode="bilinear", align_corners=False)
        c1, c2, c3, c4 = c1 + x1, c2 + x2, c3 + x3, c4 + x4
        return {"1": self.norm1(c1), "2": self.norm2(c2), "3": self.norm3(c3), "4": self.norm4(c4)}


# -- the Dino U-Net head: FAPM, learnable upsampling, nnU-Net decoder -----------------------------------------------


class RefSqueezeExcitation(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        reduced = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Conv2d(channels, reduced, 1), nn.ReLU(inplace=True), nn.Conv2d(reduced, channels, 1),
                                nn.Sigmoid())

    def forward(self, x):
        return x * self.fc(self.pool(x))


class RefDepthwiseSeparableConv(nn.Module):
    def __init__(self, ch, bias, norm, act):
        super().__init__()
        self.depthwise = nn.Conv2d(ch, ch, 3, 1, 1, groups=ch, bias=bias)
        self.pointwise = nn.Conv2d(ch, ch, 1, bias=bias)
        self.bn, self.act = norm(ch), act()

    def forward(self, x):
        return self.act(self.bn(self.pointwise(self.depthwise(x))))


class RefFAPM(nn.Module):
    def __init__(self, in_ch, rank, out_ch_list, norm, act, bias):
        super().__init__()
        self.shared_basis = nn.Conv2d(in_ch, rank, 1, bias=bias)
        self.specific_bases = nn.ModuleList(nn.Conv2d(in_ch, rank, 1, bias=bias) for _ in out_ch_list)
        self.film_generators = nn.ModuleList(nn.Conv2d(rank, 2 * rank, 1, bias=bias) for _ in out_ch_list)
        self.refinement_blocks = nn.ModuleList()
        self.shortcut_projections = nn.ModuleList()
        for oc in out_ch_list:
            self.refinement_blocks.append(nn.Sequential(
                nn.Conv2d(rank, oc, 1, bias=bias), norm(oc), act(), RefDepthwiseSeparableConv(oc, bias, norm, act),
                nn.Conv2d(oc, oc, 1, bias=bias), RefSqueezeExcitation(oc)))
            self.shortcut_projections.append(nn.Conv2d(rank, oc, 1, bias=bias) if rank != oc else nn.Identity())

    def forward(self, x_list):
        out = []
        for i, x in enumerate(x_list):
            z_shared = self.shared_basis(x)
            z_specific = self.specific_bases[i](x)
            gamma, beta = torch.chunk(self.film_generators[i](z_shared), 2, dim=1)
            z = gamma * z_specific + beta
            out.append(self.refinement_blocks[i](z) + self.shortcut_projections[i](z))
        return out


class RefLearnableUpsampleBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.up2 = nn.ConvTranspose2d(channels, channels, 2, 2)

    def forward(self, x, target):
        h, w = x.shape[2:]
        while h * 2 <= target[0] and w * 2 <= target[1]:
            x = self.up2(x)
            h, w = x.shape[2:]
        if (h, w) != tuple(target):
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
        return x


class RefDINOv3EncoderAdapter(nn.Module):
    """The second class of that name in dinounet_training.py (the one that wins): FAPM + learnable upsampling."""

    def __init__(self, adapter, target_channels, norm, act, conv_bias, rank=256):
        super().__init__()
        self.dinov3_adapter = adapter
        self.fapm = RefFAPM(adapter.backbone.embed_dim, rank, target_channels, norm, act, conv_bias)
        self.ups = nn.ModuleList(RefLearnableUpsampleBlock(oc) for oc in target_channels)
        self.output_channels = target_channels

    def forward(self, x):
        B, C, H, W = x.shape
        if C == 1:
            x = x.repeat(1, 3, 1, 1)
        elif C != 3:
            x = x.repeat(1, 3 // C + (1 if 3 % C != 0 else 0), 1, 1)[:, :3] if C < 3 else x[:, :3]
        feats = self.dinov3_adapter(x)
        ys = self.fapm([feats[k] for k in ("1", "2", "3", "4")])
        return [self.ups[i](y, (H // 2**i, W // 2**i)) for i, y in enumerate(ys)]


class RefConvDropoutNormReLU(nn.Module):
    def __init__(self, cin, cout, conv_bias, norm, act, nonlin_first=False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 1, padding=1, bias=conv_bias)
        self.norm = norm(cout)
        self.nonlin = act()
        ops = [self.conv, self.norm, self.nonlin]
        if nonlin_first:
            ops[-1], ops[-2] = ops[-2], ops[-1]
        self.all_modules = nn.Sequential(*ops)

    def forward(self, x):
        return self.all_modules(x)


class RefStackedConvBlocks(nn.Module):
    def __init__(self, num_convs, cin, cout, conv_bias, norm, act, nonlin_first=False):
        super().__init__()
        self.convs = nn.Sequential(RefConvDropoutNormReLU(cin, cout, conv_bias, norm, act, nonlin_first),
                                   *[RefConvDropoutNormReLU(cout, cout, conv_bias, norm, act, nonlin_first)
                                     for _ in range(1, num_convs)])

    def forward(self, x):
        return self.convs(x)


class RefUNetDecoder(nn.Module):
    def __init__(self, encoder, num_classes, n_conv_per_stage, norm, act, conv_bias, nonlin_first=False):
        super().__init__()
        self.encoder = encoder  # a submodule: every encoder tensor appears again under decoder.encoder.*
        ch = encoder.output_channels
        stages, transpconvs, seg_layers = [], [], []
        for s in range(1, len(ch)):
            below, skip = ch[-s], ch[-(s + 1)]
            transpconvs.append(nn.ConvTranspose2d(below, skip, 2, 2, bias=conv_bias))
            stages.append(RefStackedConvBlocks(n_conv_per_stage[s - 1], 2 * skip, skip, conv_bias, norm, act,
                                               nonlin_first))
            seg_layers.append(nn.Conv2d(skip, num_classes, 1, 1, 0, bias=True))
        self.stages, self.transpconvs, self.seg_layers = (nn.ModuleList(m) for m in (stages, transpconvs, seg_layers))

    def forward(self, skips):
        lres = skips[-1]
        for s in range(len(self.stages)):
            x = torch.cat((self.transpconvs[s](lres), skips[-(s + 2)]), 1)
            lres = self.stages[s](x)
        return self.seg_layers[-1](lres)  # deep supervision off: only the full-resolution output


class RefDinoUNet(nn.Module):
    def __init__(self, backbone, interaction_indexes, num_classes, features_per_stage=(32, 64, 128, 256),
                 n_conv_per_stage_decoder=(2, 2, 2), norm="instance", conv_inplane=64, rank=256, nonlin_first=False):
        super().__init__()
        if norm == "instance":
            norm_op = lambda c: nn.InstanceNorm2d(c, eps=1e-5, affine=True)  # the plans' norm_op and kwargs
        else:
            norm_op = lambda c: nn.BatchNorm2d(c, eps=1e-5, affine=True)
        act = lambda: nn.LeakyReLU(inplace=True)
        adapter = RefDINOv3Adapter(backbone, interaction_indexes, conv_inplane=conv_inplane)
        self.encoder = RefDINOv3EncoderAdapter(adapter, list(features_per_stage), norm_op, act, True, rank)
        self.decoder = RefUNetDecoder(self.encoder, num_classes, list(n_conv_per_stage_decoder), norm_op, act, True,
                                      nonlin_first)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random values in every parameter and BatchNorm statistic, so that zero-initialised layers (level_embed,
    sampling offsets, attention weights, biases), LayerScale and the normalisations all take part in the comparison.
    The derived buffers (bias masks, RoPE periods) keep their released values."""
    g = torch.Generator().manual_seed(seed)
    norms = (nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm)
    with torch.no_grad():
        for module in model.modules():
            for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                if name in ("bias_mask", "periods"):
                    continue
                if name == "num_batches_tracked":
                    t.fill_(7)
                elif name == "running_var":
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                elif isinstance(module, norms) or name == "gamma":
                    t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if name == "weight" else 0.0))
                else:
                    fan_in = t[0].numel() if t.ndim > 1 else 16
                    t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
