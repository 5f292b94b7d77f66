"""Valid tiny checkpoints, one per published layout, that the malformed-input corpus (zoo.testing.corpus) breaks.

SEEDS maps a format name (zoo.conversion.formats()) to a builder: builder(directory) writes a small published
checkpoint under `directory` and returns the path `zoo convert` takes (the directory, or a file in it). Every
format, seeded or not, gets the corpus's generic cases (junk, empty, missing, other layouts' checkpoints);
a seeded one also gets every mutation of its own files. A new layout gets mutation cases by adding one builder
here (the family's own tests usually have one to call).

The builders reuse the test suite's tiny-model fixtures (tests/, where the published reference code they need
may live), imported when a seed is built: the seeded cases run from a source checkout, with its root on sys.path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch


def _qwen2(d: Path) -> Path:
    from tests.helpers import tiny_qwen2

    tiny_qwen2(d, tie=False)
    return d


def _qwen2_sharded(d: Path) -> Path:
    from tests.helpers import tiny_qwen2

    tiny_qwen2(d, tie=False, shard="60KB")  # an index and several shards
    return d


def _phi3(d: Path) -> Path:
    from tests.helpers import tiny_phi3

    tiny_phi3(d)
    return d


def _qwen2_moe(d: Path) -> Path:
    from tests.helpers import tiny_qwen2_moe

    tiny_qwen2_moe(d)
    return d


def _timm_swinv2(d: Path) -> Path:
    from tests.test_swinv2 import save_timm, tiny_timm

    save_timm(tiny_timm(), d)
    return d


def _hf_swinv2(d: Path) -> Path:
    from tests.test_swinv2 import tiny_hf

    tiny_hf().save_pretrained(d)
    return d


def _official_swinv2(d: Path) -> Path:
    from tests.test_swinv2 import official_state_dict, tiny_timm

    d.mkdir(parents=True, exist_ok=True)
    path = d / "swinv2_tiny_patch4_window4_64.pth"
    torch.save({"model": official_state_dict(tiny_timm()), "epoch": 300}, path)
    return path


def _hf_videomae(d: Path) -> Path:
    from tests.test_videomae2 import tiny_hf

    tiny_hf().save_pretrained(d)
    return d


def _videomae2_hub(d: Path) -> Path:
    from tests.test_videomae2 import tiny_hf, write_hub_layout

    return write_hub_layout(tiny_hf(num_labels=0), d)


def _videomae2_official(d: Path) -> Path:
    from tests.test_videomae2 import official_names, tiny_hf

    d.mkdir(parents=True, exist_ok=True)
    path = d / "vit_s_pt.pth"  # a pre-training file: encoder.* (ViT-S width, one block, as the official test)
    ref = tiny_hf("model", use_mean_pooling=False, image_size=224, patch_size=16, num_frames=16, tubelet_size=2,
                  hidden_size=384, num_hidden_layers=1, num_attention_heads=6, intermediate_size=1536,
                  layer_norm_eps=1e-6)
    torch.save({"model": {f"encoder.{k}": v for k, v in official_names(ref.state_dict(), prefix="").items()}}, path)
    return path


def _timm_dinov3(d: Path) -> Path:
    from tests.test_dinov3 import save_timm, tiny_timm

    arch = "vit_small_plus_patch16_dinov3_qkvb"
    save_timm(tiny_timm(arch), d, arch)
    return d


def _hf_dinov3(d: Path) -> Path:
    from tests.test_dinov3 import tiny_hf

    tiny_hf(gated=True).save_pretrained(d)
    return d


def _official_dinov3(d: Path) -> Path:
    from tests.test_dinov3 import official_state_dict, tiny_timm

    d.mkdir(parents=True, exist_ok=True)
    path = d / "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth"
    torch.save(official_state_dict(tiny_timm("vit_small_plus_patch16_dinov3_qkvb")), path)
    return path


def _hf_xlstm(d: Path) -> Path:
    from tests.xlstm_reference import tiny_hf_xlstm

    tiny_hf_xlstm(d, seed=0)
    return d


def _hf_mmfree(d: Path) -> Path:
    from tests.mmfree_reference import save_published

    save_published(d, 256, 64, 2, 128)
    return d


def _hf_xlstm_fused(d: Path) -> Path:
    import copy

    from safetensors.torch import save_file
    from xlstm.xlstm_large.utils import convert_single_weights_to_fused_weights

    from tests.xlstm_reference import tiny_hf_xlstm

    ref = tiny_hf_xlstm(None, seed=3)
    fused = convert_single_weights_to_fused_weights(dict(ref.state_dict()))
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in fused.items()}, d / "model.safetensors")
    config = copy.deepcopy(ref.config)
    config.weight_mode = "fused"
    config.save_pretrained(d)
    return d


def _hf_chatglm(d: Path) -> Path:
    from tests.test_glm import _chatglm

    _chatglm(d)  # pytorch_model-0000i-of-00002.bin with their index, as THUDM/chatglm-6b
    return d


def _sat_glm(d: Path) -> Path:
    from tests.test_glm import _small_sat

    _small_sat(d)  # DIR/latest, DIR/<iteration>/mp_rank_0X_model_states.pt, model_config.json
    return d


def _wala(d: Path) -> Path:
    import sys

    import tests

    here = list(tests.__path__)[0]  # a namespace package: no __file__
    if here not in sys.path:  # test_wala imports its reference as a top-level module
        sys.path.insert(0, here)
    from tests.test_wala import LAYOUTS, Published, base_args

    return Published(base_args(**LAYOUTS["sk"][0]), seed=0).save(d)  # the sketch-conditioned layout


def _nnunet_dinounet(d: Path) -> Path:
    from tests.test_dinounet import dataset_json, plans, reference, result_folder

    return result_folder(d, reference(), plans(), dataset_json())


# format name -> builders; a format may have several seeds (one file, and a sharded one with an index)
SEEDS: dict[str, list[Callable[[Path], Path]]] = {
    "hf-qwen2": [_qwen2, _qwen2_sharded],
    "hf-phi3": [_phi3],
    "hf-qwen2-moe": [_qwen2_moe],
    "timm-swinv2": [_timm_swinv2],
    "hf-swinv2": [_hf_swinv2],
    "swinv2-official": [_official_swinv2],
    "hf-videomae": [_hf_videomae],
    "videomae2-hub": [_videomae2_hub],
    "videomae2-official": [_videomae2_official],
    "timm-dinov3": [_timm_dinov3],
    "hf-dinov3": [_hf_dinov3],
    "dinov3-official": [_official_dinov3],
    "hf-xlstm": [_hf_xlstm],
    "hf-mmfree": [_hf_mmfree],
    "hf-xlstm-fused": [_hf_xlstm_fused],
    "hf-chatglm": [_hf_chatglm],
    "sat-glm": [_sat_glm],
    "wala": [_wala],
    "nnunet-dinounet": [_nnunet_dinounet],
}
