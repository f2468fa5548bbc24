"""Scoring, search and pairs of the re-identification model, without Lightning in them.

The re-ID score of two embeddings is the head's logit ``s(a, b) = w · |a − b| + c``. Everything that compares
datasets (the privacy threshold τ, the filter, the coverage metrics) asks one question: for each query, which bank
embedding scores highest, and how high? :func:`max_scores` answers it exactly under the head, in bounded memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def pair_scores(first: torch.Tensor, second: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logits of matched pairs: ``first[i]`` with ``second[i]``, both ``(N, D)`` → ``(N,)``."""
    return (first - second).abs() @ weight.reshape(-1) + bias.reshape(())


def max_scores(queries: torch.Tensor, bank: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
               max_elements: int = 2**24) -> tuple[torch.Tensor, torch.Tensor]:
    """For every query ``(Q, D)``, the highest score against the bank ``(R, D)`` and the bank row that gives it.

    ``w · |q − r|`` splits by the sign of each weight into two weighted L1 distances,
    ``Σ_{w≥0} |w q − w r| − Σ_{w<0} |w q − w r|``, which ``torch.cdist(p=1)`` computes without materialising the
    ``Q × R × D`` differences. Query and bank are processed in chunks whose score block holds at most ``max_elements``
    values (64 MiB of float32 by default), so memory does not grow with ``Q`` or ``R``. Ties go to the lowest bank row.

    Returns ``(values (Q,), indices (Q,) int64)`` on the queries' device, in the queries' dtype.
    """
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries (Q, D) and bank (R, D) must share D; got {tuple(queries.shape)}, "
                         f"{tuple(bank.shape)}")
    if bank.shape[0] == 0:
        raise ValueError("the bank is empty: nothing to compare the queries with")
    weight = weight.reshape(-1).to(queries)
    positive = weight >= 0
    scaled = [(positive, weight[positive]), (~positive, -weight[~positive])]
    bank_chunk = min(bank.shape[0], max(1, max_elements))
    query_chunk = max(1, max_elements // bank_chunk)
    values = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    indices = torch.empty(queries.shape[0], dtype=torch.int64, device=queries.device)
    for start in range(0, queries.shape[0], query_chunk):
        query = queries[start:start + query_chunk]
        best = torch.full((query.shape[0],), -torch.inf, dtype=queries.dtype, device=queries.device)
        best_index = torch.zeros(query.shape[0], dtype=torch.int64, device=queries.device)
        for bank_start in range(0, bank.shape[0], bank_chunk):
            rows = bank[bank_start:bank_start + bank_chunk].to(queries)
            scores = torch.zeros(query.shape[0], rows.shape[0], dtype=queries.dtype, device=queries.device)
            for sign, (dims, scale) in zip((1.0, -1.0), scaled, strict=True):
                if bool(dims.any()):
                    scores.add_(torch.cdist(query[:, dims] * scale, rows[:, dims] * scale, p=1), alpha=sign)
            chunk_best, chunk_index = scores.max(dim=1)
            better = chunk_best > best
            best = torch.where(better, chunk_best, best)
            best_index = torch.where(better, chunk_index + bank_start, best_index)
        values[start:start + query.shape[0]] = best + bias.reshape(()).to(queries)
        indices[start:start + query.shape[0]] = best_index
    return values, indices


def privacy_threshold(heldout_max: torch.Tensor, quantile: float, rule: str = "linear") -> float:
    """τ from held-out queries' best scores against the training bank, at ``quantile``.

    ``rule="linear"``: the quantile interpolated between order statistics (numpy's default; the seed paper's).
    ``rule="conformal"``: the k-th smallest score, k = ⌈(n + 1)·q⌉ (capped at n): for a new video exchangeable with
    the held-out ones, P(score > τ) ≤ 1 − q — the promise of τ. Interpolation lets more through on small sets: with
    n = 36 and q = 0.95 the linear τ flags a new video with probability up to 0.081 on average, the conformal τ at
    most 0.027 (1/(n + 1)).
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if heldout_max.numel() == 0:
        raise ValueError("no held-out scores: τ needs at least one held-out embedding")
    values = heldout_max.detach().double().cpu().reshape(-1)
    if rule == "linear":
        return float(torch.quantile(values, quantile))
    if rule == "conformal":
        k = min(len(values), math.ceil((len(values) + 1) * quantile - 1e-9))
        return float(torch.sort(values).values[k - 1])
    raise ValueError(f"rule must be 'linear' or 'conformal', got {rule!r}")


Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # first (P, 2), second (P, 2) as (item, frame); label (P,)


def training_pairs(patient: torch.Tensor, index: torch.Tensor, num_frames: int, generator: torch.Generator) -> Pairs:
    """Balanced pairs inside one batch of ``B`` items with ``num_frames`` frames each.

    Every frame anchors one positive — a frame of *another video of the same patient* in the batch when there is one,
    else another frame of its own video — and one negative, a frame of an item of another patient. The counts are
    then cut to the smaller of the two, so positives and negatives are 1:1.
    """
    patient, index = patient.tolist(), index.tolist()

    def draw(n: int) -> int:
        return int(torch.randint(n, (), generator=generator))

    positives, negatives = [], []
    for item, (who, video) in enumerate(zip(patient, index, strict=True)):
        others = [j for j, (p, v) in enumerate(zip(patient, index, strict=True)) if p == who and v != video]
        strangers = [j for j, p in enumerate(patient) if p != who]
        for frame in range(num_frames):
            anchor = (item, frame)
            if others:
                positives.append((anchor, (others[draw(len(others))], draw(num_frames))))
            elif num_frames > 1:
                positives.append((anchor, (item, (frame + 1 + draw(num_frames - 1)) % num_frames)))
            if strangers:
                negatives.append((anchor, (strangers[draw(len(strangers))], draw(num_frames))))
    count = min(len(positives), len(negatives))
    return _as_pairs(positives[:count], negatives[:count])


def hardest_negatives(embedding: torch.Tensor, patient: torch.Tensor, anchors: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """The hardest in-batch negative of each anchor: among the frames of the batch's embeddings ``(B, F, D)`` that
    belong to another patient, the one the head scores highest against the anchor. ``anchors`` ``(N, 2)`` and the
    result ``(N, 2)`` are (item, frame); ties go to the lowest item, then frame. Every anchor needs another patient
    in the batch (:func:`training_pairs` only makes negatives when there is one)."""
    frames = embedding.shape[1]
    flat = embedding.flatten(0, 1)
    scores = pair_scores(embedding[anchors[:, 0], anchors[:, 1]][:, None], flat[None], weight, bias)  # (N, B·F)
    owner = patient.to(scores.device).repeat_interleave(frames)
    scores = scores.masked_fill(owner[None] == owner[anchors[:, 0] * frames][:, None], -torch.inf)
    best = scores.argmax(dim=1).cpu()
    return torch.stack([best // frames, best % frames], dim=1)


# Kinds of evaluation pairs.
NEGATIVE, SAME_VIDEO, CROSS_VIDEO = 0, 1, 2


def evaluation_pairs(patient: torch.Tensor, num_frames: int, seed: int) -> Pairs:
    """Deterministic pairs over a whole evaluation split (items sorted by index, so the result does not depend on
    batch size or the number of ranks).

    Positives: frames 0 and 1 of every video (``SAME_VIDEO``, when ``num_frames`` ≥ 2) and frame 0 of every video with
    the last frame of every later video of the same patient (``CROSS_VIDEO``). Negatives: as many pairs of frames of
    two different patients, drawn by a generator seeded with ``seed``.

    Returns ``first (P, 2)``, ``second (P, 2)`` as (item, frame) and ``kind (P,)`` (label = ``kind != NEGATIVE``).
    """
    patient = patient.cpu().numpy()
    positives, kinds = [], []
    if num_frames > 1:
        positives += [((item, 0), (item, 1)) for item in range(len(patient))]
        kinds += [SAME_VIDEO] * len(patient)
    for who in np.unique(patient):
        videos = np.flatnonzero(patient == who).tolist()
        for position, item in enumerate(videos):
            positives += [((item, 0), (later, num_frames - 1)) for later in videos[position + 1:]]
            kinds += [CROSS_VIDEO] * (len(videos) - position - 1)
    rng = np.random.default_rng(seed)
    negatives = []
    if len(np.unique(patient)) > 1:
        while len(negatives) < len(positives):
            item, other = rng.integers(len(patient), size=2)
            if patient[item] != patient[other]:
                frames = rng.integers(num_frames, size=2).tolist()
                negatives.append(((int(item), frames[0]), (int(other), frames[1])))
    first, second, _ = _as_pairs(positives, negatives)
    kind = torch.tensor(kinds + [NEGATIVE] * len(negatives), dtype=torch.int64)
    return first, second, kind


def _as_pairs(positives: list, negatives: list) -> Pairs:
    pairs = positives + negatives
    first = torch.tensor([pair[0] for pair in pairs], dtype=torch.int64).reshape(-1, 2)
    second = torch.tensor([pair[1] for pair in pairs], dtype=torch.int64).reshape(-1, 2)
    label = torch.cat([torch.ones(len(positives)), torch.zeros(len(negatives))])
    return first, second, label
