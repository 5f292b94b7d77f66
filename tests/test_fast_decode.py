"""The compiled decoding step (zoo.generation): for every language-model family, decoding through one compiled
graph on the static state gives the eager path's greedy tokens and its logits within fp32 rounding; one graph
serves generations of every length; the step calls zoo's C++ kernels where they are built (single-token linears
become multiply-and-reduce where not); when it compiles by default.

Each family's tiny model is compiled once (Inductor's on-disk cache makes reruns faster); the module-scoped
fixtures share those compilations between the tests of a family.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo.architectures.kernels.matvec import matvec_linear
from zoo.architectures.state import KVCache

from zoo import generation, settings
from zoo.family import get_family
from zoo.generation import Sampling, compiled_step, decode

# tiny configs of every language-model family: the skeleton each family's code runs, random weights
FAMILIES = {
    "qwen2": dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                  rope_theta=10000.0, tie_embeddings=True, max_seq_len=256),
    # LongRoPE switching at 32 tokens: decoding crosses it, the state is rebuilt by one eager step
    "phi4": dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                 partial_rotary_factor=0.75, max_seq_len=256, original_max_seq_len=32, rope_type="longrope",
                 short_factor=[1.0, 1.05, 1.1, 1.0, 0.95, 1.2], long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0],
                 tie_embeddings=True),
    "qwen2_moe": dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, n_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96,
                      mlp_only_layers=[1]),
    # GLM-130B's layer (DeepNorm, GeGLU, rotary angles in fp16) with its blank-infilling prefix
    "glm": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, inner_size=96, mask_token_id=250,
                gmask_token_id=251, smask_token_id=252, sop_token_id=254),
    "xlstm": dict(vocab_size=128, dim=64, n_layers=2, n_heads=2, chunk_size=8),
    "mmfree": dict(vocab_size=128, dim=64, n_layers=2),
}
PROMPTS = {"glm": list(range(5, 25)) + [251, 254], "phi4": list(range(3, 11))}  # gMASK <sop>; 8 tokens
STEPS = {"phi4": 40}  # past the 32-token boundary


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    fam = get_family(family)
    model = fam.build(fam.config_from_dict(FAMILIES[family])).eval()
    with torch.no_grad():  # larger random weights than the default init: varied, decisive greedy tokens
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1 if "embed" in name else 0.25)
    return model


def stepped_logits(model, prompt: list[int], steps: int, compiled: bool) -> list[torch.Tensor]:
    """Last-position logits of the prompt, then of each greedy token fed back: what zoo.generation.decode does
    (eager prefill, then either eager steps on the dynamic state or the compiled step on the static one)."""
    with torch.inference_mode():
        state = model.new_state(1, len(prompt) + steps)
        out = [model(torch.tensor([prompt]), state=state, last_only=True)[:, -1]]
        step = compiled_step(model) if compiled else None
        if compiled:
            state.make_static(out[0].device)
            step.mark_dynamic_length(state)
        for _ in range(steps):
            tok = out[-1].argmax(-1)[:, None]
            if compiled and state.static_step(1):
                logits_best = step(model, state, tok)
                assert logits_best is not None, "the decoding step did not compile"
                out.append(logits_best[0])
                assert torch.equal(logits_best[1], out[-1].argmax(-1))
                state.counted_in_graph(1)
            else:
                state.make_dynamic()
                out.append(model(tok, state=state, last_only=True)[:, -1])
                if compiled:
                    state.make_static(out[-1].device)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    return request.param, tiny(request.param)


def test_compiled_steps_give_the_eager_logits_and_greedy_tokens(family_model):
    family, model = family_model
    prompt, steps = PROMPTS.get(family, [3, 17, 42, 9, 100]), STEPS.get(family, 12)
    eager = stepped_logits(model, prompt, steps, compiled=False)
    compiled = stepped_logits(model, prompt, steps, compiled=True)
    tokens = [int(t.argmax()) for t in eager]
    assert len(set(tokens)) > 3, f"{family}: the tiny model repeats itself; the comparison would mean little"
    assert [int(t.argmax()) for t in compiled] == tokens
    for i, (a, b) in enumerate(zip(eager, compiled)):
        assert (a - b).abs().max().item() < 2e-5 * max(1.0, a.abs().max().item()), f"{family}: step {i}"
    step = compiled_step(model)
    assert step.graphs == 1 and not step.failed  # one graph, every token

    # the engine itself, forced both ways, and a second generation of another length: still that one graph
    rows = [prompt[:-1] + [7]] if family != "glm" else [prompt]
    both = [list(decode(model, rows, steps - 2, Sampling(), set(), compile=c)) for c in (False, True)]
    assert [int(t) for t in both[0]] == [int(t) for t in both[1]]
    assert step.graphs == 1


def test_compiled_step_calls_zoos_cpu_kernels_for_linears_attention_and_argmax():
    model = tiny("qwen2")
    stepped_logits(model, [1, 2, 3], 2, compiled=True)
    step = compiled_step(model)
    # per block: q/k/v in one call, o, gate/up in one call, down; the (tied) output head; attention; the greedy pick
    assert step.cpu_ops == {"dense_rows_many": 2 * 2, "dense_rows": 2 * 2 + 1, "decode_attention": 2,
                            "argmax_last": 1}
    assert step.rewritten == 0  # no F.linear left for the multiply-and-reduce rewrite
    list(decode(model, [[1, 2, 3, 4]], 12, Sampling(), set(), compile=True))  # cache slots = head_dim = 16
    assert step.graphs == 1  # only the length dimension is symbolic, whatever its size


def test_without_the_cpu_kernels_single_token_linears_become_multiply_and_reduce(monkeypatch):
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    model = tiny("qwen2")
    eager = stepped_logits(model, [1, 2, 3], 4, compiled=False)
    compiled = stepped_logits(model, [1, 2, 3], 4, compiled=True)
    linears = 2 * 7 + 1  # q, k, v, o, gate, up, down per block, and the (tied) output head
    assert compiled_step(model).rewritten == linears
    assert not {"dense_rows", "dense_rows_many"} & set(compiled_step(model).cpu_ops)
    assert [int(t.argmax()) for t in compiled] == [int(t.argmax()) for t in eager]
    x, w, b = torch.randn(1, 1, 96), torch.randn(40, 96), torch.randn(40)
    assert torch.allclose(matvec_linear(x, w, b), F.linear(x, w, b), atol=1e-5)
    assert matvec_linear(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16


def test_left_padded_batch_decodes_the_same_compiled():
    """Pads in the static form: the mask over every cache slot hides them (and the slots not written yet)."""
    model = tiny("qwen2")
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    eager = [t.tolist() for t in decode(model, rows, 10, Sampling(), set(), compile=False)]
    compiled = [t.tolist() for t in decode(model, rows, 10, Sampling(), set(), compile=True)]
    assert compiled == eager
    alone = [int(t) for t in decode(model, rows[1:], 10, Sampling(), set(), compile=True)]
    assert [r[1] for r in compiled] == alone


def test_static_state_is_written_in_place_at_a_device_side_position():
    model = tiny("qwen2")
    with torch.inference_mode():
        state = model.new_state(1, 16)
        model(torch.tensor([[1, 2, 3]]), state, last_only=True)
        k0 = state.k[0]
        size = state.nbytes()
        state.make_static("cpu")
        for t in range(5):
            model(torch.tensor([[t + 4]]), state, last_only=True)
    assert isinstance(state, KVCache) and state.k[0] is k0 and k0.shape[2] == 16
    assert int(state.position) == state.length == 8
    assert state.nbytes() == size + state.position.nbytes + state.slots.nbytes  # nothing grew but the bookkeeping
    mask = state.attention_mask(1, torch.device("cpu"))
    assert mask.shape == (1, 1, 1, 16) and mask[0, 0, 0].tolist() == [True] * 9 + [False] * 7


def facts(**kw) -> generation.CompileFacts:
    base = dict(device="cpu", isa="AVX2", weights="bfloat16", weight_bytes=10**9, new_tokens=64,
                compiled_already=False)
    return generation.CompileFacts(**{**base, **kw})


def test_compile_default_never_picks_a_step_measured_slower_than_eager():
    """Every corner of the table walked: a ratio <= 1 stays eager however long the generation and even when a
    step is compiled already; a corner with no measurement (an ARM CPU, a GPU, ternary weights) stays eager too."""
    long = dict(weight_bytes=10**10, new_tokens=10**6)
    for (device, isa, weights), speedup in generation.COMPILED_SPEEDUP.items():
        for already in (False, True):
            got = generation.compile_pays(facts(device=device, isa=isa, weights=weights, compiled_already=already,
                                                **long))
            assert got == (speedup > 1), (device, isa, weights, already)
    for device, isa, weights in (("cpu", "DEFAULT", "bfloat16"), ("cpu", "ASIMD", "bfloat16"),
                                 ("cuda", "*", "bfloat16"), ("cpu", "AVX2", "ternary")):
        assert not generation.compile_pays(facts(device=device, isa=isa, weights=weights, **long))


def test_compile_default_pays_for_a_faster_step_only_over_a_long_enough_generation():
    table = {("cpu", "AVX512", "bfloat16"): 2.0}
    gb = facts(isa="AVX512", weight_bytes=10**9)
    # 1 GB of weights at 2x saves 0.5 GB of reading a token: compiling pays from COMPILE_PAYS / 0.5e9 tokens
    first = 2 * generation.COMPILE_PAYS // 10**9
    assert not generation.compile_pays(gb, table)  # 64 tokens: a compile costs more than it saves
    assert not generation.compile_pays(facts(isa="AVX512", new_tokens=first - 1), table)
    assert generation.compile_pays(facts(isa="AVX512", new_tokens=first), table)
    assert generation.compile_pays(facts(isa="AVX512", compiled_already=True), table)  # nothing left to pay
    assert not generation.compile_pays(facts(isa="AVX2", new_tokens=first), table)  # another ISA: unmeasured
    assert not generation.compile_pays(facts(isa="AVX512", weights="int8", new_tokens=first), table)


def test_compile_wanted_reads_the_models_facts_and_honours_the_asked_and_the_environment(monkeypatch):
    from zoo.architectures.quant import PackedLinear

    model = tiny("qwen2")
    assert generation.weight_kind(model) == "float32"
    assert generation.weight_kind(tiny("qwen2").to(torch.bfloat16)) == "bfloat16"
    packed = [torch.nn.Sequential(torch.nn.LayerNorm(64), PackedLinear(64, 32, False, q)) for q in ("int8", "int4")]
    assert [generation.weight_kind(m) for m in packed] == ["int8", "int4"]
    got = generation.compile_facts(model, 1, 100)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert (got.device, got.weights, got.weight_bytes, got.new_tokens, got.compiled_already) == (
        "cpu", "float32", weight_bytes, 100, False)
    assert got.isa == torch.backends.cpu.get_cpu_capability()

    monkeypatch.setattr(settings.SETTINGS, "compile", None)
    monkeypatch.setattr(generation, "COMPILED_SPEEDUP", {("cpu", got.isa, "float32"): 2.0})
    needed = 2 * generation.COMPILE_PAYS // weight_bytes + 1
    assert not generation.compile_wanted(None, model, 1, 128)  # 0.5 MB of weights: never pays
    assert generation.compile_wanted(None, model, 1, needed)  # long enough, and measured faster: it does
    monkeypatch.setattr(generation, "COMPILED_SPEEDUP", {("cpu", got.isa, "float32"): 0.5})
    assert not generation.compile_wanted(None, model, 1, needed * 10**6)  # measured slower: never by default
    assert generation.compile_wanted(True, model, 1, 2) and not generation.compile_wanted(False, model, 1, 10**12)
    monkeypatch.setattr(settings.SETTINGS, "compile", True)  # ZOO_COMPILE=1
    assert generation.compile_wanted(None, model, 1, 2)
    monkeypatch.setattr(settings.SETTINGS, "compile", False)  # ZOO_COMPILE=0
    assert not generation.compile_wanted(None, model, 1, 10**12)
    assert [settings.from_environ({"ZOO_COMPILE": v}).compile for v in ("", "1", "0", " 1 ")] == [None, True, False,
                                                                                                True]


def test_inductor_cache_goes_under_zoo_home_unless_the_user_chose_one(monkeypatch, tmp_path):
    import os

    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # (recorded, so the test's end restores whatever was there)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    generation.inductor_cache()

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "home" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    generation.inductor_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


@pytest.fixture(scope="module")
def native_qwen2(tmp_path_factory):
    """The tiny qwen2 written as a native checkpoint, for loading with device maps."""
    from zoo.weights.format import NativeConfig, write_config
    from zoo.weights.writer import write_state_dict

    directory = tmp_path_factory.mktemp("native") / "qwen2"
    directory.mkdir()
    write_state_dict(directory, tiny("qwen2").state_dict(), progress=False)
    write_config(directory, NativeConfig(family="qwen2", config=FAMILIES["qwen2"], name="qwen2",
                                         task="text-generation"))
    return directory


def test_a_device_mapped_model_decodes_compiled_and_one_streamed_from_disk_eagerly(native_qwen2):
    import warnings

    import zoo

    prompt = [5, 9, 2, 7]
    placed = zoo.load(native_qwen2, device_map={"": "cpu"}, dtype=torch.float32)
    placed.compile = False
    eager = placed.generate(prompt, max_new_tokens=12)
    assert len(set(eager)) > 3
    placed.compile = True
    assert placed.generate(prompt, max_new_tokens=12) == eager
    assert compiled_step(placed.module).graphs == 1 and not compiled_step(placed.module).failed

    streamed = zoo.load(native_qwen2, device_map="auto", max_memory={"cpu": "200KiB"}, dtype=torch.float32)
    assert "disk" in streamed.device_map.values()
    streamed.compile = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert streamed.generate(prompt, max_new_tokens=12) == eager
    assert any("decodes eagerly, since parts of it are streamed from disk" in str(w.message) for w in caught)
    assert streamed.module not in generation._STEPS  # nothing was compiled
