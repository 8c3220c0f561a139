"""Probes: how much a frozen encoder's features tell about labels.

A linear probe (LayerNorm, then a linear classifier fit by L-BFGS) and a k-NN classifier
(cosine similarity, temperature-weighted votes, as in DINO) on features of held-out images.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leworld.augment import normalize, resize, to_float
from leworld.runtime import autocast


@torch.no_grad()
def extract_features(backbone: nn.Module, images: np.ndarray, size: int, device: torch.device,
                     batch_size: int = 256) -> Tensor:
    """uint8 images (N, H, W, 3) -> features (N, F) on the CPU, the whole image resized to size²."""
    was_training = backbone.training
    backbone.eval()
    features = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
        x = normalize(resize(to_float(batch.permute(0, 3, 1, 2)), size))
        with autocast(device):
            features.append(backbone(x).float().cpu())
    backbone.train(was_training)
    return torch.cat(features)


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                          weight_decay: float = 1e-4, iterations: int = 300) -> float:
    """Fit softmax regression on LayerNorm'd features by full-batch L-BFGS; accuracy on val."""
    train_x, val_x = F.layer_norm(train_x, train_x.shape[-1:]), F.layer_norm(val_x, val_x.shape[-1:])
    classifier = nn.Linear(train_x.shape[1], int(max(train_y.max(), val_y.max())) + 1)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(train_x), train_y) + weight_decay * classifier.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (classifier(val_x).argmax(1) == val_y).float().mean().item()


def knn_accuracy(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> float:
    """Each held-out feature votes with its k most cosine-similar training features, each vote
    weighted by exp(similarity / temperature)."""
    train_x, val_x = F.normalize(train_x, dim=1), F.normalize(val_x, dim=1)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    k = min(k, len(train_x))
    correct = 0
    for start in range(0, len(val_x), chunk):
        similarity = val_x[start:start + chunk] @ train_x.T  # (chunk, N_train)
        top_sim, top_idx = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), num_classes).scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == val_y[start:start + chunk]).sum().item()
    return correct / len(val_x)
