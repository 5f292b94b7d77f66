"""GLM-130B and ChatGLM-6B: the architecture against the literal reference of the published code
(tests/glm_reference.py), the tensor-parallel merge and split, the mask and position rules, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from zoo.architectures.glm import GLM, GLMConfig, glm_positions, prefix_mask
from zoo.conversion.megatron import merge_ranks, split_ranks
from zoo.conversion.sat_glm import SATSource, export_sat
from zoo.weights.format import CheckpointError

import zoo
from tests import glm_reference as R
from tests.helpers import max_abs_diff

ROOT = Path(__file__).resolve().parents[1]
L, H, INNER, HEADS, VOCAB, TP = 2, 64, 96, 4, 256, 2
MASK, GMASK, SMASK, EOS, SOP, EOP = 250, 251, 252, 253, 254, 255
SAT_ARGS = {"num_layers": L, "hidden_size": H, "inner_hidden_size": INNER, "num_attention_heads": HEADS,
            "vocab_size": VOCAB, "max_sequence_length": 1024, "mask_token_id": MASK, "gmask_token_id": GMASK,
            "smask_token_id": SMASK, "sop_token_id": SOP}
STD = 0.25  # big enough that attention and MLP matter next to the alpha-scaled residual (varied greedy tokens)


@pytest.fixture(scope="module")
def sat(tmp_path_factory):
    """A tiny GLM-130B in the released layout (2 rank files), and its conversion."""
    base = tmp_path_factory.mktemp("glm")
    shards = R.random_sat_shards(L, H, INNER, HEADS, VOCAB, TP, std=STD)
    R.write_sat_checkpoint(base / "sat", shards, model_config=SAT_ARGS)
    native = zoo.convert(base / "sat", base / "native", progress=False)
    return {"shards": shards, "dir": base / "sat", "native": native, "base": base,
            "model": zoo.load(native, dtype=torch.float32)}


def _prompt(n: int, mask: int | None, at: int | None = None, seed: int = 0) -> list[int]:
    """n random text ids with a mask token at `at` (or appended), ending like generate.py builds contexts:
    [gMASK] last, or eos after text that follows a [MASK]; then <sop>."""
    ids = torch.randint(0, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    if mask is None:
        return ids
    if at is None:
        return ids + [mask, SOP]
    return ids[:at] + [mask] + ids[at:] + [EOS, SOP]


def _reference(shards, seq: list[int], mode: str, fp16_rotary: bool = True) -> torch.Tensor:
    x = torch.tensor([seq])
    if mode == "causal":
        n = len(seq)
        mask = ~torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        return R.sat_glm130b_forward(shards, L, HEADS, x, torch.arange(n)[None], mask, fp16_rotary)
    token = {"gmask": GMASK, "mask": MASK, "smask": SMASK}[mode]
    mask, pos = R.sat_generate_masks_and_positions(seq, seq.index(token), 0, gmask=mode == "gmask")
    return R.sat_glm130b_forward(shards, L, HEADS, x, pos, mask, fp16_rotary)


PROMPTS = {  # long enough that positions reach the hundreds, where fp16 rotary angles are coarse
    "causal": lambda: _prompt(300, None),
    "gmask": lambda: _prompt(300, GMASK),
    "mask": lambda: _prompt(300, MASK, at=280),
    "smask": lambda: _prompt(300, SMASK, at=150),
}


@pytest.mark.parametrize("mode", sorted(PROMPTS))
def test_logits_match_the_sat_reference_in_each_mask_mode(sat, mode):
    seq = PROMPTS[mode]()
    expected = _reference(sat["shards"], seq, mode)
    x = torch.tensor([seq])
    if mode == "causal":
        got = sat["model"](x)
    else:
        positions, context = glm_positions(x, sat["model"].config)
        assert int(context[0]) == len(seq) - 1  # everything before <sop>
        got = sat["model"](x, positions, context)
    assert max_abs_diff(got, expected) < 1e-4


def test_fp16_rotary_angles_are_what_the_reference_computes_at_positions_in_the_hundreds(sat):
    seq = _prompt(300, None)
    x = torch.tensor([seq])
    fp32_angles = GLM(GLMConfig(**{**vars(sat["model"].config), "rope_fp16_angles": False})).eval()
    fp32_angles.load_state_dict(sat["model"].module.state_dict())
    with torch.no_grad():
        late = slice(200, None)
        assert max_abs_diff(sat["model"](x)[:, late], _reference(sat["shards"], seq, "causal")[:, late]) < 1e-4
        # the fp32 option is a different model at these positions, and matches the reference run in fp32
        assert max_abs_diff(fp32_angles(x)[:, late], _reference(sat["shards"], seq, "causal")[:, late]) > 1e-2
        fp32_ref = _reference(sat["shards"], seq, "causal", fp16_rotary=False)
        assert max_abs_diff(fp32_angles(x), fp32_ref) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_stay_close_to_fp32(sat, dtype):
    x = torch.tensor([_prompt(200, GMASK)])
    positions, context = glm_positions(x, sat["model"].config)
    full = sat["model"](x, positions, context)
    half = zoo.load(sat["native"], dtype=dtype)(x, positions, context)
    assert half.dtype == dtype
    # bf16 keeps 8 bits of mantissa to fp16's 11: this random model amplifies rounding, so it drifts further
    tolerance, agree = (0.02, 0.9) if dtype == torch.float16 else (0.3, 0.75)
    assert max_abs_diff(half, full) < tolerance * full.abs().max()
    assert (half.float().argmax(-1) == full.argmax(-1)).float().mean() > agree


@pytest.mark.parametrize("mode", ["gmask", "mask"])
def test_greedy_tokens_equal_the_reference(sat, mode):
    seq = _prompt(40, GMASK) if mode == "gmask" else _prompt(40, MASK, at=25)
    expected = R.sat_greedy(sat["shards"], L, HEADS, seq, seq.index(GMASK if mode == "gmask" else MASK),
                            mode == "gmask", 16)
    got = sat["model"].generate(seq, max_new_tokens=16, temperature=0.0)
    assert len(set(got)) > 4
    assert got == expected


def test_left_padded_batch_generates_what_each_prompt_generates_alone(sat):
    a, b = _prompt(20, MASK, at=8, seed=1), _prompt(9, GMASK, seed=2)
    alone = [sat["model"].generate(p, max_new_tokens=8, temperature=0.0) for p in (a, b)]
    assert sat["model"].generate([a, b], max_new_tokens=8, temperature=0.0) == alone


def test_mask_and_position_rules_hand_computed():
    c = GLMConfig(vocab_size=VOCAB, dim=H, n_layers=L, n_heads=HEADS, inner_size=INNER, mask_token_id=MASK,
                  gmask_token_id=GMASK, smask_token_id=SMASK, sop_token_id=SOP)
    a, b, x, y = 10, 11, 12, 13
    cases = [  # ids, positions, context length
        ([a, b, MASK, x, EOS, SOP, x, y], [0, 1, 2, 3, 4, 2, 2, 2], 5),  # the blank stands at the mask
        ([a, b, SMASK, x, EOS, SOP, x], [0, 1, 2, 3, 4, 2, 2], 5),
        ([a, b, x, GMASK, SOP, x, y], [0, 1, 2, 3, 4, 5, 6], 4),  # [gMASK]: positions continue
        ([a, b, x], [0, 1, 2], 0),  # no <sop>: plain causal
    ]
    for ids, positions, context in cases:
        pos, ctx = glm_positions(torch.tensor([ids]), c)
        assert pos[0].tolist() == positions and int(ctx[0]) == context, ids
    # ChatGLM-6B's 2-D positions: channel 0 stops at the mask, channel 1 counts the generated piece
    c2 = GLMConfig(**{**vars(c), "position_2d": True, "mlp": "gelu_tanh"})
    pos, ctx = glm_positions(torch.tensor([[a, b, GMASK, SOP, x, y]]), c2)
    assert pos[0].tolist() == [[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]] and int(ctx[0]) == 3
    # the attention rule: causal, plus both ways among the first 3 (True = attend)
    assert prefix_mask(torch.arange(5), 5, torch.tensor([3]))[0, 0].int().tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # ... which is generate.py's mask for a 4-token context ending with <sop> (True = masked there)
    sat_mask, sat_pos = R.sat_generate_masks_and_positions([a, b, GMASK, SOP], 2, 1, gmask=True)
    assert torch.equal(~sat_mask[0, 0], prefix_mask(torch.arange(5), 5, torch.tensor([3]))[0, 0])
    assert sat_pos[0].tolist() == [0, 1, 2, 3, 4]
    # ChatGLM-6B's code gives the same 2-D positions
    _, cg_pos = R.chatglm_masks_and_positions(torch.tensor([[a, b, GMASK, SOP, x, y]]), SOP, MASK, GMASK)
    assert cg_pos[0].tolist() == [[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]]


def test_glu_aware_merge_puts_all_first_halves_before_all_second_halves():
    key = "transformer.layers.0.mlp.dense_h_to_4h.weight"
    r0 = torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # rank 0: x1 rows 1, 2; x2 rows 3, 4
    r1 = torch.tensor([[5.0], [6.0], [7.0], [8.0]])
    assert merge_ranks(key, [r0, r1]).flatten().tolist() == [1, 2, 5, 6, 3, 4, 7, 8]
    dense = "transformer.layers.0.attention.dense.weight"  # row-parallel: input columns
    assert merge_ranks(dense, [torch.ones(2, 1), torch.zeros(2, 1)]).tolist() == [[1, 0], [1, 0]]


def test_merge_split_merge_round_trip_is_bit_identical(sat):
    shards = sat["shards"]
    for key in shards[0]:
        merged = merge_ranks(key, [sd[key] for sd in shards])
        for tp in (1, 2, 4):
            assert torch.equal(merge_ranks(key, split_ranks(key, merged, tp)), merged), (key, tp)
        assert all(torch.equal(a, sd[key]) for a, sd in zip(split_ranks(key, merged, TP), shards))
    source = SATSource(sat["dir"])  # the streaming reader merges exactly the same way
    for key in shards[0]:
        assert torch.equal(source.get(key), merge_ranks(key, [sd[key] for sd in shards])), key


def test_export_to_four_ranks_and_back_is_bit_identical(sat, tmp_path):
    export_sat(sat["native"], tmp_path / "tp4", tp=4)
    files = sorted(p.name for p in (tmp_path / "tp4" / "49300").iterdir())
    assert files == [f"mp_rank_{r:02d}_model_states.safetensors" for r in range(4)]
    again = zoo.convert(tmp_path / "tp4", tmp_path / "native4", progress=False)
    a, b = load_file(sat["native"] / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="tp=3 does not divide the 4 attention heads"):
        export_sat(sat["native"], tmp_path / "tp3", tp=3)


def test_conversion_drops_the_rotary_buffers_and_keeps_fp16(tmp_path):
    shards = R.random_sat_shards(1, 32, 48, 2, 64, 2, dtype=torch.float16)
    R.write_sat_checkpoint(tmp_path / "sat", shards, model_config={**SAT_ARGS, "num_layers": 1, "hidden_size": 32,
                                                                   "inner_hidden_size": 48, "num_attention_heads": 2,
                                                                   "vocab_size": 64})
    out = zoo.convert(tmp_path / "sat", tmp_path / "native", progress=False)
    tensors = load_file(out / "model.safetensors")
    assert not any("rotary" in k or "inv_freq" in k for k in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


# -- ChatGLM-6B ------------------------------------------------------------------------------------------------

CG = dict(layers=2, hidden=64, inner=128, heads=4, vocab=256)


def _chatglm(path: Path, tie: bool = False) -> dict:
    sd = R.random_chatglm_state(CG["layers"], CG["hidden"], CG["inner"], CG["vocab"], CG["heads"], std=STD)
    if tie:
        sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone()
    cfg = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": CG["vocab"],
           "hidden_size": CG["hidden"], "num_layers": CG["layers"], "num_attention_heads": CG["heads"],
           "inner_hidden_size": CG["inner"], "max_sequence_length": 512, "layernorm_epsilon": 1e-5,
           "position_encoding_2d": True, "bos_token_id": SOP, "eos_token_id": EOP, "mask_token_id": MASK,
           "gmask_token_id": GMASK, "pad_token_id": 3, "torch_dtype": "float32"}
    R.write_chatglm_checkpoint(path, sd, cfg)
    return sd


def test_chatglm_logits_and_greedy_tokens_match_its_reference(tmp_path):
    sd = _chatglm(tmp_path / "hf")
    model = zoo.load(zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False), dtype=torch.float32)
    assert not model.config.tie_embeddings and model.config.position_2d
    for seq in (_prompt(120, GMASK), _prompt(60, MASK, at=30)):
        x = torch.tensor([seq])
        mask, pos = R.chatglm_masks_and_positions(x, SOP, MASK, GMASK)
        positions, context = glm_positions(x, model.config)
        assert torch.equal(positions, pos)
        assert max_abs_diff(model(x, positions, context), R.chatglm_forward(sd, CG["layers"], CG["heads"], x, pos,
                                                                             mask)) < 1e-4
        expected = R.chatglm_greedy(sd, CG["layers"], CG["heads"], seq, 12, SOP, MASK, GMASK)
        got = model.generate(seq, max_new_tokens=12, temperature=0.0)
        assert len(set(got)) > 4 and got == expected


def test_chatglm_head_equal_to_the_embedding_is_stored_once(tmp_path):
    _chatglm(tmp_path / "hf", tie=True)
    out = zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert zoo.load(out).config.tie_embeddings


# -- bad input ---------------------------------------------------------------------------------------------------


def _small_sat(path: Path) -> list[dict]:
    shards = R.random_sat_shards(1, 32, 48, 2, 64, 2)
    R.write_sat_checkpoint(path, shards, model_config={**SAT_ARGS, "num_layers": 1, "hidden_size": 32,
                                                       "inner_hidden_size": 48, "num_attention_heads": 2,
                                                       "vocab_size": 64})
    return shards


def test_a_missing_rank_file_is_named(tmp_path):
    _small_sat(tmp_path / "sat")
    (tmp_path / "sat" / "49300" / "mp_rank_01_model_states.pt").rename(tmp_path / "elsewhere.pt")
    torch.save({"module": {}}, tmp_path / "sat" / "49300" / "mp_rank_02_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt is missing"):
        zoo.convert(tmp_path / "sat", tmp_path / "out", format="sat-glm", progress=False)


def test_rank_files_that_disagree_are_named(tmp_path):
    shards = _small_sat(tmp_path / "sat")
    del shards[1]["transformer.layers.0.attention.dense.bias"]
    torch.save({"module": shards[1]}, tmp_path / "sat" / "49300" / "mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointError, match=r"mp_rank_01_model_states.pt: lacks tensor "
                                              r"transformer.layers.0.attention.dense.bias"):
        zoo.convert(tmp_path / "sat", tmp_path / "out", progress=False)


def test_replicated_tensors_that_differ_between_ranks_are_refused(tmp_path):
    shards = _small_sat(tmp_path / "sat")
    shards[1]["transformer.final_layernorm.bias"] = shards[1]["transformer.final_layernorm.bias"] + 1
    torch.save({"module": shards[1]}, tmp_path / "sat" / "49300" / "mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointError, match="final_layernorm.bias differs from rank 0"):
        zoo.convert(tmp_path / "sat", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    _small_sat(tmp_path / "sat")
    torch.save({"module": {}, "args": Path("x")}, tmp_path / "sat" / "49300" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: refused"):
        zoo.convert(tmp_path / "sat", tmp_path / "out", progress=False)


def test_rank_files_carrying_training_arguments_convert(tmp_path):
    from argparse import Namespace

    shards = _small_sat(tmp_path / "sat")
    for r, sd in enumerate(shards):  # as Megatron/DeepSpeed-style savers write them
        torch.save({"module": sd, "iteration": 49300, "args": Namespace(num_layers=1, fp16=True)},
                   tmp_path / "sat" / "49300" / f"mp_rank_{r:02d}_model_states.pt")
    out = zoo.convert(tmp_path / "sat", tmp_path / "out", progress=False)
    assert "embed.weight" in load_file(out / "model.safetensors")


def test_latest_naming_a_missing_iteration_is_named(tmp_path):
    _small_sat(tmp_path / "sat")
    (tmp_path / "sat" / "latest").write_text("1000")
    with pytest.raises(CheckpointError, match=r"latest: names iteration '1000'"):
        zoo.convert(tmp_path / "sat", tmp_path / "out", format="sat-glm", progress=False)


def test_a_release_without_config_of_unregistered_shape_asks_for_one(tmp_path):
    _small_sat(tmp_path / "sat")
    (tmp_path / "sat" / "model_config.json").unlink()
    with pytest.raises(CheckpointError, match="no registered GLM model has these shapes .* pass --config FILE"):
        zoo.convert(tmp_path / "sat", tmp_path / "out", progress=False)


def test_a_config_that_does_not_fit_the_shapes_is_named(tmp_path):
    _small_sat(tmp_path / "sat")
    cfg = json.loads((tmp_path / "sat" / "model_config.json").read_text())
    (tmp_path / "sat" / "model_config.json").write_text(json.dumps({**cfg, "inner_hidden_size": 40}))
    with pytest.raises(CheckpointError, match=r"dense_h_to_4h.weight .*has shape \(48, 32\), the config needs "
                                              r"\(40, 32\)"):
        zoo.convert(tmp_path / "sat", tmp_path / "out", progress=False)


# -- memory ------------------------------------------------------------------------------------------------------


def test_merging_ranks_streams_in_about_one_merged_tensor_of_memory(tmp_path):
    """Peak RSS growth while converting a ~117 MiB checkpoint (2 rank files) whose largest merged tensor is 9 MiB."""
    script = ROOT / "benchmarks" / "bench_glm_merge.py"
    args = ["--sizes", "100", "--tp", "2", "--work", str(tmp_path), "--json"]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)
    assert row["total_bytes"] > 12 * row["largest_tensor_bytes"]
    assert row["peak_growth_bytes"] < 2.5 * row["largest_tensor_bytes"] + 8 * 2**20, row


# -- registry, card, command line ------------------------------------------------------------------------------


def test_registered_models_carry_the_published_configs_license_and_paper():
    from zoo.registry import get_entry

    glm = get_entry("glm-130b")
    assert {k: glm.config[k] for k in ("n_layers", "dim", "n_heads", "inner_size", "vocab_size", "max_seq_len")} == \
        {"n_layers": 70, "dim": 12288, "n_heads": 96, "inner_size": 32768, "vocab_size": 150528, "max_seq_len": 2048}
    assert glm.config["mlp"] == "geglu" and glm.config["tie_embeddings"] and not glm.config["position_2d"]
    assert abs(glm.params / 128.7e9 - 1) < 0.01  # 70 x 1.81B + the 150528 x 12288 embedding
    assert glm.paper == "https://arxiv.org/abs/2210.02414" and glm.source.layout == "sat-glm"
    for name in ("glm-130b", "glm-130b-int8", "glm-130b-int4"):
        assert get_entry(name).license == "glm-130b"
        assert get_entry(name).extra["license_url"].endswith("GLM-130B/blob/main/MODEL_LICENSE")
    chat = get_entry("chatglm-6b")
    assert {k: chat.config[k] for k in ("n_layers", "dim", "n_heads", "inner_size", "vocab_size", "sop_token_id")} \
        == {"n_layers": 28, "dim": 4096, "n_heads": 32, "inner_size": 16384, "vocab_size": 130528,
            "sop_token_id": 130004}
    assert chat.config["position_2d"] and chat.config["mlp"] == "gelu_tanh" and chat.source.layout == "hf-chatglm"


def test_zoo_info_shows_the_glm_130b_license(capsys):
    from zoo.cli import main

    assert main(["info", "glm-130b"]) == 0
    out = capsys.readouterr().out
    assert "glm-130b (https://github.com/THUDM/GLM-130B/blob/main/MODEL_LICENSE)" in out and "2210.02414" in out


def test_loading_a_model_given_out_on_request_says_how_to_get_and_convert_it():
    with pytest.raises(FileNotFoundError, match=r"on request .*`zoo convert DOWNLOADED_DIR .*glm-130b-int4 --name "
                                                r"glm-130b-int4 --quantize int4"):
        zoo.load("glm-130b-int4")


def test_the_card_states_the_license_and_the_memory_130b_needs(sat):
    card = (sat["native"] / "README.md").read_text()
    assert "The GLM-130B License" in card and "non-commercial research" in card
    assert "257.4 GB" in card and "130.6 GB" in card and "67.2 GB" in card  # fp16, INT8, INT4
    assert "license: other" in card and "GLM-130B/blob/main/MODEL_LICENSE" in card


def test_cli_converts_with_a_config_file_and_exports_to_two_ranks(tmp_path):
    from zoo.cli import main

    shards = _small_sat(tmp_path / "sat")
    config = json.loads((tmp_path / "sat" / "model_config.json").read_text())
    (tmp_path / "sat" / "model_config.json").unlink()  # the release has none
    (tmp_path / "args.json").write_text(json.dumps(config))
    assert main(["convert", str(tmp_path / "sat"), str(tmp_path / "native"), "--config",
                 str(tmp_path / "args.json")]) == 0
    assert main(["convert", "--to", "sat", str(tmp_path / "native"), str(tmp_path / "tp2"), "--tp", "2"]) == 0
    exported = [load_file(tmp_path / "tp2" / "49300" / f"mp_rank_{r:02d}_model_states.safetensors") for r in range(2)]
    for key in exported[0]:  # the same pieces as the published ranks
        assert all(torch.equal(exported[r][key], shards[r][key]) for r in range(2)), key
    assert set(shards[0]) - set(exported[0]) == {"transformer.layers.0.attention.rotary_emb.inv_freq"}
    with pytest.raises(CheckpointError, match="carries its own config; --config is not used"):
        zoo.convert(tmp_path / "native", tmp_path / "x", format="hf-chatglm", config=tmp_path / "args.json")
