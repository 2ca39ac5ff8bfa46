"""copy_model: what copy.deepcopy makes of a model, checked against copy.deepcopy itself."""
import copy

import torch
from torch import nn

from afie_fast.copying import _plain_module, copy_model


class Scaled(nn.Parameter):  # a Parameter subclass: left to deepcopy
    pass


class OwnCopy(nn.Module):
    """A module with its own __deepcopy__, which copy_model must honour."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.copies = 0

    def __deepcopy__(self, memo):
        new = OwnCopy()
        new.lin.load_state_dict(self.lin.state_dict())
        new.copies = self.copies + 1
        return new


class WithState(nn.Module):
    """Plain attributes of every kind a module may hold beside its parameters."""

    def __init__(self, parent_box):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.config = {"widths": [4, 8], "name": "x", "pair": (1, 2)}
        self.sizes = [1, 2, 3]
        self.parent_box = parent_box  # a list that holds the parent: a cycle
        self.register_buffer("steps", torch.tensor(3))
        self.register_forward_hook(_hook)


def _hook(module, args, out):
    return out


def model():
    torch.manual_seed(0)
    box = []
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.Linear(8, 8), nn.Linear(8, 8),
                        WithState(box), OwnCopy())
    box.append(net)
    net[2].weight = nn.Parameter(net[2].weight.detach().to(memory_format=torch.channels_last))
    net[4].weight = net[3].weight  # tied
    net.shared = net[1]  # one module under two names
    net[1].weight.requires_grad_(False)
    net[3].bias.grad = torch.randn(8)
    net[0].bias = Scaled(torch.randn(8))
    base = torch.randn(16)
    net.register_buffer("whole", base)
    net.register_buffer("view", base[4:12].view(2, 4))  # shares storage with "whole"
    net[0].weight.note = "kept"
    return net


def test_copy_model_makes_what_deepcopy_makes():
    net = model()
    ours, theirs = copy_model(net), copy.deepcopy(net)
    assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]
    for (name, a), b, c in zip(ours.state_dict(keep_vars=True).items(), theirs.state_dict(keep_vars=True).values(),
                               net.state_dict(keep_vars=True).values()):
        assert type(a) is type(b) and torch.equal(a, b) and a.stride() == b.stride(), name
        assert a.requires_grad == b.requires_grad and (a.grad is None) == (b.grad is None), name
        assert hasattr(a, "note") == hasattr(b, "note") and a.data_ptr() != c.data_ptr(), name
    # sharing and cycles as deepcopy leaves them, nothing shared with the original
    assert ours[4].weight is ours[3].weight and ours[3].weight is not net[3].weight
    assert ours.shared is ours[1] is not net[1]
    assert ours.view.untyped_storage().data_ptr() == ours.whole.untyped_storage().data_ptr() != net.whole.data_ptr()
    assert ours[5].parent_box[0] is ours and ours[5].parent_box is not net[5].parent_box
    assert ours[5].config == net[5].config and ours[5].config["widths"] is not net[5].config["widths"]
    assert ours[5].sizes == [1, 2, 3] and ours[5].sizes is not net[5].sizes
    assert list(ours[5]._forward_hooks.values()) == [_hook]
    assert ours[6].copies == theirs[6].copies == 1  # its own __deepcopy__ ran
    assert _plain_module(nn.Conv2d) and _plain_module(WithState) and not _plain_module(OwnCopy)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(ours[0](x), net[0](x))
    with torch.no_grad():
        ours[0].weight.add_(1)
    assert not torch.equal(ours[0].weight, net[0].weight)
