"""Losses as pure functions over tensors. No logging, no all-reduce, no model in here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dialogtrain.data.encode import IGNORE_INDEX


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every next token, shifted and masked.

    logits: (B, T, V) any float dtype; labels: (B, T) with -100 where nothing is learned.
    Returns (logps, mask), both (B, T-1): logps[b, t] = log softmax(logits[b, t])[labels[b, t+1]]
    in fp32, 0 where mask is False. Computed by cross-entropy (a fused log-softmax + gather), so no
    (B, T, V) log-softmax copy is kept for backward.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits (B, T, V) and labels (B, T) expected, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    shifted_logits = logits[:, :-1, :]  # (B, T-1, V): position t predicts token t+1
    targets = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)).float(),
                          targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view_as(targets), targets != IGNORE_INDEX


def learned_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: position t of row b predicts a learned token (labels[b, t+1] != -100); the last
    column is False. The only logits any loss reads: give it to the model as `logits_to_keep` and
    the LM head (for a 49k vocabulary, a fifth of a 135M model's FLOPs) runs nowhere else.

    labels [[-100, 5, -100, 7]] -> [[True, False, True, False]]
    """
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def learned_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) log-probs of the N learned tokens from logits computed at learned_positions only.

    logits: (N, V), the rows of a (B, T, V) logits tensor at learned_positions(labels) in row-major
    order (what transformers returns for `logits_to_keep=learned_positions(labels)`); labels: (B, T).
    logps[i] = log softmax(logits[i])[next token], fp32.
    """
    keep = learned_positions(labels)  # (B, T)
    if logits.dim() != 2 or logits.size(0) != int(keep.sum()):
        raise ValueError(f"(N, V) logits at the {int(keep.sum())} learned positions of labels {tuple(labels.shape)} "
                         f"expected, got {tuple(logits.shape)}")
    targets = labels[:, 1:][keep[:, :-1]]  # (N,), row-major like the logits
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of target-token log-probs and the number of target tokens.

    logits: (B, T, V) at every position, or (N, V) at learned_positions(labels) only (the fast path:
    no logits, log-softmax or gradient for positions nothing learns); labels: (B, T).
    sequence_ids: (B, T), the sequence each position belongs to (0..S-1; a packed row holds several,
    see collate.collate_packed); None: row b is sequence b.
    Returns (logps (S,), n_tokens (S,)), fp32 and int64.
    The one log-prob primitive: SFT loss and evaluation, and DPO, all use it.
    """
    keep = learned_positions(labels)
    if logits.dim() == 2:
        logps = learned_token_logps(logits, labels)  # (N,)
    else:
        logps = token_logps(logits, labels)[0][keep[:, :-1]]  # (N,)
    if sequence_ids is None:
        sequence_ids, count = torch.arange(labels.size(0), device=labels.device)[:, None].expand_as(labels), labels.size(0)
    else:
        count = int(sequence_ids.max()) + 1
    owners = sequence_ids[keep]  # (N,): a learned position predicts the next token of its own sequence
    totals = torch.zeros(count, dtype=logps.dtype, device=logps.device).index_add(0, owners, logps)
    return totals, torch.bincount(owners, minlength=count)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, step_target_tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy of this micro-batch over the target tokens of its whole step.

        loss = -sum_{b,t} log p(labels[b, t+1] | prefix) / N_step

    N_step counts target tokens over every micro-batch and rank of the optimizer step, so summing
    the micro-batch losses gives the step's mean token loss however the step is split.
    logits: (B, T, V) or (N, V) at learned_positions(labels), as sequence_logps; labels: (B, T);
    returns a scalar.
    """
    logps, _ = sequence_logps(logits, labels)
    return -logps.sum() / step_target_tokens


# ----------------------------------------------------------------------------------------------------
# DPO. Every loss takes the same arguments, so the loop picks one by name (PREFERENCE_LOSSES) once:
#   policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) summed completion log-probs
#   (sequence_logps) of the policy and the reference; beta: the KL strength; label_smoothing: the
#   assumed fraction of flipped labels (sigmoid only); chosen_tokens, rejected_tokens: (B,)
#   completion token counts (used by ipo only).
# With the log-ratio difference
#     h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))
# each returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), the rewards being the
# implicit rewards beta * (log pi - log ref), detached.


def dpo_rewards(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)), detached; all (B,)."""
    return (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


def _log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    if not (policy_chosen.shape == policy_rejected.shape == ref_chosen.shape == ref_rejected.shape
            and policy_chosen.dim() == 1):
        raise ValueError(f"four (B,) log-prob tensors expected, got {tuple(policy_chosen.shape)}, "
                         f"{tuple(policy_rejected.shape)}, {tuple(ref_chosen.shape)}, {tuple(ref_rejected.shape)}")
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def _no_label_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing:
        raise ValueError(f"label smoothing applies to the sigmoid loss only, not {name} (got {label_smoothing})")


def dpo_sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
                     chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023), conservative with label smoothing eps (cDPO):

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    eps = 0 is plain DPO; at h = 0 the loss is ln 2 whatever eps. Token counts are unused.
    """
    h = _log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return (losses, *dpo_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def dpo_ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
                 chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023, eq. 17), on per-token log-ratios as TRL computes it:

        h_tok = (log pi(y_c) - log ref(y_c)) / n_c - (log pi(y_r) - log ref(y_r)) / n_r
        loss  = (h_tok - 1 / (2 * beta))^2

    n_c, n_r are the completion token counts (chosen_tokens, rejected_tokens, at least 1); without
    them (None) h_tok is the sequence-level h of the paper. The rewards stay sequence-level.
    """
    _no_label_smoothing("ipo", label_smoothing)
    _log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if chosen_tokens is not None and rejected_tokens is not None:
        chosen_ratio = chosen_ratio / chosen_tokens.clamp(min=1)
        rejected_ratio = rejected_ratio / rejected_tokens.clamp(min=1)
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return (losses, *dpo_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def dpo_hinge_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                   ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
                   chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinge (SLiC, Zhao et al. 2023) on the DPO log-ratio difference:

        loss = relu(1 - beta * h)

    Zero once the margin beta * h reaches 1. Token counts are unused.
    """
    _no_label_smoothing("hinge", label_smoothing)
    h = _log_ratio_difference(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = torch.relu(1 - beta * h)
    return (losses, *dpo_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


# The preference losses by --loss name: the one list of them (the launcher reads its keys from this source,
# options.preference_loss_names, so that it need not import torch).
PREFERENCE_LOSSES = {"sigmoid": dpo_sigmoid_loss, "ipo": dpo_ipo_loss, "hinge": dpo_hinge_loss}


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood of each chosen completion, the RPO term (Pang et al. 2024):

        nll = -log pi(y_c|x) / n_c          (B,), weighted by --rpo-alpha and added to each pair's loss

    Per pair (not per batch token) so the step's loss does not depend on how pairs fall into micro-batches.
    """
    return -policy_chosen / chosen_tokens.clamp(min=1)
