"""xLSTM 7B: zoo's implementation against transformers' xLSTMForCausalLM and the official xlstm package's
xLSTMLarge, conversion from and export to the published layout, and generation with a fixed-size recurrent state."""

import copy
import json

import pytest
import torch
from zoo.architectures.xlstm import XLSTM_7B, XLSTMConfig, XLSTMState, count_params
from zoo.weights.format import CheckpointError

import zoo
from tests.helpers import hf_greedy, max_abs_diff
from tests.xlstm_reference import hf_classes, tiny_hf_xlstm, xlstm_large_greedy, xlstm_large_like
from zoo.family import get_family
from zoo.generation import Sampling, decode


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny random xLSTM saved by transformers in several shards, and its zoo conversion."""
    root = tmp_path_factory.mktemp("xlstm")
    ref = tiny_hf_xlstm(root / "hf", seed=0, shard="200KB")
    assert len(list((root / "hf").glob("model-*.safetensors"))) > 3
    zoo.convert(root / "hf", root / "native", progress=False)
    return ref, root


@pytest.fixture
def model(converted):
    return zoo.load(converted[1] / "native", dtype=torch.float32)


def ids(batch, length, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers_and_the_xlstm_package(converted, model):
    ref, _ = converted
    official = xlstm_large_like(ref)
    x = ids(2, 41)  # two chunks of 16 and a ragged 9
    with torch.no_grad():
        ours = model(x)
        assert max_abs_diff(ours, ref(x).logits) < 1e-4
        assert max_abs_diff(ours, official(x)[0]) < 1e-4
        one = x[:, :1]  # a single token goes through the step form
        assert max_abs_diff(model(one), ref(one).logits) < 1e-4


def test_32_greedy_tokens_match_transformers_and_the_xlstm_package(converted, model):
    ref, _ = converted
    prompt = ids(1, 20, seed=4)  # a chunk and a ragged 4, then 32 steps (this prompt meets no stop token)
    tokens = model.generate(prompt, max_new_tokens=32)[0]
    assert len(tokens) == 32 and len(set(tokens)) > 8  # no stop token, a varied continuation
    assert tokens == hf_greedy(ref, prompt, 32)
    assert tokens == xlstm_large_greedy(xlstm_large_like(ref), prompt, 32)


def test_bfloat16_weights_follow_the_float32_model(converted, model):
    half = zoo.load(converted[1] / "native", dtype=torch.bfloat16)
    x = ids(2, 41, seed=9)
    with torch.no_grad():
        full, low = model(x), half(x)
    assert low.dtype == torch.float32  # logits are soft-capped in float32 whatever the weights
    assert max_abs_diff(low, full) < 0.5 and (low.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


def test_prompt_then_single_tokens_equals_one_forward(model):
    x = ids(2, 45, seed=3)
    full = model(x)
    state = model.module.new_state(2, 45)
    pieces = [model(x[:, :20], state), model(x[:, 20:37], state)]  # a prompt in two pieces, then steps
    pieces += [model(x[:, t:t + 1], state) for t in range(37, 45)]
    assert max_abs_diff(full, torch.cat(pieces, 1)) < 1e-4
    assert state.length == 45


def test_last_only_scores_just_the_last_position(model):
    x = ids(2, 19, seed=4)
    last = model(x, model.module.new_state(2, 19), last_only=True)
    assert last.shape == (2, 1, 128)
    assert max_abs_diff(last, model(x)[:, -1:]) < 1e-5


@pytest.fixture
def one_thread():
    """1000 decoding steps of a toy model are thousands of tiny ops; on a shared 2-core machine each parallel region
    can wait milliseconds for the second core, so this test decodes on one thread (it measures memory, not speed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_state_size_is_the_same_after_10_and_after_1000_generated_tokens(model, one_thread):
    made = []
    new_state = model.module.new_state
    model.module.new_state = lambda *a, **kw: made.append(new_state(*a, **kw)) or made[-1]
    try:
        sizes = {}
        for n in (10, 1000):
            steps = sum(1 for _ in decode(model.module, [[5, 6, 7]], n, Sampling(), stop_ids=set()))
            assert steps == n
            state = made[-1]
            assert isinstance(state, XLSTMState) and state.length == 3 + n - 1
            sizes[n] = state.nbytes()
    finally:
        model.module.new_state = new_state
    assert sizes[10] == sizes[1000]
    c = model.config
    assert sizes[10] == 4 * c.n_layers * c.n_heads * (c.qk_dim // c.n_heads * (c.v_dim // c.n_heads + 1) + 1)


def test_decoding_updates_the_state_tensors_in_place(model):
    state = model.module.new_state(1, 8)
    pointers = [t.data_ptr() for t in state.tensors()]
    model(ids(1, 5), state)
    before = [c.clone() for c in state.c]
    model(ids(1, 1), state)
    assert [t.data_ptr() for t in state.tensors()] == pointers
    assert not any(torch.equal(a, b) for a, b in zip(before, state.c))


def test_generation_with_layers_streamed_from_disk_matches_the_plain_model(converted, model):
    """Under a device map the state object passes the placement hooks untouched; each layer updates its memory."""
    placed = zoo.load(converted[1] / "native", device_map={"": "cpu", "layers.1": "disk"})
    prompt = ids(1, 20, seed=4)
    assert placed.generate(prompt, max_new_tokens=12) == model.generate(prompt, max_new_tokens=12)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(model):
    a = ids(1, 21, seed=5)[0].tolist()  # longer than a chunk: the short row gets 18 pads, across the boundary
    b, c = [40, 41, 42], [7] * 17
    batch = model.generate([a, b, c], max_new_tokens=12)
    assert batch == [model.generate(p, max_new_tokens=12) for p in (a, b, c)]


def test_pad_tokens_leave_the_recurrent_memory_untouched(model):
    """Whatever the pad token ids are, the memory after the pads is empty and the real tokens see the same logits."""
    x = ids(1, 6, seed=6)
    alone = model(x)
    for pad_id in (0, 99):
        padded = torch.cat([torch.full((1, 11), pad_id), x], 1)
        state = model.module.new_state(1, 17, pad=torch.tensor([11]))
        logits = model(padded, state)
        assert max_abs_diff(logits[:, 11:], alone) < 1e-5


def test_export_to_transformers_layout_round_trips_to_identical_logits(converted, tmp_path):
    from zoo.cli import main

    ref, root = converted
    assert main(["convert", "--to", "hf", str(root / "native"), str(tmp_path / "back")]) == 0
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["architectures"] == ["xLSTMForCausalLM"] and cfg["weight_mode"] == "single"
    back = hf_classes()[1].from_pretrained(tmp_path / "back").eval()
    x = ids(1, 23, seed=7)
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref(x).logits)


def test_fused_layout_converts_to_the_same_model(tmp_path):
    """weight_mode "fused" (q, k, v, output gate in one matrix; the gates in another; the feed-forward's two
    up-projections in a third), written by the official package's own single-to-fused conversion."""
    from safetensors.torch import save_file
    from xlstm.xlstm_large.utils import convert_single_weights_to_fused_weights

    ref = tiny_hf_xlstm(None, seed=3)
    fused = convert_single_weights_to_fused_weights(dict(ref.state_dict()))
    assert "backbone.blocks.0.mlstm_layer.qkv_opreact.weight" in fused
    x = ids(2, 30, seed=8)
    with torch.no_grad():  # the official package reads these tensors as the same model
        assert max_abs_diff(xlstm_large_like(ref, fused, "fused")(x)[0], ref(x).logits) < 1e-4
    (tmp_path / "hf").mkdir()
    save_file({k: v.contiguous() for k, v in fused.items()}, tmp_path / "hf" / "model.safetensors")
    config = copy.deepcopy(ref.config)  # (ref reads its config on every call: keep it single)
    config.weight_mode = "fused"
    config.save_pretrained(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    with torch.no_grad():
        assert max_abs_diff(model(x), ref(x).logits) < 1e-4
    zoo.export(tmp_path / "native", tmp_path / "back", to="hf", progress=False)  # back to the published single layout
    single = hf_classes()[1].from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(single(x).logits, ref(x).logits)


def test_text_generation_puts_bos_first_and_zoo_generate_prints_the_same(converted, tmp_path, capsys):
    from tests.helpers import tiny_tokenizer
    from zoo.cli import main

    directory = tmp_path / "withtok"
    zoo.convert(converted[1] / "hf", directory, progress=False)
    tiny_tokenizer(directory, {"<pad>": 30}, chat_template="", eos_token="</s>")
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    model = zoo.load(directory)
    bos = model.tokenizer.token_id("<s>")
    assert model.encode_prompt("hello world") == [bos, *model.tokenizer.encode("hello world")]
    text = model.generate("hello world", max_new_tokens=8, temperature=0)
    expected = model.tokenizer.decode(model.generate([bos, *model.tokenizer.encode("hello world")],
                                                     max_new_tokens=8, temperature=0))
    assert text == expected
    assert main(["generate", str(directory), "hello world", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "hello world" + text + "\n"


def test_conflicting_or_unsupported_config_is_refused(converted, tmp_path):
    import shutil

    for change, message in (({"embedding_dim": 256}, "disagree"), ({"use_bias": True}, "use_bias=true"),
                            ({"tie_word_embeddings": True}, "tie_word_embeddings")):
        src = tmp_path / f"bad{len(message)}"
        shutil.copytree(converted[1] / "hf", src)
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=message):
            zoo.convert(src, tmp_path / f"out{len(message)}", progress=False)


def _saved_by_transformers(path, depth: dict, width: dict, seed: int = 5):
    """A random xLSTMForCausalLM whose config names its depth and width the given way, saved by transformers."""
    from tests.xlstm_reference import NATIVE_KERNELS, TINY, hf_classes, randomise

    config_cls, model_cls = hf_classes()
    base = {k: v for k, v in TINY.items() if k not in ("hidden_size", "num_hidden_layers")}
    cfg = config_cls(**base, **depth, **width, **NATIVE_KERNELS, bos_token_id=0, pad_token_id=1, eos_token_id=2)
    model = model_cls(cfg).eval()
    randomise(model, seed)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("depth,width", [
    ({"num_blocks": 2}, {"hidden_size": 128}),  # saved as num_blocks 2 beside the class default num_hidden_layers 32
    ({"num_hidden_layers": 2}, {"hidden_size": 128}),
    ({"num_blocks": 2, "num_hidden_layers": 2}, {"embedding_dim": 128, "hidden_size": 128}),
])
def test_configs_saved_by_transformers_convert_with_the_block_count_it_builds(tmp_path, depth, width):
    ref = _saved_by_transformers(tmp_path / "hf", depth, width)
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    if "num_hidden_layers" not in depth:
        assert (saved["num_blocks"], saved["num_hidden_layers"]) == (2, 32)
    assert len(ref.backbone.blocks) == 2
    model = zoo.load(zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False), dtype=torch.float32)
    assert (model.config.n_layers, model.config.dim) == (2, 128)
    x = ids(1, 20, seed=6)
    with torch.no_grad():
        assert max_abs_diff(model(x), ref(x).logits) < 1e-4
    assert model.generate(x, max_new_tokens=8)[0] == hf_greedy(ref, x, 8)


def test_a_block_count_the_weights_do_not_hold_is_refused_by_name(converted, tmp_path):
    import shutil

    shutil.copytree(converted[1] / "hf", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "num_blocks": 3, "num_hidden_layers": 32}))
    with pytest.raises(CheckpointError, match=r"transformers builds 3 blocks from it \(num_blocks=3, "
                                              r"num_hidden_layers=32\), the weights hold 2"):
        zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)


