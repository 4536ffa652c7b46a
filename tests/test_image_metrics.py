"""Image-quality metrics from local weight files (eval/metrics/image_metrics.py): FID/KID, CLIP score, LPIPS.

No real weights here: each network is built with random weights, saved in the formats users have, and
loaded back through the public API. The statistics are checked against torchmetrics' own given the same
features; a missing path skips its metric with one line, a bad file is one error line naming its key and file.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sdkd.cli.errors import UserError
from sdkd.eval.metrics.image_metrics import ClipScore, FidKid, Lpips, MetricsConfig, image_metrics, read_reference_stats
from sdkd.eval.metrics.inception import FidInceptionV3, load_fid_inception
from sdkd.train.losses.perceptual import LpipsVgg, load_lpips_vgg, torchmetrics_lpips_heads


class Given(nn.Module):
    """torchmetrics' `feature` for features computed beforehand."""

    num_features = 2048

    def forward(self, x):
        return x


def _images(low: int, high: int, seed: int, n: int = 4, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """A random FID Inception (He init, so that pool features stay O(1) through 40-odd layers) saved as
    safetensors without the classifier and as a .pth state dict; features of two different image sets."""
    folder = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    net = FidInceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    state = net.state_dict()
    save_file({k: v for k, v in state.items() if not k.startswith("fc.")}, str(folder / "inception.safetensors"))
    torch.save(state, folder / "pt_inception.pth")
    a = _images(0, 100, seed=1)  # dark noise
    ramp = torch.linspace(0, 255, 32).view(1, 1, 1, 32)
    b = (0.7 * ramp + _images(0, 70, seed=2)).clamp(0, 255).to(torch.uint8)  # bright horizontal ramps
    return dict(st=folder / "inception.safetensors", pth=folder / "pt_inception.pth", a=a, b=b,
                fa=net(a).double(), fb=net(b).double(), net=net)


def _torchmetrics_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=Given())
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


