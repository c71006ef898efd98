"""The seed specification's example model, its config lists, and a small digits training set-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SEED_CONFIGS", "Digits", "SeedModel", "evaluate", "load_digits", "train_epochs"]


class SeedModel(nn.Module):
    """The model of the spec's examples (NNI's MNIST net) for 1x28x28 inputs.

    ``dropout2`` acts on a flat vector, so it is ``nn.Dropout``: PyTorch deprecates
    ``Dropout2d`` on 2-D input.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout2d(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


#: The config lists of the spec text, verbatim.
SEED_CONFIGS = {
    "where: types and names": [{"op_types": ["Conv2d"]}, {"op_names": ["fc1"]}],
    "where: exclude": [{"op_types": ["Conv2d", "Linear"]}, {"exclude": True, "op_names": ["fc2"]}],
    "pruning": [{"op_types": ["Conv2d"], "total_sparsity": 0.5}, {"op_names": ["fc1"], "total_sparsity": 0.8}],
    "quantization": [
        {"op_types": ["Conv2d"], "quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8}},
        {"op_names": ["fc1"], "quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8}},
    ],
}


@dataclass(frozen=True)
class Digits:
    """scikit-learn's bundled 8x8 digits, upsampled to 1x28x28, stratified 70/30 split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(seed: int = 0) -> Digits:
    """The digits data set (no download: it ships with scikit-learn), normalised like MNIST."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x - 0.1307) / 0.3081
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.3, stratify=y.numpy(),
                                           random_state=seed)
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])


def train_epochs(model: nn.Module, data: Digits, epochs: int, seed: int = 0, lr: float = 0.05,
                 batch_size: int = 64, after_step: object = None) -> None:
    """Plain SGD training; ``after_step()`` (e.g. a sparsity scheduler's ``step``) runs after each step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=gen)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            opt.zero_grad()
            F.nll_loss(model(data.x_train[batch]), data.y_train[batch]).backward()
            opt.step()
            if after_step is not None:
                after_step()


@torch.no_grad()
def evaluate(model: nn.Module, data: Digits) -> float:
    """Test accuracy in percent (eval mode)."""
    model.eval()
    pred = model(data.x_test).argmax(dim=1)
    return 100.0 * float((pred == data.y_test).float().mean())
