import pytest
import torch

from plait.core.flat import flat_params, flatten, load_flat_params, make_spec, split_views, unflatten
from plait.core.models import build_model, count_params


def test_flatten_round_trip_mixed_dtypes():
    # Prepare
    state = {"w": torch.randn(3, 4), "b": torch.arange(5.0), "steps": torch.tensor([7, 8], dtype=torch.int64),
             "h": torch.randn(2, 2, dtype=torch.float64)}
    # Execute
    buffers, spec = flatten(state)
    rebuilt = unflatten(buffers, spec)
    # Assert: one buffer per dtype, exact values and shapes back
    assert set(buffers) == {torch.float32, torch.int64, torch.float64}
    assert buffers[torch.float32].numel() == 12 + 5 and buffers[torch.float32].is_contiguous()
    for name, tensor in state.items():
        assert rebuilt[name].dtype == tensor.dtype and rebuilt[name].shape == tensor.shape
        assert torch.equal(rebuilt[name], tensor)


def test_unflatten_returns_views_not_copies():
    buffers, spec = flatten({"a": torch.zeros(2, 2), "b": torch.zeros(3)})
    views = unflatten(buffers, spec)
    buffers[torch.float32][4:] = 1.0
    assert torch.equal(views["b"], torch.ones(3))


def test_flatten_rejects_mismatched_state():
    _, spec = flatten({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="missing"):
        flatten({"b": torch.zeros(2)}, spec)


def test_split_views_gradient_is_flat():
    # d/dw sum(a * 2) + sum(b * 3) = [2, 2, 3, 3, 3]
    spec = make_spec({"a": torch.zeros(2), "b": torch.zeros(3)})
    w = torch.zeros(5, requires_grad=True)
    views = split_views(w, spec)
    (grad,) = torch.autograd.grad((views["a"] * 2).sum() + (views["b"] * 3).sum(), w)
    assert torch.equal(grad, torch.tensor([2.0, 2, 3, 3, 3]))


@pytest.mark.parametrize("name, expected", [("2nn", 199_210), ("cnn", 1_663_370)])
def test_fedavg_paper_models_have_the_papers_sizes(name, expected):
    model = build_model(name)
    assert count_params(model) == expected
    flat, spec = flat_params(model)
    assert flat.numel() == expected and spec.numel() == expected


def test_char_lstm_shape_and_flat_round_trip():
    model = build_model("char_lstm", vocab_size=80)
    logits = model(torch.randint(0, 80, (4, 80)))
    assert logits.shape == (4, 80)
    flat, spec = flat_params(model)
    load_flat_params(model, torch.zeros_like(flat), spec)
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())
    load_flat_params(model, flat, spec)
    assert torch.equal(flat_params(model)[0], flat)


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="model = 'resnet'"):
        build_model("resnet")


def test_flatten_names_a_tensor_whose_shape_changed():
    _, spec = flatten({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="a: shape"):
        flatten({"a": torch.zeros(3, 2)}, spec)
    with pytest.raises(ValueError, match="no trainable parameters"):
        flat_params(torch.nn.ReLU())
