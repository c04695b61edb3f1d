# Copyright (c) fairseq_kd contributors.
#
# This source code is licensed under the MIT license found in the
# LICENSE file in the root directory of this source tree.
"""``thin_hubert_w2v``: the distilled student with wav2vec 2.0's ``extract_features`` output.

fairseq's two CTC fine-tuning models call the pre-trained model differently:

- ``hubert_ctc`` (``HubertEncoder``): ``x, padding_mask = w2v_model.extract_features(...)``;
- ``wav2vec_ctc`` (``Wav2VecEncoder``): ``res = w2v_model.extract_features(...)`` then
  ``res["x"]``, ``res["padding_mask"]`` and ``res["layer_results"]``.

``thin_hubert`` follows HuBERT (the tuple). This subclass has the same config, modules and
parameter names and returns the dict, with ``layer_results`` in wav2vec 2.0's layout: one
``(x, None, None)`` per transformer layer, ``x`` as (T_l, B, C) at the layer's own frame rate.
``kd_audio_finetuning`` switches a student to it when ``model._name=wav2vec_ctc`` and writes the
name into the fine-tuned checkpoint's ``w2v_args``; nothing else needs to name it.
"""

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from fairseq.models import register_model

from fairseq_kd.models.thin_hubert import ThinHubertConfig, ThinHubertModel


@dataclass
class ThinHubertW2vConfig(ThinHubertConfig):
    pass


@register_model("thin_hubert_w2v", dataclass=ThinHubertW2vConfig)
class ThinHubertW2vModel(ThinHubertModel):
    def extract_features(
        self,
        source: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        mask: bool = False,
        layer: Optional[int] = None,
        **kwargs,
    ) -> Dict[str, Any]:
        """What fairseq's ``Wav2VecEncoder`` (wav2vec_ctc) calls.

        Returns ``x`` (B, T', encoder_embed_dim) and ``padding_mask`` (B, T') at the output rate
        (as ``ThinHubertModel.extract_features``), ``features`` (B, T, D) the post-projection CNN
        feature and ``layer_results`` [(T_l, B, D), None, None] per transformer layer.
        """
        res = self.encode(source, padding_mask=padding_mask, mask=mask, output_layer=layer)
        hidden_states = res["hidden_states"]
        return {
            "x": res["x"],
            "padding_mask": res["padding_mask"],
            "features": hidden_states[0],
            "layer_results": [(h.transpose(0, 1), None, None) for h in hidden_states[1:]],
        }
