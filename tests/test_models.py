import pytest
import torch

from cifarlab.errors import UserError
from cifarlab.models import MODELS, create_model
from cifarlab.models.whitening import first_conv, init_whitening, patch_whitening_filters


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("classes", [10, 100])
def test_every_model_maps_a_batch_to_class_logits(name, classes):
    model = create_model(name, classes).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, classes)


def test_cnn_is_the_lessons_architecture():
    model = create_model("cnn", 10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4096, 512), (512, 10)]
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [64, 64, 128, 128, 256, 256]
    assert sum(isinstance(m, torch.nn.Dropout2d) for m in model.modules()) == 3


@pytest.mark.parametrize("name", ["fastnet", "cnn", "resnet18"])
def test_whitening_decorrelates_patches_of_any_first_conv(name):
    torch.manual_seed(0)
    model = create_model(name, 10)
    images = torch.nn.functional.avg_pool2d(
        torch.randn(64, 3, 34, 34), 3, 1
    )  # correlated neighbours
    conv = first_conv(model)
    before = conv.weight[2 * 3 * conv.kernel_size[0] ** 2 :].clone()
    n = init_whitening(conv, images, eps=1e-6)  # eps this small: unit variance in every direction
    d = 3 * conv.kernel_size[0] * conv.kernel_size[1]
    assert n == 2 * d  # every direction as a +/- pair
    out = torch.nn.functional.conv2d(images, conv.weight[:d])
    cov = torch.cov(out.permute(1, 0, 2, 3).reshape(d, -1))
    assert torch.allclose(cov, torch.eye(d), atol=0.05)
    assert torch.equal(conv.weight[d : 2 * d], -conv.weight[:d])
    assert torch.equal(conv.weight[2 * d :], before)  # channels beyond the pairs keep their init
    assert not conv.weight.requires_grad


def test_whitening_narrow_conv_keeps_the_leading_directions():
    conv = torch.nn.Conv2d(3, 8, 3)
    images = torch.randn(32, 3, 16, 16) * torch.tensor([3.0, 1.0, 0.2])[None, :, None, None]
    assert init_whitening(conv, images) == 8
    filters = patch_whitening_filters(images, (3, 3))
    assert torch.allclose(conv.weight[:4], filters[:4])


def test_unknown_model_lists_valid_ones():
    with pytest.raises(UserError, match="valid models: cnn, resnet18"):
        create_model("vgg", 10)
