"""Accuracy recovery after pruning: BatchNorm recalibration and distillation."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import afie_fast as af
from afie_fast.training import train
from nets import ARCHS, loader, randomised

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11))


def batch_statistics(model, batches):
    """Each BN's running stats as momentum=None would leave them, computed directly: the
    average over batches of the mean and unbiased variance of its input (with every BN
    normalising by batch statistics, as in train mode)."""
    model = copy.deepcopy(model).eval()
    stats = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.register_forward_pre_hook(lambda mod, inp, name=name: stats.setdefault(name, []).append(
                (inp[0].double().mean((0, 2, 3)), inp[0].double().var((0, 2, 3), unbiased=True))))
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    return {n: (torch.stack([m for m, _ in v]).mean(0), torch.stack([v_ for _, v_ in v]).mean(0))
            for n, v in stats.items()}


@pytest.mark.parametrize("arch", ["vgg", "resnet_basic", "depthwise_separable"])
def test_recalibrated_statistics_equal_the_batch_statistics(arch):
    torch.manual_seed(0)
    model = randomised(ARCHS[arch]()).train()
    model.bn_momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    batches = loader(n_batches=3, batch=8, seed=4)
    expected = batch_statistics(model, batches)
    af.recalibrate_bn(model, batches)
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_mean.double(), expected[name][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m.running_var.double(), expected[name][1], rtol=1e-5, atol=1e-6)
    assert all(m.training for m in model.modules())  # the caller's modes are back
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == model.bn_momenta


def test_batches_limits_the_average():
    torch.manual_seed(0)
    model = randomised(ARCHS["vgg"]())
    batches = loader(n_batches=4, batch=8, seed=5)
    af.recalibrate_bn(model, batches, batches=1)
    expected = batch_statistics(model, batches[:1])
    torch.testing.assert_close(model[1].running_mean.double(), expected["1"][0], rtol=1e-5, atol=1e-6)


def test_prune_calibrate_recalibrates_the_copy_only():
    torch.manual_seed(0)
    model = randomised(ARCHS["vgg"]()).eval()
    report = af.score(model, loader(n_batches=2), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, _ = af.prune(model, report, target=0.5, example_inputs=X)
    calibrated, _ = af.prune(model, report, target=0.5, example_inputs=X, calibrate=loader(n_batches=3, seed=6))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    expected = batch_statistics(plain, loader(n_batches=3, seed=6))
    torch.testing.assert_close(calibrated[1].running_mean.double(), expected["1"][0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(calibrated[1].running_mean, plain[1].running_mean)
    assert not calibrated.training and all(not m.training for m in calibrated.modules())


def test_a_model_without_batchnorm_is_left_alone_with_a_warning():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no BatchNorm layers: nothing to recalibrate"):
        assert af.recalibrate_bn(model, loader()) is model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_recalibration_errors():
    model = randomised(ARCHS["vgg"]())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no batches"):
        af.recalibrate_bn(model, [])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # restored
    with pytest.raises(ValueError, match="batches must be a positive int"):
        af.recalibrate_bn(model, loader(), batches=0)


def digits_like(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(4)]


def test_distillation_with_alpha_zero_is_cross_entropy():
    torch.manual_seed(0)
    student = randomised(ARCHS["vgg"]())
    teacher = randomised(ARCHS["vgg"](), seed=3)
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    torch.manual_seed(1)
    train(a, digits_like(), 2)
    torch.manual_seed(1)
    train(b, digits_like(), 2, teacher=teacher, alpha=0.0)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_distillation_pulls_the_student_to_the_teacher():
    torch.manual_seed(0)
    teacher = randomised(ARCHS["vgg"](), seed=3).eval()
    with torch.no_grad():
        teacher[-1].weight.mul_(30)  # a confident teacher: its soft targets are far from uniform
    student = randomised(ARCHS["vgg"]())
    data = digits_like(2)

    def gap(m):
        m.eval()
        with torch.no_grad():
            return sum(F.kl_div(F.log_softmax(m(x), 1), F.log_softmax(teacher(x), 1), log_target=True,
                                reduction="batchmean").item() for x, _ in data)

    before = gap(student)
    train(student, data, 20, teacher=teacher, alpha=1.0, temperature=1.0)
    assert gap(student) < 0.5 * before
    assert not teacher.training
    with pytest.raises(ValueError, match="temperature > 0"):
        train(student, data, 1, teacher=teacher, temperature=0.0)
