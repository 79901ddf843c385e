"""Phase B's recipe (EmbeddingNet + multi_similarity_loss, scored by recall_at_k) improves
retrieval over the features it starts from (Phase A's), on generated features where metric
learning has something to add, and a projection that learned nothing does not.

The features stand in for a backbone's pooled features: a class signal (8 dims, a centre
per class) beside a class-independent nuisance 5x larger (24 dims), like the random scene
behind each object of the generated Cars images. Cosine retrieval on such features finds
the image with the most similar nuisance, nearly at chance. Trained with the MS loss on
classes 0-7 only, the linear embedding must learn to drop the nuisance, which carries over
to the unseen classes 8-15 it is tested on (the T4 split). T4's own smoke run cannot show
a stable gain of Phase B over Phase A: with 8 training classes of 20 images the MS loss
fits them (train loss 0.74 -> 0.07 in 4 epochs) while test R@1 stays within a few queries
of Phase A's (tests/test_scripts.py).
"""
import torch
from torch import nn

from common.loss import multi_similarity_loss
from common.models import EmbeddingNet
from common.recall import recall_at_k

SIGNAL, NUISANCE, CLASSES, PER_CLASS = 8, 24, 16, 24


class Features(nn.Module):
    """A backbone whose pooled features are its input (EmbeddingNet needs .features and .fc)."""

    feature_dim = SIGNAL + NUISANCE

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(self.feature_dim, CLASSES // 2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def generated_features(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    centres = torch.randn(CLASSES, SIGNAL, generator=g)
    signal = centres[labels] + 0.3 * torch.randn(len(labels), SIGNAL, generator=g)
    nuisance = 5.0 * torch.randn(len(labels), NUISANCE, generator=g)
    return torch.cat([signal, nuisance], dim=1), labels


def test_ms_loss_embedding_learns_to_ignore_the_nuisance_and_transfers_to_unseen_classes():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x, labels = generated_features(g)
    train, test = labels < CLASSES // 2, labels >= CLASSES // 2
    embedder = EmbeddingNet(Features(), dim=16)

    def test_r1(model: nn.Module) -> float:
        with torch.no_grad():
            return recall_at_k(model(x[test]), labels[test], ks=(1,))[1]

    raw = recall_at_k(x[test], labels[test], ks=(1,))[1]
    untrained = test_r1(embedder)

    # P x K batches of the training classes, as T4's Phase B draws them: 4 classes x 4 images.
    optimizer = torch.optim.Adam(embedder.parameters(), lr=1e-2)
    train_idx = train.nonzero().squeeze(1)
    for _ in range(150):
        classes = torch.randperm(CLASSES // 2, generator=g)[:4]
        batch = torch.cat([train_idx[labels[train_idx] == c][torch.randperm(PER_CLASS, generator=g)[:4]]
                           for c in classes])
        loss = multi_similarity_loss(embedder(x[batch]), labels[batch], mining="ms")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = test_r1(embedder)

    # R@1 chance: 23 of the 191 other test samples share a query's class, 0.12. Measured
    # (seeds 0, 1, 2): features 0.135 / 0.172 / 0.214, untrained embedding 0.115 / 0.109 /
    # 0.151, trained 0.766 / 0.818 / 0.745; about 2.5 s on the 2-core VM.
    assert raw <= 0.3 and untrained <= 0.3, (raw, untrained)  # the nuisance decides
    assert trained >= 0.6 and trained >= raw + 0.4, (raw, untrained, trained)
