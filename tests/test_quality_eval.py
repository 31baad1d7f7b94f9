"""Evaluation of the quality benchmark: accuracy and the batched predictor."""

import pytest
import torch
from torch import nn

from benchmarks.quality import model as M


def test_accuracy_constant_predictor_gets_class_share():
    labels = [0, 0, 1, 2, 2, 2, 1, 0, 2, 2]
    for cls in range(3):
        share = labels.count(cls) / len(labels)
        assert M.accuracy([cls] * len(labels), labels) == pytest.approx(share)
    assert M.accuracy(labels, labels) == 1.0
    with pytest.raises(ValueError):
        M.accuracy([], [])


class _Const(nn.Module):
    def __init__(self, cls, n):
        super().__init__()
        self.cls, self.n = cls, n

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.n)
        out[:, self.cls] = 1.0
        return out


class _FakeEncoder(nn.Module):
    def forward(self, input_ids, attention_mask):
        class O:
            pass

        o = O()
        o.last_hidden_state = input_ids.unsqueeze(-1).float().expand(-1, -1, 4)
        return o


class _Data(M.Encoded):
    def __init__(self, lengths, labels):
        self.ids = [torch.arange(1, n + 1) for n in lengths]
        self.labels = torch.tensor(labels)


def test_predict_constant_model_and_order():
    labels = [1, 0, 1, 1, 2, 0, 1]
    data = _Data([3, 1, 5, 2, 2, 4, 1], labels)
    for cls in range(3):
        acc = M.evaluate(_FakeEncoder(), _Const(cls, 3), data)
        assert acc == pytest.approx(labels.count(cls) / len(labels))


def test_predict_keeps_original_order():
    # head predicts class = (mean of hidden) > 2  -> depends on each example's length
    class Thresh(nn.Module):
        def forward(self, x):
            return torch.stack([2.5 - x[:, 0], x[:, 0] - 2.5], 1)

    lengths = [6, 1, 5, 2, 8, 3]
    data = _Data(lengths, [0] * len(lengths))
    preds = M.predict(_FakeEncoder(), Thresh(), data, batch_size=2)
    expected = [int((n + 1) / 2 > 2.5) for n in lengths]  # mean of 1..n
    assert preds.tolist() == expected
