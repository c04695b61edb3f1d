# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""s3prl upstream for distilled students exported by ``fairseq-kd-export`` (torch only).

What s3prl's runners require of an upstream (docs/CONTRACTS.md 2.4), and how this one meets it:

- ``UpstreamExpert(ckpt, model_config=None, refresh=False, **kwargs)``: ``ckpt`` is the
  standalone ``.pt2`` file (``-k`` of run_downstream.py); ``model_config`` is accepted and unused
  (the file describes itself), a non-empty one is refused so a wrong ``-g`` is not silently ignored.
- ``forward(wavs)``: a list of 1-D 16 kHz waveforms, un-normalised; the expert applies
  ``F.layer_norm(wav, wav.shape)`` per utterance when the student was trained with
  ``task.normalize=true`` (as s3prl's hubert expert does), and zero-pads inputs shorter than
  0.05 s (as ``S3PRLUpstream`` does). Returns ``hidden_states`` (list of B x T x D tensors, all the
  same shape): whatever the file holds (its metadata's ``outputs``, chosen by ``fairseq-kd-export
  --outputs``): ``layers``, the post-projection CNN feature then every transformer layer
  (STaRHuBERT's SUPERB input), or ``heads``, the distillation heads' outputs in teacher-layer order
  (ARMHuBERT's 12 projection-head outputs); ``last_hidden_state`` and ``hidden_state_<i>`` for
  ``-s hidden_state_<i>``.
- ``get_downsample_rates(key)``: samples per frame of every returned key, the metadata's
  ``downsample_rate`` (320 with HuBERT's CNN; time-reduced outputs are up-sampled back to that rate
  by the exported program).
- eval outputs are deterministic, and the number of hidden states is fixed (no layer drop).
"""

from typing import Dict, List, Optional, Union

import torch
from torch import Tensor

from .runtime import StandaloneStudent


class UpstreamExpert(torch.nn.Module):
    def __init__(self, ckpt: str = None, model_config: Optional[str] = None, refresh: bool = False, **kwargs) -> None:
        super().__init__()
        if not ckpt:
            raise ValueError(
                "no student file: pass the .pt2 written by fairseq-kd-export as ckpt "
                "(run_downstream.py -k student.pt2)"
            )
        if model_config:
            raise ValueError(
                f"model_config={model_config!r} is not used by fairseq_kd students (the .pt2 file "
                "describes itself): drop -g / model_config"
            )
        self.student = StandaloneStudent(ckpt)
        self.name = f"[fairseq_kd student: {self.student.outputs}]"
        self._keys = ["hidden_states", "last_hidden_state"] + [
            f"hidden_state_{i}" for i in range(self.student.num_hidden_states)
        ]

    def get_downsample_rates(self, key: str) -> int:
        if key not in self._keys:
            raise ValueError(f"unknown feature {key!r}; this upstream returns {self._keys[:3]} ...")
        return self.student.downsample_rate

    def forward(self, wavs: List[Tensor]) -> Dict[str, Union[Tensor, List[Tensor]]]:
        hidden_states, _ = self.student(wavs)
        result: Dict[str, Union[Tensor, List[Tensor]]] = {
            "hidden_states": hidden_states,
            "last_hidden_state": hidden_states[-1],
        }
        for i, hidden in enumerate(hidden_states):
            result[f"hidden_state_{i}"] = hidden
        return result
