"""DPO-family losses: values derived by hand, and the same random inputs through TRL 1.16.

TRL's DPO loss lives inside `DPOTrainer._compute_loss`, which reads trainer attributes and calls
the model for per-token log-probabilities. The cross-checks call that real method unbound, with
a namespace holding the attributes it reads and a forward function that returns the given
per-token log-probabilities; references come in precomputed, as with `precompute_ref_logps`.
SimPO and conservative DPO are checked against `CPOTrainer.cpo_loss`, which TRL 1.16 still
writes with label smoothing (its DPO `sigmoid` no longer has it).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.losses.dpo import dpo_loss, rpo_nll

LOG1P_E_MINUS1 = math.log(1 + math.exp(-1))  # -log sigmoid(1) = 0.3132617
T = torch.tensor


# One pair per case, worked by hand. SIG: log-ratios chosen -1 - (-2) = 1, rejected
# -3 - (-2) = -1, so h = 2 and with beta 0.5, beta h = 1: -log sig(1) = log(1 + e^-1).
SIG = (T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]))
# IPO: chosen (-4 - -6) / 4 tokens = 0.5, rejected (-3 - -2) / 2 tokens = -0.5, h_avg = 1;
# loss (1 - 1/(2 beta))^2.
IPO = (T([-4.0]), T([-3.0]), T([-6.0]), T([-2.0]))
IPO_KW = dict(loss_type="ipo", chosen_tokens_B=T([4]), rejected_tokens_B=T([2]))
# SimPO: rewards 2 * (-2 / 4) = -1 and 2 * (-6 / 3) = -4, z = -1 + 4 - gamma 1 = 2.
SIMPO_KW = dict(
    loss_type="simpo", simpo_gamma=1.0, chosen_tokens_B=T([4]), rejected_tokens_B=T([3])
)
HAND_CASES = {
    "sigmoid": (SIG, dict(beta=0.5), LOG1P_E_MINUS1, (0.5, -0.5)),
    # cDPO: 0.9 log(1 + e^-1) + 0.1 log(1 + e), and log(1 + e) = 1 + log(1 + e^-1): + eps
    "cdpo_0.1": (SIG, dict(beta=0.5, label_smoothing=0.1), LOG1P_E_MINUS1 + 0.1, (0.5, -0.5)),
    "cdpo_0.3": (SIG, dict(beta=0.5, label_smoothing=0.3), LOG1P_E_MINUS1 + 0.3, (0.5, -0.5)),
    "reference_free": (SIG[:2] + (None, None), dict(beta=0.5), LOG1P_E_MINUS1, (-0.5, -1.5)),
    # h = 0: log 2 whatever the smoothing
    "zero_margin": ((T([-1.0]), T([-5.0]), T([-1.0]), T([-5.0])),
                    dict(beta=3.0, label_smoothing=0.2), math.log(2), (0.0, 0.0)),
    # rewards stay beta * summed log-ratio (2 and -1), as TRL logs them
    "ipo_beta_0.5": (IPO, dict(beta=0.5, **IPO_KW), 0.0, (1.0, -0.5)),
    "ipo_beta_1": (IPO, dict(beta=1.0, **IPO_KW), 0.25, (2.0, -1.0)),
    "ipo_beta_0.25": (IPO, dict(beta=0.25, **IPO_KW), 1.0, (0.5, -0.25)),
    "simpo": ((T([-2.0]), T([-6.0]), None, None), dict(beta=2.0, **SIMPO_KW),
              math.log(1 + math.exp(-2)), (-1.0, -4.0)),
    # DPO part log 2 (h = 0) plus alpha 0.5 * NLL 6 / 3 tokens = 1
    "rpo": ((T([-6.0]), T([-5.0]), T([-6.0]), T([-5.0])),
            dict(beta=0.1, rpo_alpha=0.5, chosen_tokens_B=T([3])), math.log(2) + 1.0, (0.0, 0.0)),
}  # fmt: skip


@pytest.mark.parametrize("case", HAND_CASES)
def test_losses_and_rewards_by_hand(case):
    inputs, kwargs, loss, (chosen_reward, rejected_reward) = HAND_CASES[case]
    out = dpo_loss(*inputs, **kwargs)
    assert out.loss.item() == pytest.approx(loss)
    assert out.chosen_rewards_B.item() == pytest.approx(chosen_reward)
    assert out.rejected_rewards_B.item() == pytest.approx(rejected_reward)
    assert out.margins_B.item() == pytest.approx(chosen_reward - rejected_reward)
    assert out.accuracy.item() == float(chosen_reward > rejected_reward)  # strict


def test_rpo_nll_is_per_token():
    assert rpo_nll(T([-6.0, -1.0]), T([3, 4])).tolist() == [2.0, 0.25]


def test_sigmoid_gradient_by_hand():
    # d/d logpi_w of -log sig(beta h) = -beta sig(-beta h); at beta h = 1: -0.5 / (1 + e)
    chosen, rejected = T([-1.0], requires_grad=True), T([-3.0], requires_grad=True)
    dpo_loss(chosen, rejected, T([-2.0]), T([-2.0]), beta=0.5).loss.backward()
    g = 0.5 / (1 + math.e)
    assert chosen.grad.item() == pytest.approx(-g)
    assert rejected.grad.item() == pytest.approx(g)


def test_accuracy_margins_and_micro_batches():
    pc, pr = T([-1.0, -4.0, -2.0, -3.0]), T([-2.0, -1.0, -2.5, -3.5])
    zeros = torch.zeros(4)
    out = dpo_loss(pc, pr, zeros, zeros, beta=1.0)
    assert out.margins_B.tolist() == [1.0, -3.0, 0.5, 0.5]
    assert out.accuracy.item() == 0.75
    parts = sum(
        dpo_loss(pc[i : i + 2], pr[i : i + 2], zeros[:2], zeros[:2], beta=1.0, num_pairs=4).loss
        for i in (0, 2)
    )
    assert parts.item() == pytest.approx(out.loss.item())
    assert set(out.metrics()) >= {"dpo/accuracy", "dpo/logps_chosen", "dpo/logps_rejected"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(loss_type="ipo"), "chosen_tokens_B and rejected_tokens_B"),
        (dict(loss_type="simpo", chosen_tokens_B=T([1]), rejected_tokens_B=T([1])), "reference"),
        (dict(label_smoothing=0.5), "label_smoothing"),
        (dict(loss_type="ipo", label_smoothing=0.1), "not ipo"),
        (dict(rpo_alpha=1.0), "chosen_tokens_B"),
        (dict(loss_type="hinge"), "loss_type"),
        (dict(beta=0.0), "beta"),
        (
            dict(loss_type="ipo", chosen_tokens_B=T([0]), rejected_tokens_B=T([2])),
            r"chosen_tokens_B must be >= 1.*rows \[0\]",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    kwargs = {"beta": 0.1, **kwargs}
    with pytest.raises(ValueError, match=match):
        dpo_loss(T([-1.0]), T([-2.0]), T([-1.0]), T([-1.0]), **kwargs)


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="ref_rejected_B"):
        dpo_loss(T([-1.0]), T([-2.0]), T([-1.0]), T([-1.0, 0.0]), beta=0.1)


# ---- cross-checks against TRL 1.16 on the same random inputs --------------------------------


def _identity(x, **_):
    return x


ACCELERATOR = SimpleNamespace(
    device=torch.device("cpu"), gather=_identity, gather_for_metrics=_identity
)


def _random_pairs(b: int = 6, t: int = 7, equal_lengths: bool = False, seed: int = 0):
    """Per-token policy logps [2B, T] (chosen rows first, as TRL), completion mask [2B, T+1]
    (position 0 is prompt, so the shifted mask and the mask have the same row sums), refs."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2 * b, t + 1, dtype=torch.long)
    mask[:, 0] = 0
    if not equal_lengths:
        for row, length in enumerate(torch.randint(1, t + 1, (2 * b,), generator=g).tolist()):
            mask[row, 1 + length :] = 0
    per_token = -2 * torch.rand(2 * b, t, generator=g) * mask[:, 1:]
    ref = -2 * torch.rand(2 * b, t, generator=g).mul(mask[:, 1:]).sum(1)
    return per_token, mask, ref


