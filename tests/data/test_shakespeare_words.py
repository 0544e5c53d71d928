"""Shakespeare at the word level (next-word prediction): one client per role, a vocabulary of the training split's
10,000 most frequent words, examples of WINDOW previous words -> the next word."""

from __future__ import annotations

import pytest
import torch

from plait.core.models import build_model
from plait.data import shakespeare_words as words
from plait.data.federated import DataConfig, load_federated


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_words_are_lower_cased_letters_with_inner_apostrophes():
    assert words.words_of("O'er the hill, I'll go -- 'tis NIGHT!") == ["o'er", "the", "hill", "i'll", "go", "tis",
                                                                       "night"]


def test_a_role_gives_windows_of_the_previous_words_padded_at_its_start():
    tokens = torch.arange(2, 102)  # 100 words, none out of the vocabulary
    train_x, train_y, test_x, test_y = words.role_examples(tokens)
    assert train_x.shape[1] == words.WINDOW
    assert train_y[0] == 3 and train_x[0].tolist() == [words.PAD] * 9 + [2]  # the 2nd word, after the 1st
    assert train_x[20].tolist() == list(range(13, 23)) and train_y[20] == 23
    train_end, test_start = words.split_point(99)
    assert len(train_y) == train_end and len(test_y) == 99 - test_start == 10
    assert int(train_y.max()) < int(test_x[:, 0].min())  # the gap: no word in both splits


def test_examples_whose_next_word_is_out_of_the_vocabulary_are_left_out():
    tokens = torch.tensor([5, words.OOV, 6, 7, words.OOV] * 10)
    train_x, train_y, test_x, test_y = words.role_examples(tokens)
    assert len(train_y) and words.OOV not in train_y.tolist() and words.OOV not in test_y.tolist()
    assert words.OOV in train_x.flatten().tolist()  # unknown words still stand in the windows


def test_the_vocabulary_is_the_most_frequent_words_after_the_specials(cache):
    arrays = words.load_shakespeare_words(cache_dir=cache)
    vocab = arrays["vocab"].tolist()
    assert len(vocab) == words.VOCAB_SIZE == 10_002 and vocab[:2] == list(words.SPECIALS)
    assert vocab[2:5] == ["the", "and", "i"] and len(set(vocab)) == len(vocab)
    assert arrays["tokens"].max() < words.VOCAB_SIZE and len(arrays["names"]) == len(arrays["offsets"]) - 1
    assert words.encode_words(["the", "zzzz"], arrays["vocab"]).tolist() == [2, words.OOV]


def test_word_lstm_takes_the_whole_vocabulary():
    model = build_model("word_lstm")
    logits = model(torch.randint(0, words.VOCAB_SIZE, (4, words.WINDOW)))
    assert logits.shape == (4, words.VOCAB_SIZE)


def test_clients_are_roles_or_their_examples_dealt_evenly(cache):
    natural = load_federated(DataConfig(name="shakespeare_words", partition="natural", num_clients=8,
                                        max_examples_per_client=200, cache_dir=str(cache)))
    iid = load_federated(DataConfig(name="shakespeare_words", partition="iid", num_clients=8,
                                    max_examples_per_client=200, cache_dir=str(cache)))
    sizes = [natural.num_examples(c) for c in range(8)]
    assert natural.num_classes == words.VOCAB_SIZE and natural.train_x.dtype == torch.int64
    assert len(set(sizes)) > 1 and max(sizes) <= 200  # roles differ in size
    assert sum(sizes) == sum(iid.num_examples(c) for c in range(8))  # the same examples, reshuffled
    assert max(iid.num_examples(c) for c in range(8)) - min(iid.num_examples(c) for c in range(8)) <= 1
    assert torch.equal(natural.test_y, iid.test_y) and len(natural.test_y) > 0
    x, y = natural.client_train(0)
    follows = (x[1:, :-1] == x[:-1, 1:]).all(dim=1) & (x[1:, -1] == y[:-1])  # the next window of one role's text
    assert follows.float().mean() > 0.9  # (less than 1: a window after a left-out out-of-vocabulary word)


def test_shakespeare_rejects_a_label_skew_partition():
    with pytest.raises(ValueError, match="data.partition"):
        DataConfig(name="shakespeare_words", partition="shards")
