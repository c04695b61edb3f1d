"""fairseq_kd: knowledge distillation of self-supervised speech models as a fairseq plugin."""
