import pytest
import torch

from cifarlab.errors import UserError
from cifarlab.models import MODELS, create_model


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


def test_fastnet_whitening_decorrelates_patches():
    torch.manual_seed(0)
    model = create_model("fastnet", 10)
    images = torch.nn.functional.avg_pool2d(
        torch.randn(64, 3, 34, 34), 3, 1
    )  # correlated neighbours
    model.init_whitening(images)
    out = model.whiten(images)[:, :12].permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(out)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert not model.whiten.weight.requires_grad


def test_unknown_model_lists_valid_ones():
    with pytest.raises(UserError, match="valid models: cnn, resnet18"):
        create_model("vgg", 10)