def _torchmetrics_kid(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.kid import KernelInceptionDistance

    kid = KernelInceptionDistance(feature=Given(), subset_size=len(real))
    kid.update(real, real=True)
    kid.update(fake, real=False)
    torch.manual_seed(0)
    return float(kid.compute()[0])


# ---------------------------------------------------------------------------------------------
# FID and KID


@pytest.mark.slow  # seconds of its own: the full suite runs it
def test_inception_loads_from_safetensors_and_pth(inception):
    one = inception["a"][:1]
    want = inception["net"](one)
    for file in (inception["st"], inception["pth"]):
        net = load_fid_inception(file)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        torch.testing.assert_close(net(one), want)
    assert want.shape == (1, 2048)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")  # our KID for comparison
def test_fid_kid_of_a_set_against_itself_and_another_match_torchmetrics(inception, tmp_path):
    fid_kid = FidKid(inception["pth"], "cpu", kid_subset_size=1000)
    fid_kid.update(inception["a"], real=True)
    fid_kid.update(inception["a"], real=False)
    itself = fid_kid.compute()
    assert itself["kid_subset_size"] == 4  # lowered to the number of images
    fid_kid.reset(keep_real=True)  # the next model against the same real images
    assert fid_kid.counts() == (4, 0)
    fid_kid.update(inception["b"], real=False)
    torch.manual_seed(0)
    other = fid_kid.compute()
    fa, fb = inception["fa"], inception["fb"]
    assert other["fid"] == pytest.approx(_torchmetrics_fid(fa, fb), rel=1e-4)
    assert other["kid"] == pytest.approx(_torchmetrics_kid(fa, fb), rel=1e-4)
    # a clearly different set is far, the set against itself ~0
    assert other["fid"] > 1 and abs(itself["fid"]) < 1e-4 * other["fid"]
    assert other["kid"] > 1e-2 and abs(itself["kid"]) < 1e-2 * other["kid"]
    # the real images' statistics, written as pytorch-fid writes them
    stats = fid_kid.save_reference_stats(tmp_path / "stats.npz")
    mu, sigma = read_reference_stats(stats)
    torch.testing.assert_close(mu, fa.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sigma, torch.from_numpy(np.cov(fa.numpy(), rowvar=False)), rtol=1e-4, atol=1e-7)
    fid_kid.reset()
    assert fid_kid.counts() == (0, 0)


@pytest.mark.slow
def test_reference_stats_give_the_fid_of_the_reference_images(inception, tmp_path):
    fa = inception["fa"].numpy()
    npz = tmp_path / "coco_stats.npz"
    np.savez(npz, mu=fa.mean(axis=0), sigma=np.cov(fa, rowvar=False))  # pytorch-fid's --save-stats format
    fid_kid = FidKid(inception["st"], "cpu", reference_stats=npz)
    fid_kid.update(inception["b"], real=False)
    got = fid_kid.compute()
    assert set(got) == {"fid"}  # no KID without real images
    assert got["fid"] == pytest.approx(_torchmetrics_fid(inception["fa"], inception["fb"]), rel=1e-4)
    fid_kid.reset()  # the reference statistics stay
    assert fid_kid.counts() == (2, 0)
    with pytest.raises(ValueError, match="reference statistics"):
        fid_kid.update(inception["a"], real=True)


# ---------------------------------------------------------------------------------------------
# CLIP score


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random transformers CLIPModel with its processor (toy byte-level tokenizer), saved."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from sdkd.train.models.toy import write_toy_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_toy_tokenizer(tmp_path_factory.mktemp("tok")),
                                              model_max_length=77)
    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(text_config=dict(**small, vocab_size=len(tokenizer), max_position_embeddings=77,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
                        vision_config=dict(**small, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_clip_score_is_the_models_cosine_times_100(clip_folder, no_network):
    from transformers import CLIPModel, CLIPProcessor

    images = _images(0, 256, seed=3, n=2, size=40)
    prompts = ["a red fox", "a lighthouse at night", "x"]
    model, processor = CLIPModel.from_pretrained(clip_folder), CLIPProcessor.from_pretrained(clip_folder)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=processor(images=list(images), return_tensors="pt")
                                       ["pixel_values"]).pooler_output
        text = processor(text=prompts, return_tensors="pt", padding=True)
        txt = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
    cosine = 100 * nn.functional.normalize(img, dim=-1) @ nn.functional.normalize(txt, dim=-1).T

    metric = ClipScore(clip_folder, "cpu")
    scores = torch.zeros_like(cosine)
    for i in range(len(images)):
        for j, prompt in enumerate(prompts):
            metric.reset()
            metric.update(images[i:i + 1], [prompt])
            scores[i, j] = metric.compute()["clip_score"]
    torch.testing.assert_close(scores, cosine.clamp(min=0), rtol=1e-4, atol=1e-3)
    assert (cosine.max(dim=1).values > 0).all()  # so the ranking below is not among zeros
    assert torch.equal(scores.argmax(dim=1), cosine.argmax(dim=1))
    metric.reset()
    metric.update(images, prompts[:2])  # a batch: the mean of its pairs
    want = (cosine[0, 0] + cosine[1, 1]) / 2
    assert metric.compute()["clip_score"] == pytest.approx(max(float(want), 0.0), rel=1e-4, abs=1e-3)


# ---------------------------------------------------------------------------------------------
# LPIPS


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random LPIPS-VGG (heads made non-negative, as lpips' trained heads are) in three forms: one
    safetensors file; a folder with torchvision's VGG16 numbering (plus its classifier) and lpips' heads
    file; a backbone-only .pth (heads from torchmetrics' copy)."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(2)
    net = LpipsVgg()
    with torch.no_grad():
        for k in range(5):
            getattr(net, f"lin{k}").model[1].weight.abs_()
    state = net.state_dict()
    backbone = {k: v for k, v in state.items() if k.startswith("features.")}
    heads = {k: v for k, v in state.items() if k.startswith("lin")}
    save_file(state, str(folder / "lpips_vgg.safetensors"))
    (folder / "parts").mkdir()
    torch.save({**backbone, "classifier.0.weight": torch.zeros(4, 4)}, folder / "parts" / "vgg16-397923af.pth")
    torch.save(heads, folder / "parts" / "vgg.pth")
    torch.save(backbone, folder / "vgg16.pth")
    return dict(single=folder / "lpips_vgg.safetensors", parts=folder / "parts", backbone=folder / "vgg16.pth")


def test_lpips_zero_for_equal_images_and_positive_otherwise(lpips_files):
    x = _images(0, 256, seed=4, n=2)
    y = _images(0, 256, seed=5, n=2)
    values = []
    for path in (lpips_files["single"], lpips_files["parts"]):
        metric = Lpips(path, "cpu")
        metric.update(x, x)
        assert metric.compute()["lpips"] == 0
        metric.reset()
        metric.update(x, y)
        values.append(metric.compute()["lpips"])
        metric.reset()
        metric.update(x.float() / 127.5 - 1, y.float() / 127.5 - 1)  # [-1, 1] floats: the same distance
        assert metric.compute()["lpips"] == pytest.approx(values[-1], rel=1e-5)
    assert values[0] > 0 and values[0] == pytest.approx(values[1], rel=1e-6)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metric.update(x.float(), y.float())


@pytest.mark.skipif(torchmetrics_lpips_heads() is None, reason="torchmetrics ships no LPIPS heads")
def test_lpips_backbone_only_takes_torchmetrics_heads(lpips_files):
    net = load_lpips_vgg(lpips_files["backbone"])
    heads = torch.load(torchmetrics_lpips_heads(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(net.lin4.model[1].weight, heads["lin4.model.1.weight"])
    x, y = _images(0, 256, seed=6, n=1) / 127.5 - 1, _images(0, 256, seed=7, n=1) / 127.5 - 1
    assert float(net(x, y)) > 0 and float(net(x, x)) == 0


# ---------------------------------------------------------------------------------------------
# The factory: skip lines and one-line errors


def test_unset_paths_skip_their_metric_with_one_line_each():
    metrics = image_metrics(MetricsConfig(), "cpu")
    assert (metrics.fid_kid, metrics.clip, metrics.lpips) == (None, None, None)
    assert metrics.skipped == [
        "skipped FID/KID: set metrics.inception_weights to a local Inception file",
        "skipped CLIP score: set metrics.clip_model to a local CLIP model folder",
        "skipped LPIPS: set metrics.lpips_weights to a local LPIPS-VGG weight file",
    ]
    assert metrics.compute() == {}


def test_a_set_path_builds_only_that_metric(lpips_files):
    metrics = image_metrics({"lpips_weights": str(lpips_files["single"]), "clip_model": ""}, "cpu")
    assert isinstance(metrics.lpips, Lpips) and metrics.fid_kid is None and metrics.clip is None
    assert [line.split(":")[0] for line in metrics.skipped] == ["skipped FID/KID", "skipped CLIP score"]


def _bad_inception_shape(tmp_path, inception):
    from safetensors.torch import load_file

    state = load_file(inception["st"])
    state["Mixed_6b.branch1x1.conv.weight"] = torch.zeros(192, 768, 3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    return tmp_path / "bad.safetensors"


class _NotWeights:
    pass


@pytest.mark.parametrize("case", ["missing", "folder", "wrong_network", "wrong_shape", "pickle", "suffix",
                                  "stats_shape", "stats_pickle", "clip_missing", "clip_not_model", "lpips_shape"])
def test_bad_files_give_one_line_naming_key_and_file(case, tmp_path, inception, lpips_files):
    cfg = MetricsConfig()
    if case == "missing":
        cfg.inception_weights, key = str(tmp_path / "nope.pth"), "metrics.inception_weights"
    elif case == "folder":
        cfg.inception_weights, key = str(tmp_path), "metrics.inception_weights"
    elif case == "wrong_network":
        cfg.inception_weights, key = str(lpips_files["single"]), "metrics.inception_weights"
    elif case == "wrong_shape":
        cfg.inception_weights, key = str(_bad_inception_shape(tmp_path, inception)), "metrics.inception_weights"
    elif case == "pickle":
        torch.save({"x": _NotWeights()}, tmp_path / "evil.pth")  # weights_only refuses the class
        cfg.inception_weights, key = str(tmp_path / "evil.pth"), "metrics.inception_weights"
    elif case == "suffix":
        (tmp_path / "weights.txt").write_text("hello")
        cfg.lpips_weights, key = str(tmp_path / "weights.txt"), "metrics.lpips_weights"
    elif case in ("stats_shape", "stats_pickle"):
        if case == "stats_shape":
            np.savez(tmp_path / "stats.npz", mu=np.zeros(64), sigma=np.eye(64))
        else:
            np.savez(tmp_path / "stats.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(2))
        cfg.inception_weights = str(inception["st"])
        cfg.fid_reference_stats, key = str(tmp_path / "stats.npz"), "metrics.fid_reference_stats"
    elif case == "clip_missing":
        cfg.clip_model, key = str(tmp_path / "clip"), "metrics.clip_model"
    elif case == "clip_not_model":
        (tmp_path / "clip").mkdir()
        (tmp_path / "clip" / "config.json").write_text('{"model_type": "clip", "text_config": 3}')
        cfg.clip_model, key = str(tmp_path / "clip"), "metrics.clip_model"
    else:
        state = {k: v for k, v in LpipsVgg().state_dict().items()}
        state["lin2.model.1.weight"] = torch.zeros(1, 128, 1, 1)
        save_file(state, str(tmp_path / "lpips.safetensors"))
        cfg.lpips_weights, key = str(tmp_path / "lpips.safetensors"), "metrics.lpips_weights"
    with pytest.raises(UserError) as err:
        image_metrics(cfg, "cpu")
    message = str(err.value)
    assert "\n" not in message and key in message, message
    assert str(getattr(cfg, key.split(".")[1])) in message, message
