"""Losses as pure functions over tensors. No logging, no all-reduce, no model in here."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dialogtrain.data.encode import IGNORE_INDEX
from dialogtrain.loss_facts import PreferenceLoss


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
    return target_logps(logits, labels[:, 1:][keep[:, :-1]])  # targets (N,), row-major like the logits


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) log softmax(logits[i])[targets[i]] in fp32, by cross-entropy (a fused log-softmax + gather).

    logits: (N, V) at the learned positions, any float dtype; targets: (N,) the tokens they predict
    (collate.learned_index builds both orders alike).
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"(N, V) logits and (N,) targets expected, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def per_sequence(values: torch.Tensor, owners: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """(S,) sums of `values` (N,) by their sequence `owners` (N,) in 0..S-1; no shape depends on the data,
    so on a GPU nothing is read back."""
    return torch.zeros(num_sequences, dtype=values.dtype, device=values.device).index_add(0, owners, values)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of target-token log-probs and the number of target tokens.

    logits: (B, T, V) at every position, or (N, V) at learned_positions(labels) only (the fast path:
    no logits, log-softmax or gradient for positions nothing learns); labels: (B, T).
    sequence_ids: (B, T), the sequence each position belongs to (0..S-1; a packed row holds several,
    see collate.collate_packed); None: row b is sequence b.
    Returns (logps (S,), n_tokens (S,)), fp32 and int64.
    The one log-prob primitive, for any logits and labels; the training step reads the same through
    target_logps and per_sequence from indices the collate built (train.forward.batch_sequence_logps).
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
    return per_sequence(logps, owners, count), torch.bincount(owners, minlength=count)


def sft_loss(logits: torch.Tensor, targets: torch.Tensor, step_target_tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy of this micro-batch over the target tokens of its whole step.

        loss = -sum_i log p(targets[i] | prefix) / N_step

    N_step counts target tokens over every micro-batch and rank of the optimizer step, so summing
    the micro-batch losses gives the step's mean token loss however the step is split.
    logits: (N, V) at the learned positions; targets: (N,) (collate.learned_index); returns a scalar.
    """
    return -target_logps(logits, targets).sum() / step_target_tokens


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


# ----------------------------------------------------------------------------------------------------
# Reference-free pair losses (ORPO, SimPO): the policy alone, on mean token log-probs
#   l_c = log pi(y_c|x) / n_c,  l_r = log pi(y_r|x) / n_r
# from the same summed log-probs and token counts (B,) as the DPO losses. Each returns (losses (B,),
# chosen_rewards (B,), rejected_rewards (B,), *metrics), everything but the losses detached.


def mean_token_logps(logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """(B,) summed completion log-probs over their token counts (at least 1)."""
    return logps / n_tokens.clamp(min=1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, without cancellation (Maechler 2012): log(-expm1(x)) above -ln 2,
    log1p(-exp(x)) below. At x = 0 (a completion of probability 1) it is -inf."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, orpo_lambda: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, eqs. 4-7): the chosen completion's NLL plus lambda x the log odds-ratio term,

        log_odds = (l_c - l_r) - (log(1 - e^l_c) - log(1 - e^l_r))     log odds(y_c|x) - log odds(y_r|x)
        loss     = -l_c - lambda * log sigmoid(log_odds)

    Returns (losses, chosen_rewards = lambda * l_c, rejected_rewards = lambda * l_r, nll_loss = -l_c,
    log_odds_ratio = log sigmoid(log_odds), log_odds_chosen = log_odds), all (B,); the metrics are TRL's.
    """
    chosen, rejected = mean_token_logps(policy_chosen, chosen_tokens), mean_token_logps(policy_rejected, rejected_tokens)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    losses = -chosen - orpo_lambda * ratio
    return (losses, (orpo_lambda * chosen).detach(), (orpo_lambda * rejected).detach(), -chosen.detach(),
            ratio.detach(), log_odds.detach())


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, simpo_gamma: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, eq. 6): a length-normalised reward beta * l and a target margin gamma,

        loss = -log sigmoid(beta * l_c - beta * l_r - gamma)

    Returns (losses, chosen_rewards = beta * l_c, rejected_rewards = beta * l_r), all (B,).
    """
    chosen, rejected = mean_token_logps(policy_chosen, chosen_tokens), mean_token_logps(policy_rejected, rejected_tokens)
    losses = -F.logsigmoid(beta * (chosen - rejected) - simpo_gamma)
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


# ----------------------------------------------------------------------------------------------------
# KTO: unpaired completions, each desirable (thumbs up) or not, against a reference point z0.


def kto_kl(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(log pi(y'|x) - log ref(y'|x))), detached, a scalar: the KL of
    policy and reference estimated on (B,) summed log-probs of mismatched pairs (x, y') of one batch."""
    return (policy_kl - ref_kl).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float,
             beta: float, kto_desirable_weight: float = 1.0, kto_undesirable_weight: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7) with the log-ratio r = log pi(y|x) - log ref(y|x):

        desirable:    w_D * (1 - sigmoid(beta * (r - z0)))
        undesirable:  w_U * (1 - sigmoid(beta * (z0 - r)))

    policy_logps, ref_logps: (B,) summed completion log-probs; desirable: (B,) bool; kl: z0 (kto_kl), a
    detached scalar. Returns (losses (B,), rewards (B,) = beta * r, detached).
    """
    ratio = policy_logps - ref_logps
    losses = torch.where(desirable, kto_desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         kto_undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return losses, (beta * ratio).detach()


# The preference losses by --loss name, the one list of them, with what each reads (loss_facts.PreferenceLoss;
# the launcher reads this literal from the source, loss_facts.preference_losses, so that it need not import torch).
PREFERENCE_LOSSES = {
    "sigmoid": PreferenceLoss(dpo_sigmoid_loss, reference=True, paired=True, options=("beta", "label_smoothing")),
    "ipo": PreferenceLoss(dpo_ipo_loss, reference=True, paired=True, options=("beta",)),
    "hinge": PreferenceLoss(dpo_hinge_loss, reference=True, paired=True, options=("beta",)),
    "orpo": PreferenceLoss(orpo_loss, reference=False, paired=True, options=("orpo_lambda",),
                           metrics=("nll_loss", "log_odds_ratio", "log_odds_chosen")),
    "simpo": PreferenceLoss(simpo_loss, reference=False, paired=True, options=("beta", "simpo_gamma")),
    "kto": PreferenceLoss(kto_loss, reference=True, paired=False,
                          options=("beta", "kto_desirable_weight", "kto_undesirable_weight")),
}


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Mean token negative log-likelihood of each chosen completion, the RPO term (Pang et al. 2024):

        nll = -log pi(y_c|x) / n_c          (B,), weighted by --rpo-alpha and added to each pair's loss

    Per pair (not per batch token) so the step's loss does not depend on how pairs fall into micro-batches.
    """
    return -policy_chosen / chosen_tokens.clamp(min=1)
