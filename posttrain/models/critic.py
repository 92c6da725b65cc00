"""The PPO critic: per-token values V_BT, as a head on the policy or as a model of its own.

Position t of `values_BT` holds V(x_<t), the value of the state in which token t is chosen,
read from the hidden state of position t-1 (as TRL's and OpenRLHF's critics do); position 0
predicts nothing and holds 0. So values line up with `logprobs.token_logprobs`, whose position t
holds log pi(x_t | x_<t).

- `ValueHead` (`critic.kind: head`): a linear layer on the policy's last hidden state. One
  forward of the policy gives logits and values. The head is not a submodule of the policy,
  so the policy saved at the end of the stage stays a plain causal LM; the head is saved
  beside it (`value_head.safetensors`).
- `SeparateCritic` (`critic.kind: separate`): a one-label `AutoModelForSequenceClassification`
  (a transformer body and a linear `score` head, as TRL's PPOTrainer value model), applied at
  every position instead of only the last; saved with `save_pretrained`, so a trained reward
  model can initialise it and the saved critic loads as a reward model.

Test: `pytest tests/test_ppo_stage.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

HEAD_FILE = "value_head.safetensors"
HEAD_CONFIG = "value_head.json"


def shift_values(values_BT: Tensor) -> Tensor:
    """Values read at position t-1 moved to position t (position 0 gets 0)."""
    return nn.functional.pad(values_BT[:, :-1], (1, 0))


class ValueHead(nn.Module):
    """V = w . h + b on the policy's last hidden state, kept in float32.

    Initialised as OpenRLHF's critic head (weights ~ N(0, 1/(hidden+1)), bias 0), so the first
    values are near 0.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_BTH: Tensor) -> Tensor:
        """Per-token values `[B, T]`, shifted as the module docstring says."""
        return shift_values(self.linear(hidden_BTH.float()).squeeze(-1))

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / HEAD_FILE))
        (folder / HEAD_CONFIG).write_text(json.dumps({"hidden_size": self.hidden_size}))

    @classmethod
    def load(cls, folder: str | Path) -> ValueHead:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / HEAD_FILE).is_file():
            raise FileNotFoundError(f"no value head in {folder} (expected {HEAD_FILE})")
        config = json.loads((folder / HEAD_CONFIG).read_text())
        head = cls(int(config["hidden_size"]))
        head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        return head


class SeparateCritic(nn.Module):
    """A sequence-classification model's body and score head, applied at every position."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(
                f"a critic needs a one-label model, got num_labels={model.config.num_labels}"
            )
        self.model = model

    def forward(self, input_ids_BT: Tensor, attention_mask_BT: Tensor) -> Tensor:
        device = next(self.model.parameters()).device
        body = getattr(self.model, self.model.base_model_prefix)
        hidden = body(
            input_ids=input_ids_BT.to(device),
            attention_mask=attention_mask_BT.to(device),
            use_cache=False,
        ).last_hidden_state
        return shift_values(self.model.score(hidden).squeeze(-1).float())

    def save(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)


Critic = ValueHead | SeparateCritic


def build_critic(
    kind: str, policy: nn.Module, path: str, dtype: torch.dtype, pad_token_id: int
) -> Critic:
    """`head`: a new `ValueHead` sized to `policy`, on its device; `separate`: a one-label
    sequence-classification model loaded from `path` (a causal LM's body gets a new head)."""
    device = next(policy.parameters()).device
    if kind == "head":
        hidden = policy.config.get_text_config().hidden_size
        return ValueHead(hidden).to(device).train()
    if kind != "separate":
        raise ValueError(f"critic.kind must be 'head' or 'separate', got {kind!r}")
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.lora import is_adapter_folder

    if is_adapter_folder(path):
        raise ValueError(
            f"a separate critic starts from a full model, but {path!r} is a LoRA adapter "
            "folder: set critic.path to a full model, or model.lora.merge: true"
        )
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    model.config.pad_token_id = pad_token_id
    return SeparateCritic(model).to(device).train()