def _trl_dpo(loss_types, loss_weights, beta, per_token, mask, ref):
    from trl.trainer.dpo_trainer import DPOTrainer

    b = per_token.shape[0] // 2
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token, dtype=torch.bool),
    )
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=ACCELERATOR,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:b],
        "ref_rejected_logps": ref[b:],
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)
    return loss, trainer._metrics["train"]


def _ours(per_token, mask, ref, **kwargs):
    """Our loss on TRL's layout; `ref=None` for reference-free losses."""
    b = per_token.shape[0] // 2
    logps, n = per_token.sum(1), mask[:, 1:].sum(1)
    refs = (None, None) if ref is None else (ref[:b], ref[b:])
    return dpo_loss(
        logps[:b], logps[b:], *refs, chosen_tokens_B=n[:b], rejected_tokens_B=n[b:], **kwargs
    )


@pytest.mark.parametrize(("loss_type", "beta"), [("sigmoid", 0.1), ("sigmoid", 2.0), ("ipo", 0.3)])
def test_matches_trl_dpo_trainer_loss_metrics_and_gradient(loss_type, beta):
    per_token, mask, ref = _random_pairs(seed=int(beta * 10))
    mine_in = per_token.clone().requires_grad_()
    trl_in = per_token.clone().requires_grad_()
    trl_loss, trl_metrics = _trl_dpo([loss_type], [1.0], beta, trl_in, mask, ref)
    out = _ours(mine_in, mask, ref, beta=beta, loss_type=loss_type)
    torch.testing.assert_close(out.loss, trl_loss, atol=1e-6, rtol=0)
    (out.loss - trl_loss).backward()  # d(ours) - d(TRL) in one pass: opposite signs
    assert mine_in.grad.abs().sum() > 0
    torch.testing.assert_close(mine_in.grad, -trl_in.grad, atol=1e-6, rtol=0)
    for ours, key in [
        (out.chosen_rewards_B.mean(), "rewards/chosen"),
        (out.rejected_rewards_B.mean(), "rewards/rejected"),
        (out.margins_B.mean(), "rewards/margins"),
        (out.accuracy, "rewards/accuracies"),
    ]:
        assert ours.item() == pytest.approx(trl_metrics[key][0], abs=1e-6)


