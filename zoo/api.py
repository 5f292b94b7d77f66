"""zoo.load: the one entry point that turns a name, a directory or an hf:// address into a ready model."""

from __future__ import annotations

import os

import torch

from zoo.checks import (
    check_bool,
    check_device,
    check_int,
    check_memory_map,
    check_name_or_path,
    check_onednn,
    check_quantize,
)
from zoo.family import init_derived_buffers
from zoo.loading import build_model, materialize, open_checkpoint, resolve
from zoo.tasks import ZooModel, get_task
from zoo.weights.format import parse_dtype, read_config


def load(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    verify: bool = True,
    tp: int | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    quantize: str | None = None,
    compile: bool | None = None,
    onednn: str | None = None,
    pp: int | None = None,
) -> ZooModel:
    """Load a model by registry name, native directory or "hf://org/name@revision".

    dtype: None keeps the stored dtype. verify: check every file's sha256 against the index.
    tp: tensor-parallel degree inside a torchrun job. device_map/max_memory: place blocks on devices.
    pp: pipeline stages inside a torchrun job (zoo.pipeline): consecutive blocks per process.
    quantize: "int8" | "int4" (or a scheme name of zoo.architectures.quant): weight-only quantisation of every
        linear layer while loading, one layer at a time; a checkpoint stored quantized loads packed by itself.
        Packed weights go with tp (each rank packs or reads its own slices), device_map (a "disk" block streams
        packed) and pp (each stage its own blocks).
    compile: language models: decode each new token through one torch.compile'd step (zoo.generation); None takes
        the default (see zoo.generation.compile_wanted; ZOO_COMPILE=0 turns it off).
    onednn: "dense" | "pack" | "off": the vision models' linear layers on CPU through oneDNN on their own weights,
        on a packed second copy of each, or not (architectures/kernels/linear.py); None: ZOO_ONEDNN's setting
        (default "dense"). zoo.settings lists every switch.
    """
    # every argument is checked before anything is read or downloaded; errors name the argument and value
    name_or_path = check_name_or_path(name_or_path)
    dtype = parse_dtype(dtype)
    verify = check_bool(verify, "verify")
    tp = check_int(tp, "tp", minimum=1, allow_none=True)
    pp = check_int(pp, "pp", minimum=1, allow_none=True)
    quantize = check_quantize(quantize)
    compile = None if compile is None else check_bool(compile, "compile")
    onednn = check_onednn(onednn)
    check_memory_map(device_map, max_memory)
    if device_map is None:
        device = check_device(device)
    elif str(device) != "cpu":
        raise ValueError(f"device={device!r} with device_map: the map places every part; pass one of them")
    if revision is not None:
        from zoo.hub import validate_revision

        if not name_or_path.startswith("hf://"):
            raise ValueError(f"revision={revision!r}: applies to 'hf://org/name' addresses only, not to "
                             f"{name_or_path!r}")
        validate_revision(revision)
    if pp is not None and pp > 1:
        if device_map is not None:
            raise ValueError(f"pp={pp} with device_map: pipeline stages and a device map are two ways to place blocks; "
                             "pass one of them")
        from zoo.pipeline import load_pipeline

        model = load_pipeline(name_or_path, pp=pp, tp=tp or 1, dtype=dtype, revision=revision, verify=verify,
                              quantize=quantize)
        return _compile_option(model, False if compile is None else compile)
    if tp is not None and tp > 1 and device_map is not None:
        raise ValueError("tp and device_map are two ways to split a model; pass one of them")
    if tp is not None and tp > 1:
        from zoo.tensor_parallel import load_tensor_parallel

        model = load_tensor_parallel(name_or_path, tp=tp, dtype=dtype, revision=revision, verify=verify,
                                     quantize=quantize)
        # (DTensor compiles on CPU, measured: BENCHMARKS.md)
        return _onednn_option(_compile_option(model, compile), onednn)
    if device_map is not None:
        from zoo.device_map import load_with_device_map

        model = load_with_device_map(name_or_path, device_map=device_map, max_memory=max_memory, dtype=dtype,
                                     revision=revision, verify=verify, quantize=quantize)
        # plain path unless asked: parts move between devices by hooks, streamed ones swap their weights per call
        return _onednn_option(_compile_option(model, False if compile is None else compile), onednn)
    directory = resolve(name_or_path, revision)
    native = read_config(directory)
    family, module = build_model(native, quantize, str(directory / "config.json"))
    materialize(module, open_checkpoint(directory, verify), dtype, device, str(directory), native=native)
    init_derived_buffers(module, device)
    module.eval()
    return _onednn_option(_compile_option(get_task(family.task)(module, native, family, directory), compile), onednn)


def _onednn_option(model: ZooModel, onednn: str | None) -> ZooModel:
    if onednn is not None:
        from zoo.architectures.kernels.linear import set_onednn

        set_onednn(model.module, onednn)
    return model


def _compile_option(model: ZooModel, compile: bool | None) -> ZooModel:
    if compile is not None:
        if not hasattr(model, "compile"):
            raise ValueError(f"compile={compile!r}: applies to language models (their decoding step); "
                             f"{model.native.name or 'this model'} is a {model.task} model")
        model.compile = compile
    return model