def test_width_and_depth_resolve_as_xlstm_config_resolves_them():
    """xlstm_width_depth against transformers' own xLSTMConfig read from the same dict."""
    from pathlib import Path

    from transformers import xLSTMConfig
    from zoo.conversion.hf_xlstm import xlstm_width_depth

    for given in ({"num_blocks": 3}, {"num_hidden_layers": 5}, {"num_blocks": 4, "num_hidden_layers": 32}, {},
                  {"embedding_dim": 4096}, {"hidden_size": 256}, {"hidden_size": 512, "embedding_dim": 512}):
        theirs = xLSTMConfig.from_dict(dict(given))
        assert xlstm_width_depth(given, Path("config.json")) == (theirs.hidden_size, theirs.num_blocks), given
    with pytest.raises(CheckpointError, match="embedding_dim=64 and hidden_size=4096 disagree"):
        xlstm_width_depth({"embedding_dim": 64}, Path("config.json"))  # transformers: a 64-wide embedding, 4096 blocks


def test_published_config_json_converts_to_the_registered_config():
    """The fields of NX-AI/xLSTM-7b's config.json (after its PR #5) read by the converter give the registry's config."""
    from dataclasses import asdict
    from pathlib import Path

    from zoo.conversion.hf_xlstm import xlstm_fields

    published = {
        "architectures": ["xLSTMForCausalLM"], "model_type": "xlstm", "embedding_dim": 4096, "num_blocks": 32,
        "num_heads": 8, "vocab_size": 50304, "qk_dim_factor": 0.5, "v_dim_factor": 1.0, "head_dim": 512,
        "ffn_proj_factor": 2.667, "ffn_round_up_to_multiple_of": 64, "mlstm_round_up_to_multiple_of": 64,
        "gate_soft_cap": 15.0, "output_logit_soft_cap": 30.0, "norm_eps": 1e-6, "cell_norm_eps": 1e-6,
        "norm_reduction_force_float32": True, "use_bias": False, "add_out_norm": True, "tie_word_embeddings": False,
        "chunkwise_kernel": "chunkwise--triton_xl_chunk", "sequence_kernel": "native_sequence__triton",
        "step_kernel": "triton", "chunk_size": 64, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    assert xlstm_fields(published, Path("config.json")) == asdict(XLSTM_7B)


def test_registry_entry_carries_the_published_config(converted):
    info = zoo.model_info("xlstm-7b")
    c = XLSTMConfig(**info["config"])
    assert (c.dim, c.n_layers, c.n_heads, c.vocab_size) == (4096, 32, 8, 50304)
    assert (c.qk_dim, c.v_dim, c.ffn_dim, c.chunk_size) == (2048, 4096, 10944, 64)
    assert (c.gate_soft_cap, c.output_logit_soft_cap, c.norm_eps, c.cell_eps) == (15.0, 30.0, 1e-6, 1e-6)
    assert info["source"]["repo"] == "NX-AI/xLSTM-7b" and info["source"]["layout"] == "hf-xlstm"
    assert info["paper"] == "https://arxiv.org/abs/2503.13427" and info["license"] == "nxai-community-license"
    meta = get_family("xlstm").build_meta(XLSTM_7B)
    assert info["params"] == count_params(XLSTM_7B) == sum(p.numel() for p in meta.parameters())
    assert 6.8e9 < info["params"] < 6.9e9  # 27.46 GB of float32 shards / 4 bytes


def test_card_describes_the_model_and_validates(converted):
    from zoo.cards import validate_card

    card = (converted[1] / "native" / "README.md").read_text()
    validate_card(card)
    assert "xLSTM 7B" in card and "mLSTM" in card and "transformers" in card