def test_rpo_matches_trl_sigmoid_plus_sft_when_chosen_lengths_are_equal():
    # TRL's "sft" term averages over all chosen tokens of the batch; RPO normalises per pair.
    # With equal chosen lengths the two coincide.
    per_token, mask, ref = _random_pairs(equal_lengths=True, seed=3)
    trl_loss, _ = _trl_dpo(["sigmoid", "sft"], [1.0, 0.7], 0.2, per_token, mask, ref)
    out = _ours(per_token, mask, ref, beta=0.2, rpo_alpha=0.7)
    torch.testing.assert_close(out.loss, trl_loss, atol=1e-6, rtol=0)


def _cpo(loss_type, beta, label_smoothing, simpo_gamma=0.0):
    """The attributes `CPOTrainer.cpo_loss` reads (alpha 0: no AlphaPO transform)."""
    attrs = dict(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing)
    return SimpleNamespace(alpha=0.0, simpo_gamma=simpo_gamma, accelerator=ACCELERATOR, **attrs)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25])
def test_conservative_dpo_matches_trl_smoothed_sigmoid(eps):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    per_token, mask, ref = _random_pairs(seed=5)
    b = per_token.shape[0] // 2
    ratios = per_token.sum(1) - ref
    trl_losses, _, _ = CPOTrainer.cpo_loss(_cpo("sigmoid", 0.5, eps), ratios[:b], ratios[b:])
    out = _ours(per_token, mask, ref, beta=0.5, label_smoothing=eps)
    torch.testing.assert_close(out.losses_B, trl_losses, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("eps", "gamma"), [(0.0, 0.5), (0.1, 1.4)])
def test_simpo_matches_trl_cpo_trainer(eps, gamma):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    per_token, mask, _ = _random_pairs(seed=7)
    b = per_token.shape[0] // 2
    # CPOTrainer averages log-probabilities over completion tokens for simpo.
    mean_logps = per_token.sum(1) / mask[:, 1:].sum(1)
    cpo = _cpo("simpo", 2.0, eps, simpo_gamma=gamma)
    trl_losses, trl_chosen, _ = CPOTrainer.cpo_loss(cpo, mean_logps[:b], mean_logps[b:])
    out = _ours(
        per_token, mask, None, beta=2.0, loss_type="simpo", simpo_gamma=gamma, label_smoothing=eps
    )
    torch.testing.assert_close(out.losses_B, trl_losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.chosen_rewards_B, trl_chosen, atol=1e-6, rtol=0)
