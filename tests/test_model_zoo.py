"""Open model names: any torchvision classification model (`tv:<builder>`) and timm models
(`timm:<name>`) build with a fresh head and the right stem, train a step, and come back the same
through evaluate, predict and export. Random weights only: nothing is downloaded."""

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from cifarlab.checkpoint import load_checkpoint
from cifarlab.cli import main
from cifarlab.config import validate_config
from cifarlab.errors import UserError
from cifarlab.evaluate import EvalOptions, evaluate
from cifarlab.export import export_model
from cifarlab.inference import load_model, predict_logits
from cifarlab.models import ModelArgs, build_model
from cifarlab.predict import OnnxPredictor, Predictor, Pt2Predictor
from cifarlab.train import train
from tests.conftest import make_config

needs_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None, reason="pip install 'cifarlab[timm]'"
)
ALL_FORMATS = (("onnx", ".onnx", OnnxPredictor), ("pt2", ".pt2", Pt2Predictor))
# The smallest member of each family, on 32 px (ViTs: stem imagenet, built for input_size 32);
# timm's MobileNetV3 is tv:mobilenet_v3_small's family, timm's path is resnet10t's and the ViT's.
ZOO = [
    ("tv:resnet18", "cifar", 0),
    ("tv:mobilenet_v3_small", "cifar", 0),
    ("tv:efficientnet_b0", "cifar", 0),
    ("tv:convnext_tiny", "cifar", 0),
    ("tv:regnet_x_400mf", "cifar", 0),
    ("tv:vit_b_32", "imagenet", 32),  # one 32 px patch; slimmed by `slim_torchvision_vits`
    pytest.param("timm:resnet10t", "cifar", 0, marks=needs_timm),
    pytest.param("timm:vit_tiny_patch16_224", "imagenet", 32, marks=needs_timm),
]
FORMATS: dict[str, tuple] = {}  # a model whose export needs fewer formats would say so here


@pytest.fixture
def slim_torchvision_vits(monkeypatch):
    """torchvision's ViT builders at one encoder layer of width 64: the same modules (class
    token, position embeddings sized by image_size, heads.head) as vit_b_32's 88M parameters,
    at under 1%, so that its train-evaluate-export round trip takes seconds, not minutes."""
    from torchvision.models import vision_transformer

    real = vision_transformer._vision_transformer
    slim = {"num_layers": 1, "num_heads": 2, "hidden_dim": 64, "mlp_dim": 128}
    monkeypatch.setattr(vision_transformer, "_vision_transformer", lambda **k: real(**k | slim))


@pytest.mark.usefixtures("slim_torchvision_vits")
@pytest.mark.parametrize(("name", "stem", "input_size"), ZOO)
def test_zoo_model_trains_a_step_and_round_trips_through_evaluate_predict_and_export(
    name, stem, input_size, synthetic_images, tmp_path
):
    config = make_config(
        data=str(synthetic_images), data_root=str(tmp_path / "d"), model=name, stem=stem,
        input_size=input_size, epochs=1, batch_size=4, val_size=6, lr=0.01, warmup_epochs=0.0,
        tta="none", threads=1, subset=10,  # 4 train images: one step
    )  # fmt: skip
    result = train(config, tmp_path / "run", log=lambda s: None)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["model_args"]["name"] == name
    loaded = load_model(ckpt)
    images = np.stack([np.full((32, 32, 3), v, dtype=np.uint8) for v in (30, 120, 220)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    logits = predict_logits(loaded.model, x, loaded.normalize)
    reference = torch.softmax(logits / loaded.temperature, 1).numpy()  # fitted at training's end

    report = evaluate(
        EvalOptions(str(tmp_path / "run"), split="test", out=tmp_path / "eval"), log=lambda s: None
    )
    assert abs(report["accuracy"] - result.test_acc) < 1e-6

    np.testing.assert_allclose(
        Predictor(str(tmp_path / "run")).probabilities(images, 2), reference, atol=1e-5
    )
    for fmt, suffix, cls in FORMATS.get(name, ALL_FORMATS):
        out = export_model(str(tmp_path / "run"), fmt, tmp_path / f"model{suffix}")
        np.testing.assert_allclose(cls(str(out)).probabilities(images, 2), reference, atol=1e-4)


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("tv:regnet_x_400mf", "fc"),
        ("tv:efficientnet_b0", "classifier.1"),
        ("tv:convnext_tiny", "classifier.2"),
        ("tv:vit_b_32", "1.heads.head"),
        pytest.param("timm:vit_tiny_patch16_224", "1.head", marks=needs_timm),
    ],
)
@pytest.mark.usefixtures("slim_torchvision_vits")
def test_the_last_linear_becomes_a_fresh_head_wherever_it_sits(name, head):
    stem = "imagenet" if "vit" in name else "cifar"
    model = build_model(ModelArgs(name, 7, stem=stem, input_size=32))
    linear = model.get_submodule(head)
    assert isinstance(linear, nn.Linear) and linear.out_features == 7
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize(
    ("name", "conv", "pool"),
    [
        ("tv:resnet18", "conv1", "maxpool"),
        ("tv:densenet121", "features.conv0", "features.pool0"),
        ("tv:regnet_x_400mf", "stem.0", None),
        pytest.param("timm:resnet10t", "conv1.0", "maxpool", marks=needs_timm),  # a deep stem
    ],
)
def test_cifar_stem_relaxes_the_first_strided_conv_and_drops_the_max_pool_after_it(
    name, conv, pool
):
    model = build_model(ModelArgs(name, 3))
    assert model.get_submodule(conv).stride == (1, 1)
    if pool:
        assert isinstance(model.get_submodule(pool), nn.Identity)


