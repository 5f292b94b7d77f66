"""predict / features / `zoo predict` on an image and a short video, with the published preprocessing; bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

import zoo
from tests.helpers import max_abs_diff
from tests.test_swinv2 import LABELS, save_timm, tiny_timm
from tests.test_videomae2 import TINY as VIDEO_TINY
from tests.test_videomae2 import tiny_hf as tiny_hf_videomae
from zoo.cli import main


def write_png(path, w=100, h=80, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)  # smooth plus noise, so resizing matters
    Image.fromarray((base * 0.7 + rng.integers(0, 76, (h, w, 3))).astype(np.uint8)).save(path)
    return path


def write_video(path, n=12, w=48, h=40):
    import av

    frames = []
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(n):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0] = (np.arange(w) * 5 + 20 * t) % 256
            a[..., 1] = (np.arange(h)[:, None] * 6) % 256
            a[: 10 + t, : 5 + 3 * t, 2] = 200
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
            frames.append(a)
        for packet in stream.encode():
            out.mux(packet)
    return path


def parse(stdout: str) -> list[tuple[str, float]]:
    return [(line.split(None, 1)[1], float(line.split(None, 1)[0])) for line in stdout.strip().splitlines()]


@pytest.fixture(scope="module")
def swin(tmp_path_factory):
    d = tmp_path_factory.mktemp("swin")
    ref = tiny_timm()
    save_timm(ref, d / "timm")
    zoo.convert(d / "timm", d / "native", progress=False)
    return ref, d / "native"


def test_zoo_predict_on_an_image_uses_timms_eval_transform_and_labels(swin, tmp_path, capsys):
    from timm.data import create_transform

    ref, native = swin
    png = write_png(tmp_path / "cat.png")
    assert main(["predict", str(native), str(png), "--top-k", "3"]) == 0
    printed = parse(capsys.readouterr().out)

    transform = create_transform(input_size=64, interpolation="bicubic", crop_pct=0.9,
                                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = transform(Image.open(png).convert("RGB"))[None]
    model = zoo.load(native)
    assert max_abs_diff(model.module.patch_embed.proj.weight, ref.patch_embed.proj.weight) == 0
    assert max_abs_diff(model.to_batch(str(png))[0], x) < 1e-6  # same pixels as timm's published eval transform
    with torch.no_grad():
        probs = ref(x).softmax(-1)[0]
    top = probs.topk(3)
    assert [label for label, _ in printed] == [LABELS[i] for i in top.indices.tolist()]
    assert np.allclose([s for _, s in printed], top.values.tolist(), atol=1e-4)


def test_predict_accepts_a_path_a_pil_image_an_array_and_a_batch(swin, tmp_path):
    _, native = swin
    model = zoo.load(native)
    png = write_png(tmp_path / "x.png")
    img = Image.open(png)
    by_path = model.predict(png, top_k=2)
    assert model.predict(img, top_k=2) == by_path
    assert model.predict(np.asarray(img.convert("RGB")), top_k=2) == by_path
    batch = model.predict([png, str(png)], top_k=2)  # batched: the same up to float summation order
    for row in batch:
        assert [label for label, _ in row] == [label for label, _ in by_path]
        assert np.allclose([s for _, s in row], [s for _, s in by_path], atol=1e-6)
    assert model.features(png).shape == (1, 48)
    assert model.features(png, pooled=False).shape == (1, 8, 8, 48)  # 64 px / 4 / 2


def test_zoo_predict_on_a_short_video_matches_transformers(tmp_path, capsys):
    import av
    from torchvision import transforms

    ref = tiny_hf_videomae(num_labels=5)
    ref.save_pretrained(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    clip = write_video(tmp_path / "clip.mp4")
    assert main(["predict", str(tmp_path / "native"), str(clip), "--top-k", "2"]) == 0
    printed = parse(capsys.readouterr().out)

    # reference pixels: 12 frames, 4 wanted at stride 4 (span 13 > 12), so spread evenly: 0, 4, 7, 11
    with av.open(str(clip)) as c:
        frames = [f.to_image() for f in c.decode(video=0)]
    assert len(frames) == 12
    tf = transforms.Compose([transforms.Resize(32, interpolation=transforms.InterpolationMode.BILINEAR),
                             transforms.CenterCrop(32), transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    x = torch.stack([tf(frames[i]) for i in (0, 4, 7, 11)])[None]  # [1, T, C, H, W], transformers' layout
    model = zoo.load(tmp_path / "native")
    assert max_abs_diff(model.to_batch(str(clip))[0], x.transpose(1, 2)) < 1e-6
    with torch.no_grad():
        top = ref(x).logits.softmax(-1)[0].topk(2)
    assert [label for label, _ in printed] == [f"action {i}" for i in top.indices.tolist()]
    assert np.allclose([s for _, s in printed], top.values.tolist(), atol=1e-4)
    # a list of frames and a uint8 [T, H, W, 3] tensor are the same video
    arrays = [np.asarray(f) for f in frames]
    assert model.predict(arrays, top_k=2) == model.predict(str(clip), top_k=2)
    assert model.predict(torch.from_numpy(np.stack(arrays)), top_k=2) == model.predict(clip, top_k=2)


def test_unreadable_image_and_video_are_clear_cli_errors(swin, tmp_path, capsys):
    _, native = swin
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    assert main(["predict", str(native), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "not a readable image" in err
    assert main(["predict", str(native), str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().err

    ref = tiny_hf_videomae()
    ref.save_pretrained(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "video", progress=False)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x01 definitely not a video" * 10)
    assert main(["predict", str(tmp_path / "video"), str(junk)]) == 2
    err = capsys.readouterr().err
    assert "junk.mp4" in err and "not a readable video" in err


def test_wrong_channels_and_resolution_say_what_the_model_takes(swin):
    _, native = swin
    model = zoo.load(native)
    with pytest.raises(ValueError, match="3-channel images; got 4 channels"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="needs 3 channels"):
        model.predict(np.zeros((64, 64, 2), np.uint8))  # RGBA converts; 2 channels do not
    with pytest.raises(ValueError, match="takes 64x64 images .* got 48x48"):
        model.predict(torch.randn(3, 48, 48))


def test_video_model_says_which_clip_it_takes(tmp_path):
    tiny_hf_videomae().save_pretrained(tmp_path / "hf")
    zoo.convert(tmp_path / "hf", tmp_path / "native", progress=False)
    model = zoo.load(tmp_path / "native")
    n, s = VIDEO_TINY["num_frames"], VIDEO_TINY["image_size"]
    with pytest.raises(ValueError, match=f"takes {n} frames of {s}x{s}"):
        model(torch.randn(1, 3, 8, s, s))
    with pytest.raises(ValueError, match="3-channel frames; got 1"):
        model(torch.randn(1, 1, n, s, s))
    with pytest.raises(ValueError, match="needs 3 channels"):
        model.predict([np.zeros((40, 40, 2), np.uint8)] * 4)
