import pytest
import torch

from pap_severity.config import LossConfig
from pap_severity.models import ARCHS, WeightsUnavailable, build_backbone, build_model, corn_probabilities
from pap_severity.pipelines import PIPELINES, get_pipeline, score_to_label

WIDTH = {"classification": 6, "regression": 1, "combined": 6, "corn": 5, "sord": 6}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_pipeline_model_returns_one_tensor_with_the_score_last(name):
    pipe = get_pipeline(name)
    torch.manual_seed(0)
    model = build_model("resnet18", "none", pipe.head).eval()
    out = model(torch.randn(3, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (3, WIDTH[name])
    pred = pipe.decode(out)
    assert pred.probs.shape == (3, 5) and torch.allclose(pred.probs.sum(1), torch.ones(3), atol=1e-5)
    assert pred.score.tolist() == pytest.approx(out[:, -1].tolist())
    loss = pipe.loss(out, torch.tensor([0, 2, 4]), LossConfig(), None)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_the_expected_score_layer_is_fixed_at_one_to_five():
    model = build_model("resnet18", "none", get_pipeline("combined").head)
    layer = model.head.score.levels
    assert layer.weight.tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0]]
    assert not layer.weight.requires_grad
    out = model.eval()(torch.randn(2, 3, 32, 32))
    p = torch.softmax(out[:, :5], 1)
    assert out[:, 5].tolist() == pytest.approx((p @ torch.arange(1.0, 6.0)).tolist(), abs=1e-5)


def test_classifier_class_is_argmax_score_is_expectation():
    out = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0, 2.0]])
    pred = get_pipeline("classification").decode(out)
    assert pred.label.tolist() == [1]


def test_regression_class_is_the_nearest_level_of_the_clipped_score():
    assert score_to_label(torch.tensor([-3.0, 1.4, 1.6, 3.5, 4.49, 9.0])).tolist() == [0, 0, 1, 3, 3, 4]
    pred = get_pipeline("regression").decode(torch.tensor([[2.2], [4.9]]))
    assert pred.label.tolist() == [1, 4]
    assert pred.probs.argmax(1).tolist() == [1, 4]


def test_corn_probabilities_by_hand():
    # sigmoid(0) = .5 for every task: P(y>k) = .5, .25, .125, .0625
    p = corn_probabilities(torch.zeros(1, 4))[0]
    assert p.tolist() == pytest.approx([0.5, 0.25, 0.125, 0.0625, 0.0625])


def test_the_pipeline_names_the_config_checks_are_the_pipelines_there_are():
    from pap_severity.config import PIPELINES as NAMES

    assert tuple(PIPELINES) == NAMES


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown pipeline 'ordinal'"):
        get_pipeline("ordinal")
    with pytest.raises(ValueError, match="unknown architecture 'vgg16'"):
        build_backbone("vgg16", "none")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_resnet_builds(arch):
    _, width = build_backbone(arch, "none")
    assert width == (512 if arch in ("resnet18", "resnet34") else 2048)


@pytest.mark.parametrize("arch, features", [("resnet18_w16", 128), ("resnet34_w8", 64), ("resnet50_w16", 512)])
def test_narrow_resnets_keep_torchvisions_depth_at_a_fraction_of_the_width(arch, features):
    net, width = build_backbone(arch, "none")
    reference, _ = build_backbone(arch.split("_")[0], "none")
    assert width == features
    # the same blocks and names, each stage width/64 as wide
    assert [n for n, _ in net.named_modules()] == [n for n, _ in reference.named_modules()]
    assert net.layer1[0].conv1.out_channels * 64 == reference.layer1[0].conv1.out_channels * int(arch.split("_w")[1])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    scale = 64 // int(arch.split("_w")[1])
    assert count(reference) / scale**2 * 0.8 < count(net) < count(reference) / scale**2 * 1.2
    assert net(torch.randn(2, 3, 48, 48)).shape == (2, features)


def test_width_64_is_torchvisions_resnet():
    net, width = build_backbone("resnet18_w64", "none")
    reference, _ = build_backbone("resnet18", "none")
    assert width == 512 and type(net) is type(reference)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_a_narrow_model_round_trips_through_its_bundle(tmp_path):
    from pap_severity.checkpoints import ModelBundle, load_bundle, save_bundle
    from pap_severity.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    pipeline = get_pipeline("combined")
    model = build_model("resnet18_w8", "none", pipeline.head).eval()
    save_bundle(ModelBundle(model, pipeline, "resnet18_w8", Preprocess(32, IMAGENET_MEAN, IMAGENET_STD)),
                tmp_path / "m.pt")
    loaded, _ = load_bundle(tmp_path / "m.pt")
    x = torch.randn(3, 3, 32, 32)
    assert loaded.arch == "resnet18_w8" and torch.equal(loaded.model(x), model(x))


@pytest.mark.parametrize("arch", ["resnet18_w", "resnet18_w2", "resnet18_w65", "resnet18_wide", "vgg16_w16"])
def test_a_bad_width_names_the_form_it_wants(arch):
    from pap_severity.config import ModelConfig

    with pytest.raises(ValueError, match=r"unknown architecture .*<name>_w<width> with width 4 to 64"):
        build_backbone(arch, "none")
    with pytest.raises(ValueError, match="unknown architecture"):
        ModelConfig(arch=arch)


def test_imagenet_weights_exist_only_at_torchvisions_width():
    from pap_severity.config import ModelConfig

    with pytest.raises(ValueError, match="ImageNet weights exist for resnet18, not for resnet18_w16"):
        ModelConfig(arch="resnet18_w16", weights="imagenet")
    with pytest.raises(ValueError, match="no ImageNet weights exist for resnet18_w16"):
        build_backbone("resnet18_w16", "imagenet")


def test_imagenet_weights_come_from_a_prefilled_torch_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
    net, _ = build_backbone("resnet18", "imagenet")
    assert torch.equal(net.conv1.weight, reference.conv1.weight)


def test_missing_imagenet_weights_offline_name_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # a loopback port where nothing listens stands in for the unreachable download server
    import torchvision

    monkeypatch.setattr(
        torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value, "url", "http://127.0.0.1:9/resnet18-f37072fd.pth"
    )
    with pytest.raises(WeightsUnavailable) as err:
        build_backbone("resnet18", "imagenet")
    assert "model.weights=none" in str(err.value) and "hub/checkpoints" in str(err.value)