def test_fixed_tv_names_keep_the_checkpoint_layout_they_always_had():
    from torchvision import models

    old = models.resnet18(weights=None)  # what tv-resnet18 built before tv:<name> existed
    old.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    old.fc = nn.Linear(512, 3)
    new = build_model(ModelArgs("tv-resnet18", 3))
    shapes = {k: v.shape for k, v in new.state_dict().items()}
    assert shapes == {k: v.shape for k, v in old.state_dict().items()}
    new.load_state_dict(old.state_dict())


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_a_fixed_tv_name_is_the_open_name_but_for_a_resnets_lesson_stem(arch, stem):
    """`tv-<arch>` differs from `tv:<arch>` only in a ResNet's conv1 under the cifar stem."""
    fixed = build_model(ModelArgs(f"tv-{arch}", 3, stem=stem, input_size=32)).state_dict()
    open_ = build_model(ModelArgs(f"tv:{arch}", 3, stem=stem, input_size=32)).state_dict()
    assert list(fixed) == list(open_)
    differ = {k for k in fixed if fixed[k].shape != open_[k].shape}
    assert differ == ({"conv1.weight"} if (arch, stem) == ("resnet18", "cifar") else set())


def test_a_weights_name_loads_that_enum_from_torchs_cache(tmp_path, monkeypatch):
    from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(3)
    original = mobilenet_v3_small(weights=None).state_dict()
    url = MobileNet_V3_Small_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]  # where torch.hub looks
    cached.parent.mkdir(parents=True)
    torch.save(original, cached)
    model = build_model(ModelArgs("tv:mobilenet_v3_small", 3), weights="IMAGENET1K_V1")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], original[k]) for k in original if "classifier.3" not in k)


def test_a_misspelt_weights_name_suggests_the_right_one():
    with pytest.raises(UserError, match=r"IMAGENET1K_V3 .* did you mean IMAGENET1K_V1"):
        build_model(ModelArgs("tv:resnet18", 3), weights="IMAGENET1K_V3")


def test_a_misspelt_model_name_suggests_the_closest_builders():
    with pytest.raises(UserError, match=r"did you mean tv:convnext_tiny"):
        build_model(ModelArgs("tv:convnext_tiney", 3))


@pytest.mark.usefixtures("slim_torchvision_vits")
def test_vit_weights_from_224_px_are_resampled_to_the_input_size(tmp_path):
    from torchvision.models import vit_b_32

    torch.manual_seed(4)
    original = vit_b_32(weights=None).state_dict()  # ImageNet's layout: 7x7 patches + cls
    torch.save(original, tmp_path / "vit.pth")
    model = build_model(
        ModelArgs("tv:vit_b_32", 3, stem="imagenet", input_size=64),
        weights=str(tmp_path / "vit.pth"),
    )
    loaded = model[1].state_dict()
    assert loaded["encoder.pos_embedding"].shape == (1, 1 + 2 * 2, 64)
    assert torch.equal(loaded["conv_proj.weight"], original["conv_proj.weight"])


def test_models_with_a_fixed_input_side_require_the_imagenet_stem():
    config = make_config(model="tv:vit_b_16")
    with pytest.raises(UserError, match=r"fixed input side; set stem: imagenet"):
        validate_config(config)
    validate_config(make_config(model="tv:vit_b_16", stem="imagenet"))


@needs_timm
def test_timm_weights_come_from_a_file_body_kept_head_fresh(tmp_path):
    import timm

    torch.manual_seed(5)
    original = timm.create_model("resnet10t").state_dict()  # 1000 classes, as a download
    torch.save(original, tmp_path / "r10t.pth")
    model = build_model(ModelArgs("timm:resnet10t", 3), weights=str(tmp_path / "r10t.pth"))
    loaded = model.state_dict()
    assert loaded["fc.weight"].shape == (3, 512)
    assert all(torch.equal(loaded[k], original[k]) for k in original if not k.startswith("fc."))


