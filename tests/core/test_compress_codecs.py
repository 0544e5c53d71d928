"""Compression codecs: round-trip error within each codec's bound, wire size, error feedback."""

import math

import pytest
import torch

from plait.core.compress import CODECS, ErrorFeedback, make_codec


def _x(numel=1000, seed=0):
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_keeps_shape_and_dtype(name):
    x = _x(60).view(3, 4, 5)
    codec = make_codec(name) if name not in ("topk", "randk") else make_codec(name, ratio=0.5)
    y = codec.decode(codec.encode(x))
    assert y.shape == x.shape and y.dtype == x.dtype


def test_none_is_exact_and_counts_fp32_bytes():
    x = _x()
    enc = make_codec("none").encode(x)
    assert torch.equal(make_codec("none").decode(enc), x)
    assert enc.nbytes == 4000


def test_fp16_relative_error_bound():
    x = _x() * 10
    x = x[x.abs() > 1e-3]  # inside fp16's normal range
    codec = make_codec("fp16")
    enc = codec.encode(x)
    rel = ((codec.decode(enc) - x).abs() / x.abs()).max()
    assert rel <= 2.0**-11
    assert enc.nbytes == 2 * x.numel()


@pytest.mark.parametrize("block_size", [0, 64])
def test_int8_error_at_most_half_a_step(block_size):
    x = _x(1000)
    x[7] = 40.0  # one outlier: per-tensor scale grows, per-block scale stays small elsewhere
    codec = make_codec("int8", block_size=block_size)
    enc = codec.encode(x)
    err = (codec.decode(enc) - x).abs()
    size = block_size or x.numel()
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % size)).view(-1, size)
    step = (blocks.abs().amax(dim=1) / 127).repeat_interleave(size)[: x.numel()]
    assert torch.all(err <= step / 2 + 1e-6)
    nblocks = math.ceil(x.numel() / size)
    assert enc.nbytes == x.numel() + 4 * nblocks


def test_int8_hand_values():
    codec = make_codec("int8")
    enc = codec.encode(torch.tensor([1.27, -0.635, 0.0]))
    assert enc.tensors["q"].tolist() == [127, -64, 0]  # -63.5 rounds half to even -> -64
    assert torch.allclose(codec.decode(enc), torch.tensor([1.27, -0.64, 0.0]))


def test_qsgd_bound_and_unbiased():
    levels = 4
    x = _x(200)
    codec = make_codec("qsgd", levels=levels)
    g = torch.Generator().manual_seed(1)
    decoded = torch.stack([codec.decode(codec.encode(x, generator=g)) for _ in range(2000)])
    # every draw is within one level step of x
    assert torch.all((decoded - x).abs() <= x.norm() / levels + 1e-5)
    # unbiased: the mean of 2000 draws is within 5 standard errors (the variance per draw is <= step^2 / 4)
    step = float(x.norm()) / levels
    assert (decoded.mean(0) - x).abs().max() <= 5 * (step / 2) / math.sqrt(2000)
    enc = codec.encode(x, generator=g)
    assert enc.tensors["levels"].dtype == torch.int8 and enc.nbytes == 200 + 4


def test_qsgd_is_seeded():
    x = _x()
    a = make_codec("qsgd", levels=2).encode(x, generator=torch.Generator().manual_seed(3))
    b = make_codec("qsgd", levels=2).encode(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.tensors["levels"], b.tensors["levels"])


def test_topk_keeps_largest_and_drops_the_rest():
    x = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 1.0, -0.05])
    codec = make_codec("topk", ratio=0.25)  # k = 2
    enc = codec.encode(x)
    assert codec.decode(enc).tolist() == [0.0, -5.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    assert enc.nbytes == 2 * (4 + 4)


def test_randk_seed_regenerates_indices_and_unbiased_scaling():
    x = _x(100)
    codec = make_codec("randk", ratio=0.1)
    enc = codec.encode(x, generator=torch.Generator().manual_seed(0))
    y = codec.decode(enc)
    kept = y != 0
    assert int(kept.sum()) == 10 and torch.equal(y[kept], x[kept])
    assert enc.nbytes == 8 + 10 * 4  # seed + values, no indices
    unbiased = make_codec("randk", ratio=0.1, unbiased=True)
    g = torch.Generator().manual_seed(2)
    mean = torch.stack([unbiased.decode(unbiased.encode(x, generator=g)) for _ in range(4000)]).mean(0)
    # per coordinate: value·10 with prob 0.1, so the std of one draw is |x|·3; 4000 draws
    assert torch.all((mean - x).abs() <= 5 * 3 * x.abs() / math.sqrt(4000) + 1e-6)


@pytest.mark.parametrize("name,options", [("topk", {"ratio": 0.1}), ("randk", {"ratio": 0.1}),
                                          ("int8", {}), ("qsgd", {"levels": 2})])
def test_error_feedback_keeps_what_was_dropped(name, options):
    codec = make_codec(name, **options)
    feedback = ErrorFeedback(codec)
    xs = [_x(50, seed=s) for s in range(30)]
    sent = torch.zeros(50)
    for x in xs:
        enc = feedback.compress(x, generator=torch.Generator().manual_seed(len(xs)))
        sent += codec.decode(enc)
    # invariant: everything given = everything sent + what is still held back
    assert torch.allclose(sent + feedback.residual, torch.stack(xs).sum(0), atol=1e-4)


def test_error_feedback_first_call_residual_is_the_drop():
    codec = make_codec("topk", ratio=0.25)
    feedback = ErrorFeedback(codec)
    x = torch.tensor([4.0, 1.0, -3.0, 0.5, 0.2, 0.1, 0.0, 2.0])
    feedback.compress(x)
    assert torch.equal(feedback.residual, torch.tensor([0.0, 1.0, 0.0, 0.5, 0.2, 0.1, 0.0, 2.0]))
    # second call: the residual's 2.0 plus the new 2.0 now makes the top 2
    enc = feedback.compress(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]))
    assert codec.decode(enc)[7] == 4.0


def test_unknown_codec_and_bad_options_are_errors():
    with pytest.raises(ValueError, match="compression.codec"):
        make_codec("zip")
    with pytest.raises(ValueError, match="ratio"):
        make_codec("topk", ratio=0.0)
    with pytest.raises(ValueError, match="bad options"):
        make_codec("fp16", levels=3)
    with pytest.raises(ValueError, match="decoder"):
        make_codec("fp16").decode(make_codec("int8").encode(_x()))