@needs_timm
def test_timm_weights_of_a_lightning_checkpoint_or_a_compiled_model_load(tmp_path):
    """timm stripped `_orig_mod.` itself, but a LightningModule's `model.` was "84 tensors
    missing"."""
    import timm

    torch.manual_seed(6)
    original = timm.create_model("resnet10t").state_dict()
    for attribute in ("model", "net"):  # a LightningModule's `self.net` was "84 missing" too
        wrapped = {f"{attribute}._orig_mod." + k: v for k, v in original.items()}
        torch.save({"state_dict": wrapped, "epoch": 3, "global_step": 90}, tmp_path / "l.ckpt")
        model = build_model(ModelArgs("timm:resnet10t", 3), weights=str(tmp_path / "l.ckpt"))
        assert torch.equal(model.state_dict()["conv1.0.weight"], original["conv1.0.weight"])
        assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept


@needs_timm
def test_a_timm_weights_file_without_tensors_names_the_file(tmp_path):
    """A state dict holding no tensors fell through to timm's lookup of its own weights online."""
    torch.save({}, tmp_path / "nothing.pth")
    (tmp_path / "zero.pth").touch()
    for file, said in (("nothing.pth", "holds no tensors"), ("zero.pth", "not a readable")):
        with pytest.raises(UserError, match=f"--weights .*{file}: {said}"):
            build_model(ModelArgs("timm:resnet10t", 3), weights=str(tmp_path / file))


@needs_timm
def test_timm_weights_load_into_a_model_with_two_heads(tmp_path):
    """LeViT's classifier is a pair (head, distillation head): finding the head raised
    StopIteration."""
    import timm

    torch.manual_seed(7)
    original = timm.create_model("levit_128s").state_dict()
    torch.save(original, tmp_path / "levit.pth")
    args = ModelArgs("timm:levit_128s", 3, stem="imagenet", input_size=224)
    loaded = build_model(args, weights=str(tmp_path / "levit.pth"))[1].state_dict()
    assert loaded["head.linear.weight"].shape[0] == loaded["head_dist.linear.weight"].shape[0] == 3
    body = [k for k in original if not k.startswith(("head.", "head_dist."))]
    assert body and all(torch.equal(loaded[k], original[k]) for k in body)


@needs_timm
def test_timm_weights_load_into_a_model_that_reads_a_tensor_while_it_is_built(
    tmp_path, monkeypatch
):
    """Older timm (1.0.15) builds ViT, DeiT, Swin and ConvNeXt reading tensors' values
    (`torch.linspace(...).item()`), which the meta device has not: `weights: FILE` raised its
    RuntimeError; their keys come from a build on the CPU."""
    import timm

    torch.manual_seed(7)
    original = timm.create_model("resnet10t").state_dict()
    torch.save({"state_dict": {"net." + k: v for k, v in original.items()}}, tmp_path / "w.pth")
    create = timm.create_model

    def reads_a_value(*args, **kwargs):
        torch.linspace(0, 0.1, 4)[1].item()  # as timm 1.0.15's stochastic depth rule
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", reads_a_value)
    torch.manual_seed(0)
    model = build_model(ModelArgs("timm:resnet10t", 3), weights=str(tmp_path / "w.pth"))
    head = model.state_dict()["fc.weight"]
    assert torch.equal(model.state_dict()["conv1.0.weight"], original["conv1.0.weight"])
    monkeypatch.undo()
    torch.manual_seed(0)  # the CPU build leaves the random state as it was: the same new head
    again = build_model(ModelArgs("timm:resnet10t", 3), weights=str(tmp_path / "w.pth"))
    assert torch.equal(again.state_dict()["fc.weight"], head)


@needs_timm
def test_a_timm_weights_file_of_another_model_is_refused(tmp_path):
    import timm

    torch.save(timm.create_model("mobilenetv3_small_050").state_dict(), tmp_path / "m.pth")
    with pytest.raises(UserError, match=r"does not fit timm:resnet10t \(.*size mismatch"):
        build_model(ModelArgs("timm:resnet10t", 3), weights=str(tmp_path / "m.pth"))


@needs_timm
def test_timm_models_refuse_pretrained_downloads_at_validation_and_at_build():
    with pytest.raises(UserError, match=r"only from a local file \(weights: FILE\)"):
        validate_config(make_config(model="timm:resnet10t", pretrained=True))
    with pytest.raises(UserError, match="takes weights only from a file"):
        build_model(ModelArgs("timm:resnet10t", 10), pretrained=True)


def test_a_timm_name_without_timm_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(UserError, match=r"pip install 'cifarlab\[timm\]'"):
        build_model(ModelArgs("timm:resnet10t", 3))


def test_models_command_explains_the_open_names_and_searches_them(capsys):
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "tv-resnet18" in listing and "tv:<name>" in listing and "timm:<name>" in listing
    assert main(["models", "--filter", "convnext_t"]) == 0
    found = capsys.readouterr().out
    assert "tv:convnext_tiny" in found and "tv:resnet18" not in found
